"""The shape of a kernel benchmark: a `Case` (one op against one baseline) prepares a
`Trial` at a `Point` (shape, dtype, device); a `Suite` lists the cases measured together
over the same shapes. The runner (`benchmarks/kernels.py`) does the timing, the checks and
the tables, so a case says only what to run, what to compare and how many bytes it moves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Point:
    """One shape and dtype on one device, with the inputs the suite's cases share there."""

    shape: tuple[int, ...]
    dname: str
    dev: torch.device
    gen: torch.Generator
    quick: bool
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dname]

    def randn(self, *size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Normal values drawn on the CPU generator (the same numbers on every device), moved to the device."""
        x = torch.randn(*size, generator=self.gen, device="cpu", dtype=torch.float32)
        return x.to(self.dev, self.dtype if dtype is None else dtype)

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """Inputs several cases at this point use, drawn once by the first that asks."""
        if key not in self.inputs:
            self.inputs[key] = make()
        return self.inputs[key]


@dataclass
class Trial:
    """One prepared comparison: both callables, the result check and the bytes the op must move."""

    ours: Callable[[], object]
    baseline: Callable[[], object] | None  # None: nothing to time against (the baseline refuses)
    check: Callable[[], str]  # "exact", "rel 1.2e-07", ... or a string holding "MISMATCH"
    useful_bytes: int | None  # each input read once, each output written once; None: compute-bound
    shape: tuple[int, ...] | None = None  # the shape reported, when not the point's
    dtype: str | None = None  # the dtype reported, when not the point's
    note: str | Callable[[float], str] = ""  # a callable gets our median ms
    quick_ours: bool = False  # time with the short repeat count whatever --quick says
    quick_baseline: bool = False  # (for slow baselines)
    baseline_may_oom: bool = False  # a baseline out of memory is reported as no time
    setting: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # around check and timing


@dataclass(frozen=True)
class Case:
    """One op against one baseline; `prepare` returns None where the case skips this point."""

    op: str
    group: str  # the --ops group that selects it
    baseline: str
    prepare: Callable[[Point], Trial | None]


@dataclass(frozen=True)
class Suite:
    """Cases measured together: at every shape and dtype, `setup` draws the inputs they share,
    then each selected case prepares its trial in list order (one seed, one random stream)."""

    name: str
    cases: tuple[Case, ...]
    shapes: Callable[[bool], list[tuple[int, ...]]] | None = None  # by --quick; None: the --shapes grid
    dtypes: tuple[str, ...] | None = None  # None: the --dtypes list
    setup: Callable[[Point], None] = lambda point: None

    def points(self, shapes: list[tuple[int, ...]], dnames: list[str]) -> Iterator[tuple[tuple[int, ...], str]]:
        for shape in shapes:
            for dname in self.dtypes or dnames:
                yield shape, dname


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """fp32 matmuls in full fp32 (the SparseGPT baseline's accumulation), restored afterwards."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
