"""Generation uses transformers' current KV-cache API: no deprecation warning, same ids as `generate`."""

from __future__ import annotations

import warnings

import pytest
import torch

from surgery.eval.generate import greedy_generate_ids
from tests.factories import build_model

PROMPTS = [[3, 17, 5, 9, 44, 2], [8, 40], [12, 13, 14], [90, 1, 1, 60, 7]]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_generation_warns_nothing_and_equals_generate(arch: str) -> None:
    model = build_model(arch, seed=2)
    eos = {95}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = greedy_generate_ids(model, PROMPTS, max_new_tokens=12, eos=eos, pad_id=0)
    noisy = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not noisy, [str(w.message) for w in noisy]
    for ids, got in zip(PROMPTS, ours, strict=True):
        inp = torch.tensor([ids])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False, max_new_tokens=12,
                                 pad_token_id=0, eos_token_id=sorted(eos))[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(ref) if t in eos), len(ref))
        assert got == ref[:cut]
        assert len(got) > 0
