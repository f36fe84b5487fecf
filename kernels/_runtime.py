"""Triton availability and the dispatch rule shared by every op.

Why a module of its own: every op decides the same way whether to run its Triton
kernel or its PyTorch reference, and the op modules must still import when Triton
is missing (macOS, CPU-only wheels), so `triton`/`tl` fall back to inert stubs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # pragma: no cover - depends on the platform
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

    class _Stub:
        """Stands in for `triton` / `triton.language` so kernel definitions still parse."""

        constexpr = Any
        int32 = int64 = float32 = float16 = bfloat16 = int8 = None

        def jit(self, fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("Triton is not installed; only the PyTorch references are available")

    triton = _Stub()  # type: ignore[assignment]
    tl = _Stub()  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "triton", "tl", "force_triton", "use_triton", "interpreting", "next_pow2", "device_fn"]


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def force_triton() -> bool:
    """True when `SURGERY_FORCE_TRITON=1` and `TRITON_INTERPRET=1`: run kernels on CPU tensors."""
    return os.environ.get("SURGERY_FORCE_TRITON", "0") == "1" and interpreting()


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether an op should take its Triton path for these tensors.

    CUDA tensors take Triton; CPU tensors take the reference unless Triton is forced
    under the interpreter (how the tests exercise kernel code without a GPU).
    """
    if not HAS_TRITON:
        return False
    ts = [t for t in tensors if t is not None]
    if ts and all(t.is_cuda for t in ts):
        return True
    if ts and force_triton() and all(t.device.type == "cpu" for t in ts):
        return True
    return False


def device_fn(fn):
    """Decorator for helpers called from kernels: `triton.jit` when compiling, the plain
    function under the interpreter (whose per-call re-patching of `triton.language` for
    nested jit functions dominates interpreter time; plain calls see the patched module)."""
    if HAS_TRITON and not interpreting():
        return triton.jit(fn)
    return fn


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())
