"""The streaming diff: adapter form vs merged checkpoint, per-tensor problems, aggregates, names."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from surgery.analysis.diff import (
    ADAPTER_MISMATCH,
    CHANGED,
    MISSING_IN_A,
    MISSING_IN_B,
    SHAPE_MISMATCH,
    UNCHANGED,
    diff_checkpoints,
)
from surgery.analysis.names import parse_name
from surgery.io.merge import merge_adapter
from tests.factories import make_adapter, make_base

os.environ.setdefault("SURGERY_PROGRESS", "0")

METRICS = ("norm_w", "norm_delta", "rel_change", "cosine", "max_abs", "changed_share", "stable_rank",
           "effective_rank", "norm_v", "cosine_v", "energy_in_v")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diff")
    a = make_base(root / "a", "llama", seed=0)
    base = make_base(root / "base", "llama", seed=3)
    adapter = make_adapter(a, root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"], r=4)
    merged = root / "merged"
    merge_adapter(a, adapter, merged)
    return {"a": a, "base": base, "adapter": adapter, "merged": merged, "root": root}


def test_parse_name_generic() -> None:
    p = parse_name("model.layers.12.self_attn.q_proj.weight")
    assert (p.stack, p.layer, p.type) == ("model.layers", 12, "self_attn.q_proj")
    p = parse_name("transformer.h.0.mlp.c_proj.bias")
    assert (p.stack, p.layer, p.type) == ("transformer.h", 0, "mlp.c_proj")
    p = parse_name("model.layers.3.mlp.experts.17.down_proj.weight")
    assert (p.layer, p.type) == (3, "mlp.experts.*.down_proj")
    p = parse_name("model.embed_tokens.weight")
    assert (p.stack, p.layer, p.type) == (None, None, "model.embed_tokens")
    assert parse_name("lm_head.weight").type == "lm_head"


def test_adapter_form_equals_merged_checkpoint(models: dict[str, Path]) -> None:
    """Diffing A against the adapter (factored ΔW) gives the metrics of A against the merged checkpoint."""
    low = diff_checkpoints(models["a"], models["adapter"], base=models["base"], rank=3, top=4)
    dense = diff_checkpoints(models["a"], models["merged"], base=models["base"], rank=3, top=4)
    assert low.mode == "adapter" and dense.mode == "checkpoints"
    rows = {t.name: t for t in dense.tensors}
    assert [t.name for t in low.tensors] == [t.name for t in dense.tensors]
    lora_rows = [t for t in low.tensors if t.source == "lora"]
    assert len(lora_rows) == 6  # 3 modules x 2 layers
    for t in low.tensors:
        d = rows[t.name]
        assert t.status == d.status, t.name
        for name in METRICS:
            x, y = getattr(t.metrics, name), getattr(d.metrics, name)
            assert (x is None) == (y is None), (t.name, name)
            if x is not None:
                assert x == pytest.approx(y, rel=2e-4, abs=1e-6), (t.name, name)
        np.testing.assert_allclose(t.metrics.singular_values, d.metrics.singular_values, rtol=2e-4)
        if t.metrics.principal_angles is not None:
            np.testing.assert_allclose(t.metrics.principal_angles, d.metrics.principal_angles, atol=2e-3)
    q = next(t for t in lora_rows if t.module_type == "self_attn.q_proj")
    assert q.metrics.spectrum == "lowrank" and q.metrics.numerical_rank == 4
    assert rows[q.name].metrics.spectrum == "exact" and rows[q.name].metrics.numerical_rank == 4


def test_only_adapter_targets_move(models: dict[str, Path]) -> None:
    report = diff_checkpoints(models["a"], models["adapter"])
    moved = {parse_name(n).type for n in report.changed}
    assert moved == {"self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"}
    assert len(report.changed) == 6
    assert all(t.metrics.norm_delta == 0 for t in report.tensors if t.status == UNCHANGED)
    layers, types, grid = report.grid()
    assert layers == ["0", "1"]
    for row in grid:
        for typ, value in zip(types, row):
            assert (value > 0) == (typ in moved)


def test_alignment_reversal_is_seen(models: dict[str, Path], tmp_path: Path) -> None:
    """B = A − 0.5·V (half the alignment update undone): cosine(V, ΔW) = −1, angles 0, all energy in V."""
    from surgery.io.checkpoint import Checkpoint

    a, base = Checkpoint.open(models["a"]), Checkpoint.open(models["base"])
    state = {n: a.get(n) - 0.5 * (a.get(n) - base.get(n)) for n in a.names()}
    save_file(state, str(tmp_path / "model.safetensors"))
    report = diff_checkpoints(models["a"], tmp_path, base=models["base"], rank=4)
    for t in report.tensors:
        m = t.metrics
        assert t.status == CHANGED
        assert m.cosine_v == pytest.approx(-1.0, abs=1e-5)
        assert m.rel_change == pytest.approx(0.5 * m.norm_v / m.norm_w, rel=1e-4)
        if m.principal_angles is not None:
            assert max(m.principal_angles) < 2e-2  # same subspace (up to fp32 rounding of ΔW)
            # ΔW ∝ V, so its energy inside V's top-4 subspace is its own top-4 share
            top4 = sum(s * s for s in m.singular_values[:4]) / m.norm_delta**2
            assert m.energy_in_v == pytest.approx(top4, rel=1e-3)
    for agg in report.by_layer():
        assert agg.cosine_v == pytest.approx(-1.0, abs=1e-5)


def test_missing_keys_and_shape_mismatches_reported_per_tensor(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g)
    save_file({"x": x, "y": torch.ones(5), "only_a": torch.ones(2, 2), "n": torch.arange(3)},
              str(tmp_path / "a.safetensors"))
    save_file({"x": x + 1.0, "y": torch.ones(6), "only_b": torch.ones(3), "n": torch.arange(3)},
              str(tmp_path / "b.safetensors"))
    report = diff_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    status = {t.name: t.status for t in report.tensors}
    assert status == {"x": CHANGED, "y": SHAPE_MISMATCH, "only_a": MISSING_IN_B, "only_b": MISSING_IN_A,
                      "n": UNCHANGED}
    xrow = next(t for t in report.tensors if t.name == "x")
    assert xrow.metrics.max_abs == pytest.approx(1.0) and xrow.metrics.changed_share == 1.0
    # ΔW = all-ones: rank one, stable and effective rank 1, σ₁ = sqrt(24)
    assert xrow.metrics.stable_rank == pytest.approx(1.0, rel=1e-5)
    assert xrow.metrics.effective_rank == pytest.approx(1.0, rel=1e-5)
    assert xrow.metrics.singular_values == [pytest.approx(24**0.5, rel=1e-5)]
    assert "A [5] vs B [6]" in next(t for t in report.tensors if t.name == "y").note
    d = report.to_dict()
    assert d["counts"][SHAPE_MISMATCH] == 1 and d["tensors"][0]["name"] == "x"


def test_adapter_module_that_does_not_fit_is_a_row(models: dict[str, Path], tmp_path: Path) -> None:
    from surgery.io.checkpoint import Checkpoint

    a = Checkpoint.open(models["a"])
    state = {n: a.get(n).clone() for n in a.names()}
    state["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(8, 8)
    del state["model.layers.0.mlp.down_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    report = diff_checkpoints(tmp_path, models["adapter"])
    bad = report.by_status(ADAPTER_MISMATCH)
    assert sorted(t.name for t in bad) == ["model.layers.0.mlp.down_proj.weight",
                                           "model.layers.1.self_attn.q_proj.weight"]
    assert len(report.changed) == 4


def test_bf16_checkpoints_are_diffed_in_fp32(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 12, generator=g).to(torch.bfloat16)
    b = (a.float() + 0.05 * torch.randn(16, 12, generator=g)).to(torch.bfloat16)
    b[0, 0] = a[0, 0]
    save_file({"model.layers.0.mlp.up_proj.weight": a}, str(tmp_path / "a.safetensors"))
    save_file({"model.layers.0.mlp.up_proj.weight": b}, str(tmp_path / "b.safetensors"))
    row = diff_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors").tensors[0]
    an, bn = a.double().numpy(), b.double().numpy()
    d = bn - an
    assert (row.dtype_a, row.dtype_b) == ("BF16", "BF16")
    assert row.metrics.rel_change == pytest.approx(np.linalg.norm(d) / np.linalg.norm(an), rel=1e-6)
    assert row.metrics.changed_share == pytest.approx(np.count_nonzero(d) / d.size)
    assert row.metrics.changed_share < 1.0
    np.testing.assert_allclose(row.metrics.singular_values, np.linalg.svd(d, compute_uv=False)[:8], rtol=1e-5)


def test_gpt2_conv1d_adapter_form_equals_merged(tmp_path: Path) -> None:
    """fan_in_fan_out (Conv1D weights stored [in, out]): the factored ΔW is transposed correctly."""
    a = make_base(tmp_path / "a", "gpt2", seed=0)
    adapter = make_adapter(a, tmp_path / "adapter", target_modules=["c_attn", "c_fc"], r=2)
    merge_adapter(a, adapter, tmp_path / "merged")
    low = diff_checkpoints(a, adapter, rank=2)
    dense = {t.name: t for t in diff_checkpoints(a, tmp_path / "merged", rank=2).tensors}
    moved = [t for t in low.tensors if t.status == CHANGED]
    assert len(moved) == 4 and all(t.source == "lora" for t in moved)
    assert {t.module_type for t in moved} == {"attn.c_attn", "mlp.c_fc"}
    for t in moved:
        d = dense[t.name].metrics
        for name in ("rel_change", "cosine", "max_abs", "stable_rank", "effective_rank"):
            assert getattr(t.metrics, name) == pytest.approx(getattr(d, name), rel=2e-4), (t.name, name)
        np.testing.assert_allclose(t.metrics.singular_values, d.singular_values, rtol=2e-4)
