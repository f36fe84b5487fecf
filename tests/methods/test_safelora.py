"""Safe LoRA against a dense reference computation written out here (P = V V^T/||V||_F on lora_B)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.errors import SurgeryError
from surgery.methods.safelora import module_results, projected_modules, safelora, select_modules
from surgery.report import REPORT_FILE
from tests.factories import build_model, make_adapter

os.environ.setdefault("SURGERY_PROGRESS", "0")
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """base, aligned (= base + a low-rank change of every projection), adapter over aligned."""
    root = tmp_path_factory.mktemp("safelora")
    model = build_model("llama", seed=0)
    model.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "layers" in name:
                u = torch.randn(p.shape[0], 3, generator=gen)
                v = torch.randn(3, p.shape[1], generator=gen)
                p.add_(0.05 * u @ v)
    model.save_pretrained(root / "aligned")
    make_adapter(root / "aligned", root / "adapter", r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj", "down_proj"])
    return root / "base", root / "aligned", root / "adapter"


def dense_reference(base: Path, aligned: Path, adapter: Path, exact: bool) -> dict[str, tuple[float, torch.Tensor]]:
    """module -> (cosine, P B), all dense, straight from the formulas."""
    wb = load_file(str(base / "model.safetensors"))
    wa = load_file(str(aligned / "model.safetensors"))
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key in ad:
        if not key.endswith("lora_B.weight"):
            continue
        module = key[len(PREFIX):-len(".lora_B.weight")]
        V = (wa[module + ".weight"].double() - wb[module + ".weight"].double())
        if exact:
            # V's rank is 3; stored fp32 weights add noise far below fp32's rank tolerance
            P = V @ torch.linalg.pinv(V, rtol=max(V.shape) * torch.finfo(torch.float32).eps)
        else:
            P = V @ V.T / torch.linalg.norm(V)  # Frobenius norm, not squared
        B = ad[key].double()
        A = ad[key.replace("lora_B", "lora_A")].double()
        new = P @ B @ A
        old = B @ A
        cos = float((new * old).sum() / (new.norm() * old.norm()))
        out[module] = (cos, P @ B, float(new.norm() / old.norm()))
    return out


@pytest.mark.parametrize("exact", [False, True])
def test_number_mode_matches_dense_reference(trio, tmp_path: Path, exact: bool) -> None:
    base, aligned, adapter = trio
    ref = dense_reference(base, aligned, adapter, exact)
    report = safelora(adapter, base, aligned, tmp_path / "out", num_layers=3, exact=exact)
    cos = {m.module: m.cosine for m in module_results(report)}
    assert set(cos) == set(ref)
    ratio = {m.module: m.norm_ratio for m in module_results(report)}
    for module, (c, _, nr) in ref.items():
        assert cos[module] == pytest.approx(c, abs=1e-5)
        assert ratio[module] == pytest.approx(nr, rel=1e-4)
    lowest = sorted(ref, key=lambda m: ref[m][0])[:3]
    assert sorted(projected_modules(report)) == sorted(lowest)
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    orig = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(got) == set(orig)
    for key, t in got.items():
        module = key[len(PREFIX):].rsplit(".lora_", 1)[0]
        if key.endswith("lora_B.weight") and module in lowest:
            torch.testing.assert_close(t.double(), ref[module][1], atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(t, orig[key])
    if exact:  # the true projector is idempotent: projecting cannot make cos exceed 1 and P(PB) = PB
        assert all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in cos.values())


def test_threshold_mode_and_report(trio, tmp_path: Path) -> None:
    base, aligned, adapter = trio
    ref = dense_reference(base, aligned, adapter, exact=False)
    cosines = sorted(c for c, _, _ in ref.values())
    tau = (cosines[2] + cosines[3]) / 2  # exactly the three lowest fall below
    report = safelora(adapter, base, aligned, tmp_path / "out", threshold=tau)
    assert sorted(projected_modules(report)) == sorted(m for m in ref if ref[m][0] <= tau)
    assert len(projected_modules(report)) == 3
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert saved["metrics"]["mode"] == "threshold" and saved["metrics"]["n_projected"] == 3
    meta = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert meta == json.loads((adapter / "adapter_config.json").read_text())


def test_output_loads_in_peft_and_changes_only_projected(trio, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, aligned, adapter = trio
    report = safelora(adapter, base, aligned, tmp_path / "out", num_layers=2)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned), tmp_path / "out")
    ref = dense_reference(base, aligned, adapter, exact=False)
    for module in projected_modules(report):
        layer = model.get_submodule("base_model.model." + module)
        torch.testing.assert_close(layer.lora_B["default"].weight.double(), ref[module][1], atol=1e-5, rtol=1e-4)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["surgery.method"] == "safelora" and "aligned" in json.loads(md["surgery.inputs"])


def test_select_modules_rules() -> None:
    assert select_modules([0.3, 0.1, 0.1, 0.9], num_layers=2) == [False, True, True, False]
    assert select_modules([0.3, 0.1, 0.1, 0.9], num_layers=10) == [True] * 4
    assert select_modules([0.3, 0.5, 0.6], num_layers=None, threshold=0.5) == [True, True, False]
    with pytest.raises(SurgeryError):
        select_modules([0.1], num_layers=1, threshold=0.5)


def test_cli_json_and_bad_input(trio, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from surgery.cli.main import cli

    base, aligned, adapter = trio
    runner = CliRunner()
    res = runner.invoke(cli, ["safelora", str(adapter), "--base", str(base), "--aligned", str(aligned),
                              "-o", str(tmp_path / "o"), "--num-layers", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"]["n_projected"] == 1
    # an existing output is refused; a wrong base (other shapes) writes nothing
    res = runner.invoke(cli, ["safelora", str(adapter), "--base", str(base), "--aligned", str(aligned),
                              "-o", str(tmp_path / "o")])
    assert res.exit_code != 0
    wrong = tmp_path / "gpt2"
    build_model("gpt2").save_pretrained(wrong)
    with pytest.raises(SurgeryError):
        safelora(adapter, wrong, aligned, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_conv1d_layout_gpt2(tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights as [in, out]: V must be transposed before projecting lora_B [out, r]."""
    model = build_model("gpt2", seed=0)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "aligned")
    make_adapter(tmp_path / "aligned", tmp_path / "adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    report = safelora(tmp_path / "adapter", tmp_path / "base", tmp_path / "aligned", tmp_path / "out", num_layers=1)
    wb = load_file(str(tmp_path / "base" / "model.safetensors"))
    wa = load_file(str(tmp_path / "aligned" / "model.safetensors"))
    ad = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for m in module_results(report):
        V = (wa[m.weight].double() - wb[m.weight].double()).T  # [out, in]
        B = ad[f"{PREFIX}{m.module}.lora_B.weight"].double()
        A = ad[f"{PREFIX}{m.module}.lora_A.weight"].double()
        P = V @ V.T / torch.linalg.norm(V)
        new, old = P @ B @ A, B @ A
        assert m.cosine == pytest.approx(float((new * old).sum() / (new.norm() * old.norm())), abs=1e-5)
        if m.projected:
            torch.testing.assert_close(got[f"{PREFIX}{m.module}.lora_B.weight"].double(), P @ B, atol=1e-5, rtol=1e-4)
    assert len(projected_modules(report)) == 1


def test_same_inputs_same_bytes(trio, tmp_path: Path) -> None:
    base, aligned, adapter = trio
    safelora(adapter, base, aligned, tmp_path / "a", num_layers=3)
    safelora(adapter, base, aligned, tmp_path / "b", num_layers=3)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for n in names:
        if n == REPORT_FILE:  # the report names its own output path; everything else in it is equal
            ra, rb = (json.loads((tmp_path / d / n).read_text()) for d in ("a", "b"))
            assert ra.pop("out") != rb.pop("out") and ra == rb
            continue
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
