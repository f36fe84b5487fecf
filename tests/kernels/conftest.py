"""Kernel tests run the Triton code: on a GPU natively, on CPU under the interpreter.

The interpreter only works if TRITON_INTERPRET=1 is set before `triton` itself is imported
(its own `triton.language` helpers are jit functions decorated at import). So this file sets
it when there is no CUDA device (on a GPU the kernels run for real). If another test
directory imported Triton earlier in the same session (a full-suite run: the methods import
`surgery.kernels`), the in-process kernel tests are skipped and `test_in_clean_process` runs
this directory in a fresh interpreter instead, so nothing goes untested. Other directories
only pass CPU tensors, which take the PyTorch references: SURGERY_FORCE_TRITON=1 is set per
kernel test here and nowhere else.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HERE = Path(__file__).resolve().parent


def _triton_compiled_mode_already() -> bool:
    """True if Triton was imported before TRITON_INTERPRET=1 was set (interpreter unusable)."""
    if "triton" not in sys.modules:
        return False
    try:
        from triton.language import standard
    except Exception:
        return False
    return type(standard.sum).__name__ == "JITFunction"


CONTAMINATED = False
if not HAS_CUDA:
    CONTAMINATED = _triton_compiled_mode_already()
    os.environ["TRITON_INTERPRET"] = "1"

_SUBPROCESS_SAFE = {"test_compile.py", "test_clean_process.py"}


@pytest.fixture
def kernels_contaminated() -> bool:
    """Whether Triton was imported without the interpreter before this directory was collected."""
    return CONTAMINATED


def pytest_collection_modifyitems(config, items):
    if not CONTAMINATED:
        return
    skip = pytest.mark.skip(reason="Triton was imported without the interpreter earlier in this session; "
                                   "tests/kernels runs in a fresh process (test_in_clean_process)")
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.parent == HERE and path.name not in _SUBPROCESS_SAFE:
            item.add_marker(skip)


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
