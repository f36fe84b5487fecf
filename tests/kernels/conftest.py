"""Kernel tests run the Triton code: on a GPU natively, on CPU under the interpreter.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels, so it is set
here (only when there is no CUDA device: on a GPU the kernels run for real). If
`surgery.kernels` was already imported by another test directory without the
interpreter, its modules are reloaded so the kernels are interpreted. Other test
directories only pass CPU tensors, which take the PyTorch references unless
SURGERY_FORCE_TRITON=1, which is set per test here and nowhere else.
"""

from __future__ import annotations

import importlib
import os
import sys
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

_MODULES = [
    "surgery.kernels._runtime",
    "surgery.kernels._colreduce",
    "surgery.kernels.wanda_score",
    "surgery.kernels.topk_mask",
    "surgery.kernels.setdiff_mask",
    "surgery.kernels.safelora_project",
    "surgery.kernels.salora_project",
    "surgery.kernels.activation_stats",
    "surgery.kernels.rank_one",
    "surgery.kernels",
]


def _ensure_interpreted() -> None:
    mod = sys.modules.get("surgery.kernels.wanda_score")
    if HAS_CUDA or mod is None:
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(mod._wanda_score_kernel, InterpretedFunction):
        for name in _MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])


_ensure_interpreted()

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    """Every kernel test exercises the Triton path, also on CPU."""
    monkeypatch.setenv("SURGERY_FORCE_TRITON", "1")


_EMPTY = torch.empty
_EMPTY_LIKE = torch.empty_like


@pytest.fixture(autouse=True)
def _poisoned_allocations(monkeypatch):
    """Every buffer the ops allocate with torch.empty/empty_like starts poisoned (NaN floats,
    0x55 bools and ints), so an element a kernel fails to write cannot pass by luck."""

    def empty(*args, **kwargs):
        return poison_(_EMPTY(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison_(_EMPTY_LIKE(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs per case, reproducible runs."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||out - ref||_rms / ||ref||_rms in fp64 (fla-style error ratio)."""
    r = ref.double()
    d = out.double() - r
    denom = r.pow(2).mean().sqrt().item()
    return d.pow(2).mean().sqrt().item() / max(denom, 1e-30)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """out matches ref in shape, has no NaN/inf where ref is finite, and rel-RMS <= ratio."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out_c, ref_c = out.detach().cpu(), ref.detach().cpu()
    assert torch.isfinite(out_c).all() or not torch.isfinite(ref_c).all(), f"{name}: non-finite output"
    err = rel_rms(ref_c, out_c)
    assert err <= ratio, f"{name}: relative RMS error {err:.3e} > {ratio:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a buffer with values no kernel writes: NaN for floats, 0x55 for bools (neither 0 nor 1) and ints."""
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.view(torch.uint8).fill_(0x55)
    else:
        t.fill_(0x55)
    return t


def rand(shape, dtype=torch.float32, gen: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
    """Random normal tensor on the test device, never zeros."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
    x = torch.where(x == 0, torch.full_like(x, 0.5), x)
    return x.to(dtype).to(DEVICE)


@pytest.fixture
def helpers():
    """Shared helpers without import-path games (pytest uses --import-mode=importlib)."""

    class H:
        device = DEVICE
        rand = staticmethod(rand)
        poison_ = staticmethod(poison_)
        assert_close = staticmethod(assert_close)
        rel_rms = staticmethod(rel_rms)

    return H
