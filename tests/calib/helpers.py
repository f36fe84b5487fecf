"""Tiny models saved with the testbed's word-level tokenizer, and calibration files, for calib/method tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from surgery.testbed.tokenizer import make_tokenizer
from surgery.testbed.world import all_words
from tests.factories import tiny_config


def tiny_model(out: Path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A 2-layer `arch` model over the testbed tokenizer (chat template included), saved to `out`."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab=len(tok)))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(out)
    tok.save_pretrained(str(out))
    return Path(out)


def write_pairs(path: Path, n: int = 6, seed: int = 0) -> Path:
    """`n` prompt/response pairs of random testbed words."""
    rng = random.Random(seed)
    words = [w for w in all_words() if w.isalpha()]
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
            response = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
            fh.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path
