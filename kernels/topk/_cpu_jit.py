"""Compiled (numba) CPU row select: the per-row radix select of the Triton kernels, in one
pass over the data per row plus passes over a shrinking candidate list.

Imported by `cpu.py` (`select_cpu`), which falls back to its numpy path when numba is missing.
Functions work on one block of rows and release the GIL (`nogil`): `select_cpu` runs
blocks on its thread pool, so no numba threading layer is involved (numba's default one
aborts the process on concurrent launches from several Python threads).

Per row: every value becomes an order-preserving uint32 key (the fp32 bits, negatives
flipped, -0 == +0, every NaN the largest key). A 256-bin histogram of the top 8 bits finds
the bin holding the J-th smallest key; the keys in that bin are copied to a candidate list,
and three more 8-bit rounds over the shrinking list give the J-th smallest key T exactly and
how many keys equal to T belong to the first J. Long lists are counted into four
interleaved histograms, so that runs of one bin (clustered scores, or the zeros of a
pruned row) do not serialize on a single counter; a round whose bin holds every candidate
copies nothing. The selection is "keys < T, plus the first `rem` keys == T in index order"
(the torch.sort(stable=True) order). Usually every key == T is in (rem equals their count)
and one comparison per key decides; when the ties at T are split, a second pass walks them
in index order.

Cost on this project's 2-core VM, one thread: about 2.1 ns per element for a weight
matrix's rows, 5.5 for rows that are 90% zeros (the numpy fallback: 3.7 and 15).
"""

from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np

__all__ = ["prune_rows", "select_rows"]

_OPTS: dict[str, Any] = {"nogil": True, "cache": True, "boundscheck": False}


@nb.njit(inline="always", **_OPTS)
def _keys(vals, u, n):  # pragma: no cover - compiled
    """fp32 values -> order-preserving uint32 keys (-0 == +0, every NaN on top)."""
    bits = vals.view(np.int32)
    for i in range(n):
        x = vals[i]
        v = np.int32(0) if x == 0 else bits[i]
        ordered = v ^ ((v >> 31) & np.int32(0x7FFFFFFF))
        key = np.uint32(ordered) ^ np.uint32(0x80000000)
        u[i] = np.uint32(0xFFFFFFFF) if x != x else key


@nb.njit(inline="always", **_OPTS)
def _pick(hist, remaining):  # pragma: no cover - compiled
    """The bin holding the remaining-th smallest element and how many lie in lower bins."""
    cum = 0
    for b in range(256):
        h = hist[b]
        if cum + h >= remaining:
            return b, cum
        cum += h
    return 255, cum


@nb.njit(inline="always", **_OPTS)
def _histogram(keys, m, shift, h4, hist):  # pragma: no cover - compiled
    """hist = 256-bin histogram of byte (keys >> shift) & 255 over keys[:m]. Four interleaved
    copies, summed at the end, so that runs of one bin (clustered or repeated values) do not
    serialize on a single counter (one copy for short lists, where zeroing four costs more)."""
    if m < 1024:
        hist[:] = 0
        for i in range(m):
            hist[(keys[i] >> shift) & 255] += 1
        return
    h4[:] = 0
    i = 0
    while i + 4 <= m:
        h4[0, (keys[i] >> shift) & 255] += 1
        h4[1, (keys[i + 1] >> shift) & 255] += 1
        h4[2, (keys[i + 2] >> shift) & 255] += 1
        h4[3, (keys[i + 3] >> shift) & 255] += 1
        i += 4
    while i < m:
        h4[0, (keys[i] >> shift) & 255] += 1
        i += 1
    for b in range(256):
        hist[b] = h4[0, b] + h4[1, b] + h4[2, b] + h4[3, b]


