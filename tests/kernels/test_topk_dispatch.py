"""Which implementation the public top-k ops run: the Triton launchers under the
interpreter switch (or for CUDA tensors), the CPU select for plain CPU tensors.
Each path's result is held to the sort reference, so a route that silently fell back
to another implementation, or computed something else, fails here."""

from __future__ import annotations

import importlib

import pytest
import torch
from surgery.kernels import topk_mask, topk_mask_reference, wanda_prune_, wanda_prune_reference_

TRITON = importlib.import_module("surgery.kernels.topk.triton")
DISPATCH = importlib.import_module("surgery.kernels.topk.dispatch")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _counting(monkeypatch, module, name: str) -> list[int]:
    """Replace module.name by a wrapper that counts its calls; returns the counter."""
    calls = [0]
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _refuse(monkeypatch, module, name: str) -> None:
    def refuse(*_a, **_k):
        raise AssertionError(f"{name} must not run on this path")

    monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_switch_runs_the_triton_launchers(monkeypatch, scope, gen):
    """With SURGERY_FORCE_TRITON=1 (conftest) the kernels run, never the CPU select."""
    _refuse(monkeypatch, DISPATCH, "select_cpu")
    _refuse(monkeypatch, DISPATCH, "wanda_prune_cpu")
    launcher = "_row_launch" if scope == "row" else "_tensor_launch"
    calls = _counting(monkeypatch, TRITON, launcher)
    x = torch.randn(4, 300, generator=gen).to(DEV)
    assert torch.equal(topk_mask(x, 0.3, True, scope).cpu(), topk_mask_reference(x.cpu(), 0.3, True, scope))
    assert calls[0] == 1
    W = torch.randn(4, 300, generator=gen).to(DEV)
    s = (torch.rand(300, generator=gen) + 0.1).to(DEV)
    want = wanda_prune_reference_(W.cpu().clone(), s.cpu(), 0.5, False, scope)
    assert torch.equal(wanda_prune_(W, s, 0.5, False, scope).cpu(), want)
    assert calls[0] == 2


@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_cpu_tensors_take_the_cpu_select(monkeypatch, scope, gen):
    """Without the switch CPU tensors go to the sort-free CPU select, never to a launcher."""
    monkeypatch.setenv("SURGERY_FORCE_TRITON", "0")
    _refuse(monkeypatch, TRITON, "_row_launch")
    _refuse(monkeypatch, TRITON, "_tensor_launch")
    selects = _counting(monkeypatch, DISPATCH, "select_cpu")
    prunes = _counting(monkeypatch, DISPATCH, "wanda_prune_cpu")
    x = torch.randn(6, 200, generator=gen)
    assert torch.equal(topk_mask(x, 0.4, False, scope), topk_mask_reference(x, 0.4, False, scope))
    W = torch.randn(6, 200, generator=gen)
    s = torch.rand(200, generator=gen) + 0.1
    want = wanda_prune_reference_(W.clone(), s, 0.25, True, scope)
    assert torch.equal(wanda_prune_(W, s, 0.25, True, scope), want)
    assert (selects[0], prunes[0]) == (1, 1)
