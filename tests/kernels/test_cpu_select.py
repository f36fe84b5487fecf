"""The CPU selection path (`select_cpu`, `wanda_prune_cpu`) equals the sort reference exactly.

The dispatchers send CPU tensors there (this directory forces Triton, so each test turns
the switch off). Blocks are shrunk so that every case spans several row blocks and, for
scope="tensor", ties straddle block boundaries.
"""

from __future__ import annotations

import pytest
import surgery.kernels.topk.cpu as cpu
import torch
from surgery.kernels import topk_mask, topk_mask_reference, wanda_prune_, wanda_prune_reference_

SHAPES = [(1, 1), (1, 37), (37, 1), (5, 17), (7, 64), (3, 2, 33), (13, 130)]
KINDS = ["random", "ties", "signed_zero", "inf_nan", "constant"]


@pytest.fixture(autouse=True, params=["jit", "numpy"])
def _cpu_path(request, monkeypatch):
    """Every test runs on both CPU implementations: the compiled row select and numpy's."""
    monkeypatch.setenv("SURGERY_FORCE_TRITON", "0")
    monkeypatch.setenv("SURGERY_CPU_JIT", "1" if request.param == "jit" else "0")
    monkeypatch.setattr(cpu, "_CPU_BLOCK", 64)
    if request.param == "jit":
        assert cpu.jit_available()
    return request.param


