"""Sort-free exact top-k selection on the CPU: the same masks as the sort reference, faster.

CPU tensors never reach the Triton kernels (the interpreter is far too slow for real
weights) and the sort reference costs ~30 ns per element; this path costs a few. The tie
rule is `reference`'s: the torch.sort(stable=True) order of fp32 scores, NaN on top (all
NaNs equal), -0.0 == +0.0. The tests compare it with the reference element for element.

scope="row". Rows are cut into blocks of about `_CPU_BLOCK` elements, which run on a pool
of `torch.get_num_threads()` threads. Each block goes to the compiled per-row radix select
(`_cpu_jit`, numba, GIL released; numba is imported on first use), which also counts the
weights it zeroes: about 2 ns per element on one core, against 3.7 for numpy's path.
Without numba (or with SURGERY_CPU_JIT=0) the numpy path runs: per block, an introselect
(`ndarray.partition`, into a reused per-thread buffer) puts each row's threshold T, its
k-th value, at a known position; every score >= T ("largest") or <= T ("smallest") is
selected. Whether a row has more ties at T than wanted is read off the partitioned buffer
(a value equal to T on the unselected side), so the usual row costs no counting pass; in
the rare rows that do, a cumulative count over the ties drops the surplus: the
lowest-index ties for "largest", the highest-index ones for "smallest", which is the sort
order. A block holding a NaN (found by `max`, which propagates it) is compared through
order-preserving int32 keys instead of floats.

scope="tensor": two 16-bit radix rounds of `numpy.bincount` histograms of those keys over
the blocks find T exactly, and a final pass selects with a running tie count in flat order.

`wanda_prune_cpu` scores each row block in fp32 exactly as `wanda_score_reference` does
(|W| times the correctly rounded sqrt of the norms: one IEEE multiply, so the same bits),
selects, and zeroes W in its own dtype: no full-size score or mask tensor. It returns how
many nonzero weights it zeroed, so a report needs no counting passes over the weights.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch

from ..wanda_score import _sqrt_rn

__all__ = ["select_cpu", "wanda_prune_cpu", "jit_available"]

_JIT_MODULE: list = []  # [module or None] once imported: numba loads on first use, not with the package

# Elements per row block: a block and its buffers stay in a core's L2 cache, and per-block
# Python overhead (a few microseconds) stays well under 1% of the block's work.
_CPU_BLOCK = 1 << 17

_POOL: ThreadPoolExecutor | None = None
_POOL_KEY = (0, 0)  # (threads, pid) the pool was made for
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _jit():
    """The compiled row select (`_cpu_jit`), or None where numba is missing or SURGERY_CPU_JIT=0."""
    if os.environ.get("SURGERY_CPU_JIT", "1") == "0":
        return None
    if not _JIT_MODULE:
        try:
            from . import _cpu_jit
        except ImportError:  # pragma: no cover - numba is a dependency; numpy stands in
            _cpu_jit = None
        _JIT_MODULE.append(_cpu_jit)
    return _JIT_MODULE[0]


def jit_available() -> bool:
    """Whether row selections take the compiled path (numba importable, SURGERY_CPU_JIT not 0)."""
    return _jit() is not None


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _run_blocks(task: Callable[[int], None], starts: range) -> None:
    """Run `task(start)` for every start: on the shared pool when there are several blocks and threads."""
    n = _threads()
    if n == 1 or len(starts) < 2:
        for s in starts:
            task(s)
        return
    global _POOL, _POOL_KEY
    with _POOL_LOCK:
        if _POOL is None or _POOL_KEY != (n, os.getpid()):  # a forked child has no pool threads
            if _POOL is not None and _POOL_KEY[1] == os.getpid():
                _POOL.shutdown(wait=False)
            _POOL, _POOL_KEY = ThreadPoolExecutor(n, thread_name_prefix="surgery-select"), (n, os.getpid())
        pool = _POOL
    futures = [pool.submit(task, s) for s in starts]
    wait(futures)  # every block finished (none still writing) before an error is raised
    for f in futures:
        f.result()


def _scratch(name: str, shape: tuple[int, ...], dtype: np.typing.DTypeLike) -> np.ndarray:
    """A per-thread buffer of this shape and dtype, reused across blocks (no page faults per block)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = getattr(_LOCAL, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(max(size, 1), dtype=np.uint8)
        setattr(_LOCAL, name, buf)
    return buf[:size].view(dtype).reshape(shape)


def _np_keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving int32 keys of fp32 values, as the kernels' `_ordered_key`: NaN on top, -0 == +0."""
    b = (x + np.float32(0.0)).view(np.int32)  # -0 + 0 = +0
    key = b ^ ((b >> 31) & np.int32(0x7FFFFFFF))
    key[np.isnan(x)] = 0x7FFFFFFF
    return key


def _row_block_select(x: np.ndarray, k: int, largest: bool, out: np.ndarray) -> None:
    """Write into `out` (bool, x's shape) the k largest (smallest) entries of every row of fp32 `x`."""
    n = x.shape[1]
    if k == 0 or k == n:
        out[...] = k != 0
        return
    if np.isnan(x.max()):  # float comparisons cannot order NaN: compare keys instead
        x = _np_keys(x)
    p = n - k if largest else k - 1  # T lands at column p; the selected side is [p:] or [:p + 1]
    part = _scratch("part", x.shape, x.dtype)
    np.copyto(part, x)
    part.partition(p, axis=1)
    thr = part[:, p : p + 1]
    if largest:
        np.greater_equal(x, thr, out=out)
        surplus = part[:, :p].max(axis=1) == thr[:, 0]  # a tie with T left unselected by the partition
    else:
        np.less_equal(x, thr, out=out)
        surplus = part[:, p + 1 :].min(axis=1) == thr[:, 0]
    bad = np.flatnonzero(surplus)
    if bad.size:
        extra = np.count_nonzero(out[bad], axis=1) - k  # ties at T beyond the count
        ties = x[bad] == thr[bad]
        # 1-based rank of each tie, from the low-index end ("largest" drops the first ones)
        # or from the high-index end ("smallest" drops the last ones).
        rank = np.cumsum(ties, axis=1) if largest else np.cumsum(ties[:, ::-1], axis=1)[:, ::-1]
        out[bad] &= ~(ties & (rank <= extra[:, None]))


def _tensor_select(blocks, numel: int, k: int, largest: bool, emit) -> None:
    """Exact per-tensor select: `blocks()` yields (where, fp32 ndarray) in flat order, once per pass;
    `emit(where, sel)` receives each block's bool selection in the final pass."""
    if k == 0 or k == numel:
        for where, x in blocks():
            emit(where, np.full(x.shape, k != 0, dtype=bool))
        return
    p = numel - k if largest else k - 1  # the threshold is the p-th smallest (0-based) key
    hist = np.zeros(65536, dtype=np.int64)
    for _, x in blocks():
        hist += np.bincount(((_np_keys(x) >> 16) + 32768).ravel(), minlength=65536)
    cum = np.cumsum(hist)
    hi = int(np.searchsorted(cum, p, side="right"))
    below = int(cum[hi - 1]) if hi else 0
    hist2 = np.zeros(65536, dtype=np.int64)
    for _, x in blocks():
        key = _np_keys(x).ravel()
        hist2 += np.bincount(key[(key >> 16) == hi - 32768] & 0xFFFF, minlength=65536)
    cum2 = np.cumsum(hist2)
    lo = int(np.searchsorted(cum2, p - below, side="right"))
    thr = np.int32(((hi - 32768) << 16) | lo)
    n_lt = below + (int(cum2[lo - 1]) if lo else 0)
    n_eq = int(hist2[lo])
    # Ties at thr come in flat order: "largest" drops the first `skip`, "smallest" keeps the first `take`.
    skip = n_eq - (k - (numel - n_lt - n_eq)) if largest else 0
    take = k - n_lt if not largest else n_eq
    seen = 0
    for where, x in blocks():
        key = _np_keys(x)
        sel = key > thr if largest else key < thr
        eq = key == thr
        c = int(np.count_nonzero(eq))
        if c:
            if seen >= skip and seen + c <= take:
                sel |= eq
            elif seen + c > skip and seen < take:
                rank = (seen + np.cumsum(eq.ravel())).reshape(eq.shape)  # 1-based flat rank among the ties
                sel |= eq & (rank > skip) & (rank <= take)
            seen += c
        emit(where, sel)


def select_cpu(scores: torch.Tensor, k: int, largest: bool, scope: str, out: torch.Tensor | None) -> torch.Tensor:
    """Exact top-k mask of CPU `scores` (the same mask as `topk_mask_reference`), sort-free, in row blocks."""
    direct = out is not None and out.shape == scores.shape and out.dtype == torch.bool and out.is_contiguous()
    mask = out if out is not None and direct else torch.empty(scores.shape, dtype=torch.bool)
    x = scores.detach()
    if x.numel() == 0:
        mask.fill_(False)
    elif scope == "row":
        n = x.shape[-1]
        x2 = x.reshape(-1, n)
        m2 = mask.view(x2.shape).numpy()
        rb = max(1, _CPU_BLOCK // max(n, 1))
        as_is = x2.dtype == torch.float32
        jit = _jit() if 0 < k < n else None

        def task(r0: int) -> None:
            xb = x2[r0 : r0 + rb].numpy() if as_is else x2[r0 : r0 + rb].float().numpy()
            if jit is not None:
                jit.select_rows(np.ascontiguousarray(xb), k, largest, m2[r0 : r0 + rb])
            else:
                _row_block_select(xb, k, largest, m2[r0 : r0 + rb])

        _run_blocks(task, range(0, x2.shape[0], rb))
    else:
        flat = x.reshape(-1)
        mflat = mask.view(-1).numpy()

        def blocks():
            for a in range(0, flat.numel(), _CPU_BLOCK):
                yield a, flat[a : a + _CPU_BLOCK].float().contiguous().numpy()

        def emit(a, sel):
            mflat[a : a + sel.size] = sel

        _tensor_select(blocks, flat.numel(), k, largest, emit)
    if out is not None and not direct:
        out.copy_(mask)
        return out
    return mask


def wanda_prune_cpu(W: torch.Tensor, sq_norms: torch.Tensor, k: int, largest: bool, scope: str) -> int:
    """Zero in place the k largest (smallest) Wanda scores of CPU W per row or per tensor;
    returns how many nonzero weights became zero."""
    n_rows, n = W.shape
    if W.numel() == 0:
        return 0
    Wd = W.detach()
    root = _sqrt_rn(sq_norms.detach()).contiguous().numpy()  # [n]: broadcasts over a block's rows
    rb = max(1, _CPU_BLOCK // n)
    as_is = Wd.dtype == torch.float32

    def score(w: torch.Tensor, into: np.ndarray) -> np.ndarray:
        np.abs(w.numpy() if as_is else w.float().numpy(), out=into)
        return np.multiply(into, root, out=into)

    def nonzero(w: torch.Tensor) -> int:  # numpy, not torch: no intra-op threads inside pool threads
        return int(np.count_nonzero(w.numpy())) if as_is else int(torch.count_nonzero(w))

    def zero(w: torch.Tensor, sel: np.ndarray) -> int:
        before = nonzero(w)
        if as_is:  # branch-free: AND the bits with 0 (selected, giving +0.0 as masked_fill_ does) or ~0
            keep = _scratch("keep", sel.shape, np.int32)
            np.subtract(sel, 1, dtype=np.int32, out=keep)
            bits = w.numpy().view(np.int32)
            np.bitwise_and(bits, keep, out=bits)
        else:
            w.masked_fill_(torch.from_numpy(sel), 0)
        return before - nonzero(w)

    changed = [0] * ((n_rows + rb - 1) // rb)
    if scope == "row" and k in (0, n):
        for r0 in range(0, n_rows, rb):
            changed[r0 // rb] = zero(Wd[r0 : r0 + rb], np.full((min(rb, n_rows - r0), n), k == n))
        return sum(changed)
    jit = _jit() if scope == "row" else None
    if jit is not None:

        def task(r0: int) -> None:
            w = Wd[r0 : r0 + rb]
            if as_is and w.is_contiguous():
                changed[r0 // rb] = jit.prune_rows(w.numpy(), root, k, largest)
            else:  # a contiguous fp32 copy, pruned, written back (exact: zeros or unchanged values)
                work = np.ascontiguousarray(w.float().numpy())
                changed[r0 // rb] = jit.prune_rows(work, root, k, largest)
                w.copy_(torch.from_numpy(work))

        _run_blocks(task, range(0, n_rows, rb))
        return sum(changed)
    if scope == "row":

        def task(r0: int) -> None:
            w = Wd[r0 : r0 + rb]
            s = score(w, _scratch("score", tuple(w.shape), np.float32))
            sel = _scratch("sel", tuple(w.shape), np.bool_)
            _row_block_select(s, k, largest, sel)
            changed[r0 // rb] = zero(w, sel)

        _run_blocks(task, range(0, n_rows, rb))
        return sum(changed)

    def blocks():
        for r0 in range(0, n_rows, rb):
            w = Wd[r0 : r0 + rb]
            yield r0, score(w, np.empty(tuple(w.shape), dtype=np.float32))

    def emit(r0, sel):
        changed[r0 // rb] = zero(Wd[r0 : r0 + rb], sel)

    _tensor_select(blocks, W.numel(), k, largest, emit)
    return sum(changed)
