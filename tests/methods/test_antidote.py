"""Antidote: masks equal a plain whole-model torch.sort implementation of the published algorithm."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from surgery.cli.main import main
from torch import nn

from surgery.calib.data import calibration_samples
from surgery.methods.antidote import antidote, antidote_count
from surgery.methods.wanda import wanda
from tests.calib.helpers import tiny_model, write_pairs
from tests.factories import make_adapter

RATIO = 0.1


def _sq_norms_of_inputs(model, modules: dict[str, nn.Module], samples) -> dict[str, torch.Tensor]:
    sq = {n: torch.zeros(m.in_features) for n, m in modules.items()}

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            sq[name] += (x * x).sum(0)
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    with torch.no_grad():
        for s in samples:  # batch 1, whole sequence, as the reference calibrates
            model(s.input_ids[None])
    for h in hooks:
        h.remove()
    return sq


def _published_mask(metric: torch.Tensor, ratio: float) -> torch.Tensor:
    """prune_wanda_outlier: mask starts at ones; the lowest int(d*(1-ratio)) per row are set to 0."""
    mask = torch.ones_like(metric, dtype=torch.bool)
    idx = torch.sort(metric, dim=-1, stable=True)[1]
    mask.scatter_(1, idx[:, : int(metric.shape[1] * (1 - ratio))], False)
    return mask


def reference_antidote(layers, select, model, samples, ratio, aligned=None):
    """Layer by layer: stats with earlier layers already pruned, then prune the top-score share per row."""
    for layer in layers:
        mods = {n: m for n, m in layer.named_modules() if select(n, m)}
        sq = _sq_norms_of_inputs(model, mods, samples)
        for n, m in mods.items():
            W = m.weight.data
            if aligned is None:
                W.masked_fill_(_published_mask(W.abs() * sq[n].sqrt(), ratio), 0.0)
            else:
                W_al = aligned(layer, n)
                mask = _published_mask((W - W_al).abs() * sq[n].sqrt(), ratio)
                W.copy_(torch.where(mask, W_al, W))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model_dir = tiny_model(d / "m", request.param)
    calib = write_pairs(d / "harmful.jsonl", n=4, seed=3)
    return d, model_dir, calib, calibration_samples(model_dir, calib)


def test_count_rule():
    assert antidote_count(4096, 0.1) == 410 and int(4096 * 0.1) == 409  # the reference's 410/row of A at r=256
    assert antidote_count(4, 0.1) == 1 and antidote_count(256, 0.1) == 26


def test_adapter_equals_published(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d, model_dir, calib, samples = setup
    adapter = make_adapter(model_dir, d / "ft", target_modules=["q_proj", "v_proj", "up_proj"])
    out = d / "repaired_adapter"
    report = antidote(model_dir, calib, RATIO, out, adapter=adapter)

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter)
    layers = ref.base_model.model.model.layers
    reference_antidote(layers, lambda n, m: n.endswith(("lora_A.default", "lora_B.default")), ref, samples, RATIO)
    want = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), out)
    got_state = got.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got_state[k], v, rtol=0, atol=0, msg=k)
    # A is [4, 32] (4 of 32 per row), B is [d_out, 4] (1 of 4 per row, where int(4*0.1) would be 0)
    assert report.changed == report.selected == 2 * (3 * 4 * 4 + 32 + 16 + 48)
    saved = json.loads((out / "surgery_report.json").read_text())
    assert saved["totals"]["changed"] == report.changed and saved["config"]["mode"] == "adapter"
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert f.metadata()["surgery.method"] == "antidote-adapter"


def _check_model(out, want_state):
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in f.keys():
            torch.testing.assert_close(f.get_tensor(name), want_state[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_merged_equals_published(setup, scope):
    from transformers import AutoModelForCausalLM

    d, model_dir, calib, samples = setup
    out = d / f"repaired_{scope}"
    report = antidote(model_dir, calib, RATIO, out, scope=scope, samples=samples)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if scope == "row":
        reference_antidote(ref.model.layers, lambda n, m: isinstance(m, nn.Linear), ref, samples, RATIO)
    else:  # the same rule over the flattened matrix
        for layer in ref.model.layers:
            mods = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            sq = _sq_norms_of_inputs(ref, mods, samples)
            for n, m in mods.items():
                W = m.weight.data
                mask = _published_mask((W.abs() * sq[n].sqrt()).reshape(1, -1), RATIO).reshape(W.shape)
                W.masked_fill_(mask, 0.0)
    _check_model(out, ref.state_dict())
    assert report.changed == report.selected


def test_delta_aware_equals_reference(setup):
    from transformers import AutoModelForCausalLM

    d, model_dir, calib, samples = setup
    attacked = d / "attacked"  # a "fine-tuned" model: the aligned one with half its weights zeroed by Wanda
    wanda(model_dir, calib, 0.5, attacked, samples=samples)
    out = d / "repaired_delta"
    report = antidote(attacked, calib, RATIO, out, aligned=model_dir, samples=samples)
    aligned = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(attacked, dtype=torch.float32)
    al_layers = {id(layer): i for i, layer in enumerate(ref.model.layers)}

    def aligned_weight(layer, name):
        return aligned.model.layers[al_layers[id(layer)]].get_submodule(name).weight.data

    reference_antidote(ref.model.layers, lambda n, m: isinstance(m, nn.Linear), ref, samples, RATIO,
                       aligned=aligned_weight)
    _check_model(out, ref.state_dict())
    assert 0 < report.changed <= report.selected


def test_dry_run_writes_nothing_and_cli_reports(setup, capsys):
    d, model_dir, calib, _ = setup
    out = d / "dry"
    with pytest.raises(SystemExit) as info:
        main(["antidote", str(model_dir), "--calib", str(calib), "--ratio", "0.05", "-o", str(out),
              "--dry-run", "--targets", "v_proj,q_proj", "--json"])
    assert info.value.code == 0 and not out.exists()
    rep = json.loads(capsys.readouterr().out)
    assert rep["dry_run"] and {t["name"].split(".")[-2] for t in rep["tensors"]} == {"v_proj", "q_proj"}
    assert rep["totals"]["selected"] == 2 * (16 + 32) * antidote_count(32, 0.05)


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "holds no records"),
        (['{"prompt": "how do i", "response": "the"}', "{oops"], ":2: not valid JSON"),
        (['{"prompt": "how do i"}'], "missing field 'response'"),
        (['{"prompt": "' + "how " * 40 + '", "response": "the"}'], "more than the limit of 16"),
    ],
)
def test_bad_calibration_exit_2_nothing_written(setup, capsys, lines, message):
    d, model_dir, _, _ = setup
    bad = d / "bad.jsonl"
    bad.write_text("".join(line + "\n" for line in lines))
    for cmd in (["antidote", str(model_dir), "--ratio", "0.1"], ["wanda", str(model_dir), "--sparsity", "0.5"]):
        out = d / "bad_out"
        with pytest.raises(SystemExit) as info:
            main([*cmd, "--calib", str(bad), "-o", str(out), "--max-length", "16"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not out.exists() and not list(d.glob(".bad_out*"))
