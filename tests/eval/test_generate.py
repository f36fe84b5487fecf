"""Batched left-padded greedy generation equals transformers' `generate` run one prompt at a time."""

from __future__ import annotations

import json
import os

import pytest
import torch

from surgery.eval.evaluate import load_for_eval
from surgery.eval.generate import eos_ids, generate, greedy_generate_ids
from surgery.model.encoding import pad_id, prompt_ids

os.environ.setdefault("SURGERY_PROGRESS", "0")
pytestmark = pytest.mark.slow


def _prompts(tb, n: int = 12) -> list[str]:  # noqa: ANN001
    out = []
    for name in ("harmful_eval.jsonl", "task_eval.jsonl", "benign_eval.jsonl"):
        lines = (tb.data / name).read_text().splitlines()[: n // 3]
        out += [json.loads(x)["prompt"] for x in lines]
    return out


@pytest.mark.parametrize("stage", ["aligned", "attacked"])
def test_batched_equals_generate(quick_testbed, stage: str) -> None:  # noqa: ANN001
    tb = quick_testbed
    model, tok = load_for_eval(tb.aligned, tb.attacked if stage == "attacked" else None, device="cpu")
    prompts = _prompts(tb)
    encoded = [prompt_ids(tok, p) for p in prompts]
    assert len({len(e) for e in encoded}) > 1  # the batch really is padded
    eos = eos_ids(model, tok)
    ours = greedy_generate_ids(model, encoded, max_new_tokens=20, eos=eos, pad_id=pad_id(tok))
    for ids, got in zip(encoded, ours, strict=True):
        inp = torch.tensor([ids])
        ref = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False, max_new_tokens=20,
                             pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos))[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(ref) if t in eos), len(ref))
        assert got == ref[:cut]
    # the string-level API, in other batch sizes, gives the same answers
    texts = generate(model, tok, prompts, max_new_tokens=20, batch_size=5)
    assert texts == [tok.decode(g, skip_special_tokens=True).strip() for g in ours]


def test_plain_prompt_without_chat_template(quick_testbed) -> None:  # noqa: ANN001
    model, tok = load_for_eval(quick_testbed.aligned, device="cpu")
    ids = prompt_ids(tok, "repeat : cake", chat_template=False)
    assert ids[0] == tok.bos_token_id and "<|user|>" not in tok.convert_ids_to_tokens(ids)
    assert prompt_ids(tok, "repeat : cake")[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")]