@nb.njit(inline="always", **_OPTS)
def _threshold(u, n, j, h4, hist, cand):  # pragma: no cover - compiled
    """The j-th smallest key T (1 <= j <= n), how many keys == T are among the first j
    (`rem`), and how many keys == T there are."""
    _histogram(u, n, 24, h4, hist)  # the top byte over the whole row
    b, below = _pick(hist, j)
    rem = j - below
    prefix = np.uint32(b)
    m = 0
    for i in range(n):  # branch-free compaction: always store, advance when in the bin
        cand[m] = u[i]
        m += (u[i] >> 24) == prefix
    for shift in (16, 8, 0):
        _histogram(cand, m, shift, h4, hist)
        b, below = _pick(hist, rem)
        rem -= below
        prefix = (prefix << 8) | np.uint32(b)
        if shift and hist[b] != m:  # (one repeated value, zeros of a pruned row say, keeps them all)
            kept = 0
            for t in range(m):
                c = cand[t]
                cand[kept] = c
                kept += (c >> shift) == prefix
            m = kept
    return prefix, rem, hist[b]


@nb.njit(inline="always", **_OPTS)
def _bound(T, rem, ties, largest):  # pragma: no cover - compiled
    """Pass one selects keys > bound ("largest") or keys < bound ("smallest"), as int64: keys
    == T go to the tie pass, except for "smallest" when every tie is among the first j."""
    if largest or rem != ties:
        return np.int64(T)
    return np.int64(T) + 1


@nb.njit(inline="always", **_OPTS)
def _zero_selected(u, n, T, rem, ties, largest, w):  # pragma: no cover - compiled
    """Zero the selected weights of row w; return how many were nonzero."""
    changed = 0
    bound = _bound(T, rem, ties, largest)
    if largest:
        for i in range(n):
            x = w[i]
            sel = np.int64(u[i]) > bound
            changed += sel & (x != 0)
            w[i] = np.float32(0.0) if sel else x
    else:
        for i in range(n):
            x = w[i]
            sel = np.int64(u[i]) < bound
            changed += sel & (x != 0)
            w[i] = np.float32(0.0) if sel else x
    if rem != ties:  # ties split at T: the first `rem` in index order belong to the first j
        seen = 0
        for i in range(n):
            if u[i] == T:
                if (seen >= rem) == largest:
                    changed += w[i] != 0
                    w[i] = np.float32(0.0)
                seen += 1
    return changed


@nb.njit(inline="always", **_OPTS)
def _mark_selected(u, n, T, rem, ties, largest, out):  # pragma: no cover - compiled
    """out[i] = whether key i is selected (the same rule as `_zero_selected`)."""
    bound = _bound(T, rem, ties, largest)
    if largest:
        for i in range(n):
            out[i] = np.int64(u[i]) > bound
    else:
        for i in range(n):
            out[i] = np.int64(u[i]) < bound
    if rem != ties:
        seen = 0
        for i in range(n):
            if u[i] == T:
                out[i] = (seen >= rem) == largest
                seen += 1


@nb.njit(**_OPTS)
def prune_rows(W, root, k, largest):  # pragma: no cover - compiled
    """Zero in place, per row of fp32 W, the k largest (smallest) |W| * root under the tie
    rule (0 < k < n); returns how many nonzero weights became zero."""
    rows, n = W.shape
    j = n - k if largest else k
    vals = np.empty(n, np.float32)
    u = np.empty(n, np.uint32)
    h4 = np.empty((4, 256), np.int32)
    hist = np.empty(256, np.int32)
    cand = np.empty(n, np.uint32)
    changed = 0
    for r in range(rows):
        w = W[r]
        for i in range(n):
            vals[i] = abs(w[i]) * root[i]
        _keys(vals, u, n)
        T, rem, ties = _threshold(u, n, j, h4, hist, cand)
        changed += _zero_selected(u, n, T, rem, ties, largest, w)
    return changed


@nb.njit(**_OPTS)
def select_rows(X, k, largest, out):  # pragma: no cover - compiled
    """out[r, i] = whether X[r, i] is among the k largest (smallest) of row r of fp32 X (0 < k < n)."""
    rows, n = X.shape
    j = n - k if largest else k
    u = np.empty(n, np.uint32)
    h4 = np.empty((4, 256), np.int32)
    hist = np.empty(256, np.int32)
    cand = np.empty(n, np.uint32)
    for r in range(rows):
        _keys(X[r], u, n)
        T, rem, ties = _threshold(u, n, j, h4, hist, cand)
        _mark_selected(u, n, T, rem, ties, largest, out[r])