def make(kind: str, shape, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(shape, generator=gen)
    x = torch.randint(-3, 4, shape, generator=gen).float()
    if kind == "ties":
        return x
    if kind == "signed_zero":  # -0.0 and +0.0 mixed with a few small integers
        zero = torch.where(torch.rand(shape, generator=gen) < 0.5, -0.0, 0.0)
        return torch.where(x.abs() <= 1, zero, x)
    if kind == "inf_nan":
        x = torch.where(x == 3, float("nan"), x)
        x = torch.where(x == -3, float("-inf"), x)
        x = torch.where(x == 2, float("inf"), x)
        return torch.where(x == -2, -0.0, x)
    return torch.zeros(shape)


def counts(n: int) -> list[int]:
    return sorted({0, 1, max(n - 1, 0), n, n // 2, n // 3})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_mask_equals_reference(shape, kind, dtype, gen):
    x = make(kind, shape, gen).to(dtype)
    for scope in ("row", "tensor"):
        n = x.shape[-1] if scope == "row" else x.numel()
        for k in counts(n):
            for largest in (True, False):
                ref = topk_mask_reference(x, 0.0, largest, scope, k=k)
                got = topk_mask(x, 0.0, largest, scope, k=k)
                assert torch.equal(got, ref), (scope, k, largest)
                out = torch.empty(x.shape, dtype=torch.bool)
                assert topk_mask(x, 0.0, largest, scope, k=k, out=out) is out
                assert torch.equal(out, ref), (scope, k, largest, "out=")


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_ratio_count_and_input_untouched(ratio, gen):
    x = torch.randint(0, 5, (9, 31), generator=gen).to(torch.bfloat16)
    before = x.clone()
    for scope in ("row", "tensor"):
        for largest in (True, False):
            assert torch.equal(topk_mask(x, ratio, largest, scope), topk_mask_reference(x, ratio, largest, scope))
    assert torch.equal(x, before)


def test_non_contiguous_and_float64(gen):
    x = torch.randint(0, 4, (40, 23), generator=gen).double().t()  # rounding to fp32 as the reference does
    for scope in ("row", "tensor"):
        for largest in (True, False):
            assert torch.equal(topk_mask(x, 0.3, largest, scope), topk_mask_reference(x, 0.3, largest, scope))


def test_empty():
    for shape in [(0, 5), (4, 0)]:
        x = torch.empty(shape)
        for scope in ("row", "tensor"):
            got = topk_mask(x, 0.5, True, scope)
            assert got.shape == x.shape and got.dtype == torch.bool
            if shape == (0, 5) or scope == "tensor":  # the reference cannot reshape (4, 0) per row
                assert torch.equal(got, topk_mask_reference(x, 0.5, True, scope))


@pytest.mark.parametrize("block", [1, 64, 1 << 19])
def test_block_size_does_not_matter(block, monkeypatch, gen):
    monkeypatch.setattr(cpu, "_CPU_BLOCK", block)
    x = torch.randint(0, 3, (17, 29), generator=gen).float()
    for scope in ("row", "tensor"):
        for k in (1, 7, 28 if scope == "row" else 400):
            for largest in (True, False):
                assert torch.equal(topk_mask(x, 0, largest, scope, k=k), topk_mask_reference(x, 0, largest, scope, k=k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "ties", "signed_zero", "nan_norm"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 41), (41, 1), (6, 19), (19, 70)])
def test_wanda_prune_equals_reference(shape, kind, dtype, gen):
    if kind == "random":
        W = torch.randn(shape, generator=gen)
        s = torch.rand(shape[1], generator=gen) * 4
    else:  # integer weights and norms: many equal scores within and across rows
        W = torch.randint(-2, 3, shape, generator=gen).float()
        s = torch.randint(0, 3, (shape[1],), generator=gen).float() ** 2
        if kind == "signed_zero":
            W = torch.where(W == 0, torch.where(torch.rand(shape, generator=gen) < 0.5, -0.0, 0.0), W)
        if kind == "nan_norm":  # a negative norm gives NaN scores in a whole column
            s[0] = -1.0
    W = W.to(dtype)
    for scope in ("row", "tensor"):
        n = shape[1] if scope == "row" else W.numel()
        for k in counts(n):
            for largest in (True, False):
                ref = wanda_prune_reference_(W.clone(), s, 0.0, largest, scope, k=k)
                got = W.clone()
                assert wanda_prune_(got, s, 0.0, largest, scope, k=k) is got
                assert got.dtype == dtype
                # bitwise: the kept weights keep their exact bits, zeros are +0 as masked_fill_ writes
                assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                   ref.view(torch.int16 if dtype != torch.float32 else torch.int32)), (scope, k, largest)


def test_wanda_prune_non_contiguous_view(gen):
    base = torch.randn(30, 24, generator=gen).to(torch.bfloat16)
    s = torch.rand(30, generator=gen)
    for largest in (True, False):
        got = base.clone()
        ref = base.clone()
        wanda_prune_(got.t(), s, 0.25, largest, "row")
        wanda_prune_reference_(ref.t(), s, 0.25, largest, "row")
        assert torch.equal(got, ref)


def test_dispatch_takes_the_cpu_path(monkeypatch, gen):
    """CPU tensors never reach the sort: the reference is not called."""

    def boom(*args, **kwargs):
        raise AssertionError("the CPU path called torch.sort")

    x = torch.randn(8, 50, generator=gen)
    ref = topk_mask_reference(x, 0.1, True, "row")
    W = torch.randn(8, 50, generator=gen)
    s = torch.rand(50, generator=gen)
    W_ref = wanda_prune_reference_(W.clone(), s, 0.5)
    monkeypatch.setattr(torch, "sort", boom)
    assert torch.equal(topk_mask(x, 0.1, True, "row"), ref)
    assert torch.equal(wanda_prune_(W, s, 0.5), W_ref)
    for scope in ("row", "tensor"):
        topk_mask(x, 0.3, False, scope)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_matter(threads, monkeypatch, gen):
    """Row blocks run on a pool of torch.get_num_threads() threads; one thread gives the same mask."""
    monkeypatch.setattr(cpu, "_CPU_BLOCK", 1 << 12)  # several blocks of real-sized rows
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(40, 700, generator=gen)
        x[::3, ::7] = 0.5  # rows with many ties at some thresholds
        W = torch.randn(40, 700, generator=gen)
        s = torch.rand(700, generator=gen)
        for k in (1, 70, 350, 699):
            for largest in (True, False):
                assert torch.equal(topk_mask(x, 0, largest, "row", k=k), topk_mask_reference(x, 0, largest, "row", k=k))
                ref = wanda_prune_reference_(W.clone(), s, 0, largest, "row", k=k)
                assert torch.equal(wanda_prune_(W.clone(), s, 0, largest, "row", k=k), ref)
    finally:
        torch.set_num_threads(before)


def test_worker_error_reaches_the_caller(monkeypatch):
    """An exception inside a pooled block is raised in the caller, not lost in the pool."""

    def boom(*args, **kwargs):
        raise RuntimeError("block failed")

    monkeypatch.setattr(cpu, "_row_block_select", boom)
    if cpu._jit() is not None:
        monkeypatch.setattr(cpu._jit(), "select_rows", boom)
    with pytest.raises(RuntimeError, match="block failed"):
        topk_mask(torch.randn(64, 64), 0.5, True, "row")


def test_prune_count_is_the_number_of_nonzero_weights_zeroed(gen):
    """`wanda_prune_count_` returns exactly how many nonzero weights became zero, also when some
    selected weights were already zero."""
    from surgery.kernels import wanda_prune_count_

    W = torch.randint(-2, 3, (23, 57), generator=gen).float()  # about a fifth already zero
    s = torch.rand(57, generator=gen) + 0.1
    for dtype in (torch.float32, torch.bfloat16):
        for scope in ("row", "tensor"):
            for largest in (True, False):
                got = W.to(dtype)
                before = int(torch.count_nonzero(got))
                changed = wanda_prune_count_(got, s, 0.3, largest, scope)
                assert changed == before - int(torch.count_nonzero(got)), (dtype, scope, largest)
                ref = wanda_prune_reference_(W.to(dtype), s, 0.3, largest, scope)
                assert torch.equal(got, ref)


@pytest.mark.parametrize("n", [2048, 5632])
def test_real_shaped_rows(n, monkeypatch, gen):
    """Rows shaped and distributed like a model's (bf16-rounded weights, many in one exponent
    bin, exact ties across columns) match the sort reference, at Antidote's and Wanda's counts."""
    monkeypatch.setattr(cpu, "_CPU_BLOCK", 1 << 17)
    W = (torch.randn(48, n, generator=gen) * 0.02).to(torch.bfloat16).float()
    s = torch.randint(1, 4, (n,), generator=gen).float()  # equal norms: equal scores within a row
    for k, largest in ((n - int(n * 0.9), True), (n // 2, False)):
        ref = wanda_prune_reference_(W.clone(), s, 0, largest, "row", k=k)
        assert torch.equal(wanda_prune_(W.clone(), s, 0, largest, "row", k=k), ref)
        scores = W.abs() * s.sqrt()
        assert torch.equal(topk_mask(scores, 0, largest, "row", k=k), topk_mask_reference(scores, 0, largest, "row", k=k))


def test_pool_survives_fork(gen):
    """A forked child (a DataLoader worker, say) inherits no pool threads: its selections still run."""
    import multiprocessing as mp

    x = torch.randn(64, 64, generator=gen)
    ref = topk_mask_reference(x, 0.3, True, "row")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(topk_mask(x, 0.3, True, "row"), ref)  # the parent's pool exists now
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_select_in_child, (x,)).get(timeout=60)
        assert torch.equal(got, ref)
    finally:
        torch.set_num_threads(before)


def _select_in_child(x: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(2)
    return topk_mask(x, 0.3, True, "row")


@pytest.mark.parametrize("zeros", [0.5, 0.9, 1.0])
def test_rows_of_mostly_one_value(zeros, monkeypatch, gen):
    """Rows that are mostly zeros (a pruned model pruned again): long candidate lists of one
    repeated key, the threshold inside them or just above, match the sort reference."""
    monkeypatch.setattr(cpu, "_CPU_BLOCK", 1 << 17)
    n = 5632
    W = torch.randn(24, n, generator=gen)
    W[torch.rand(W.shape, generator=gen) < zeros] = 0
    s = torch.rand(n, generator=gen) + 0.5
    for k in (1, n // 10, n // 2, n - int(n * zeros) + 3, n - 1):
        for largest in (True, False):
            ref = wanda_prune_reference_(W.clone(), s, 0, largest, "row", k=k)
            assert torch.equal(wanda_prune_(W.clone(), s, 0, largest, "row", k=k), ref), (k, largest)
