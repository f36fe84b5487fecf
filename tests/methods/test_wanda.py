"""Wanda: the streamed layer-by-layer prune equals a plain whole-model torch.sort implementation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from surgery.calib.data import calibration_samples
from surgery.methods.wanda import wanda
from tests.calib.helpers import tiny_model, write_pairs


def _sq_norm_hooks(modules: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], list]:
    sq = {n: torch.zeros(m.in_features) for n, m in modules.items()}

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            sq[name] += (x * x).sum(0)
        return fn

    return sq, [m.register_forward_hook(hook(n)) for n, m in modules.items()]


def reference_wanda(model, samples, sparsity):
    """Wanda as published: per layer, stats on the dense layer (earlier layers pruned), sort per row, zero lowest."""
    for layer in model.model.layers:
        lins = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        sq, hooks = _sq_norm_hooks(lins)
        with torch.no_grad():
            for s in samples:
                model(s.input_ids[None])
        for h in hooks:
            h.remove()
        for n, m in lins.items():
            W = m.weight.data
            metric = W.abs() * torch.sqrt(sq[n]).reshape(1, -1)
            idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(W.shape[1] * sparsity)]
            W.scatter_(1, idx, 0.0)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_wanda_equals_reference(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model(tmp_path / "m", arch)
    calib = write_pairs(tmp_path / "c.jsonl", n=5)
    report = wanda(model_dir, calib, 0.5, tmp_path / "out")
    samples = calibration_samples(model_dir, calib, max_length=2048)
    ref = reference_wanda(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), samples, 0.5)
    ref_state = ref.state_dict()
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        meta = f.metadata()
        for name in f.keys():
            torch.testing.assert_close(f.get_tensor(name), ref_state[name], rtol=0, atol=0, msg=name)
    assert meta["surgery.method"] == "wanda" and json.loads(meta["surgery.params"])["sparsity"] == 0.5
    assert report.changed == report.selected == 2 * (2 * 32 * 16 + 2 * 16 * 16 + 2 * 48 * 16 + 32 * 24)
    saved = json.loads((tmp_path / "out" / "surgery_report.json").read_text())
    assert saved["totals"]["changed"] == report.changed
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    for name, value in ref_state.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
