"""The landscape path: weights at α equal (1 − α)·A + α·B; endpoints are A and B (merged) exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from surgery.analysis.landscape import alpha_grid, path_setters
from surgery.errors import MismatchError, SurgeryError
from surgery.io.adapter import LoraAdapter
from surgery.io.checkpoint import Checkpoint
from surgery.io.merge import merge_adapter
from tests.factories import make_adapter, make_base

os.environ.setdefault("SURGERY_PROGRESS", "0")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("landscape")
    a = make_base(root / "a", "llama", seed=0)
    adapter = make_adapter(a, root / "adapter", target_modules=["q_proj", "o_proj"])
    merge_adapter(a, adapter, root / "merged")
    return {"a": a, "b": make_base(root / "b", "llama", seed=1), "adapter": adapter, "merged": root / "merged"}


def test_alpha_grid() -> None:
    assert alpha_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert alpha_grid(3, -0.5, 1.5) == [-0.5, 0.5, 1.5]
    with pytest.raises(SurgeryError):
        alpha_grid(1)
    with pytest.raises(SurgeryError):
        alpha_grid(3, 1.0, 0.0)


def test_checkpoint_path_is_the_straight_line(models: dict[str, Path]) -> None:
    a, b = Checkpoint.open(models["a"]), Checkpoint.open(models["b"])
    setters = path_setters(a, b)
    assert set(setters) == set(a.names())
    for name, setter in setters.items():
        wa, wb = a.get(name).float(), b.get(name).float()
        assert torch.equal(setter(0.0), wa) and torch.equal(setter(1.0), wb)
        torch.testing.assert_close(setter(0.3), 0.7 * wa + 0.3 * wb, rtol=1e-6, atol=1e-6)
    assert torch.equal(a.get(name).float(), wa)  # A's tensors are never modified in place


def test_adapter_path_scales_the_delta(models: dict[str, Path]) -> None:
    a = Checkpoint.open(models["a"])
    lora = LoraAdapter.open(models["adapter"])
    merged = Checkpoint.open(models["merged"])
    setters = path_setters(a, lora)
    assert sorted(setters) == sorted(n for n in a.names() if n.endswith(("q_proj.weight", "o_proj.weight")))
    for name, setter in setters.items():
        wa = a.get(name).float()
        assert torch.equal(setter(0.0), wa)
        torch.testing.assert_close(setter(1.0), merged.get(name).float(), rtol=1e-6, atol=1e-6)
        delta = merged.get(name).float() - wa
        torch.testing.assert_close(setter(-0.5), wa - 0.5 * delta, rtol=1e-5, atol=1e-5)


def test_mismatched_checkpoints_refused(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    a = Checkpoint.open(models["a"])
    state = {n: a.get(n) for n in a.names()}
    state.pop("lm_head.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(MismatchError, match="only in A"):
        path_setters(a, Checkpoint.open(tmp_path))


def test_only_differing_tensors_move(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    a = Checkpoint.open(models["a"])
    state = {n: a.get(n).clone() for n in a.names()}
    state["model.norm.weight"] = state["model.norm.weight"] * 2
    save_file(state, str(tmp_path / "model.safetensors"))
    setters = path_setters(a, Checkpoint.open(tmp_path))
    assert list(setters) == ["model.norm.weight"]
    torch.testing.assert_close(setters["model.norm.weight"](0.5), 1.5 * a.get("model.norm.weight"))
