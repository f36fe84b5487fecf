"""`eval --adapter` on a tied-embedding model whose LoRA covers `lm_head` scores what `surgery merge`
writes: the head untied and adapted, the input embeddings unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.eval.evaluate import load_for_eval
from surgery.io.merge import merge_adapter
from surgery.testbed.tokenizer import save_tokenizer
from tests.factories import build_model, make_adapter, peft_merged_state, tiny_config


def save_tied(out: Path, arch: str) -> Path:
    """A tiny tied-embedding model: Gemma as it comes, Qwen2 with tie_word_embeddings=True."""
    if arch == "gemma":
        model = build_model("gemma")
    else:
        from transformers import AutoModelForCausalLM

        config = tiny_config(arch)
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(out)
    save_tokenizer(out)  # eval loads a tokenizer; the test feeds ids directly
    return out


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["gemma", "qwen2"])
def test_eval_adapter_scores_the_merged_model(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_tied(tmp_path / "base", arch)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "lm_head"])
    merge_adapter(base, adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    model, _ = load_for_eval(base, adapter, device="cpu", dtype=torch.float32)

    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(model, ids), logits(merged, ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.get_input_embeddings().weight, original.get_input_embeddings().weight)
    assert not torch.equal(model.get_output_embeddings().weight, original.get_output_embeddings().weight)
    # the hole this closes: peft's own merge writes the head's delta into the shared embedding
    naive = peft_merged_state(base, adapter)
    assert not torch.allclose(naive["model.embed_tokens.weight"], original.get_input_embeddings().weight, atol=1e-3)


def test_an_adapter_that_leaves_the_head_alone_keeps_it_tied(tmp_path):
    base = save_tied(tmp_path / "base", "gemma")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    model, _ = load_for_eval(base, adapter, device="cpu", dtype=torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is True
