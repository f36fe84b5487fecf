"""Shared Triton column reduction: out[j] = sum_i w_i * f(X[i, j]) in fp32, deterministic.

Used by `channel_sq_norms` (f = x^2, w = token mask) and `direction_ablate_`
(f = x, w = r). The grid is (column blocks, row splits); each program streams its
row range and writes an fp32 partial; the partials are summed in a fixed order, so
the same input gives the same bytes (no float atomics).
"""

from __future__ import annotations

import torch

from ._runtime import tl, triton

__all__ = ["column_reduce"]


@triton.jit
def _colreduce_kernel(
    X, Wt, PART, n_rows, n_cols, stride_x, rows_per_split,
    SQUARE: tl.constexpr, HAS_W: tl.constexpr, W_BOOL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    row_lo = pid_s.to(tl.int64) * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, n_rows)
    for off in range(0, rows_per_split, BLOCK_R):  # scalar-int bounds: portable to Triton 3.6's interpreter
        rows = row_lo + off + tl.arange(0, BLOCK_R)
        rmask = rows < row_hi
        if HAS_W:
            if W_BOOL:
                keep = tl.load(Wt + rows, mask=rmask, other=0) != 0
                rmask = rmask & keep
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        x = x.to(tl.float32)
        if SQUARE:
            x = x * x
        if HAS_W:
            if not W_BOOL:
                w = tl.load(Wt + rows, mask=rmask, other=0.0).to(tl.float32)
                x = x * w[:, None]
        acc += x
    tl.store(PART + pid_s.to(tl.int64) * n_cols + cols, tl.sum(acc, axis=0), mask=cmask)


def column_reduce(X: torch.Tensor, weights: torch.Tensor | None, square: bool, splits: int | None = None) -> torch.Tensor:
    """fp32 [n_cols]: sum over rows of (weights_i *) X[i, :] (squared if `square`).

    `weights` is a bool row mask (rows where it is False are skipped) or a float
    vector of row weights. X must have unit column stride.
    """
    n_rows, n_cols = X.shape
    out_dev = X.device
    if n_cols == 0:
        return torch.zeros(0, dtype=torch.float32, device=out_dev)
    if X.stride(1) != 1:
        X = X.contiguous()
    block_c = 128 if n_cols >= 128 else max(16, triton.next_power_of_2(n_cols))
    block_r = 32
    n_cblocks = triton.cdiv(n_cols, block_c)
    if splits is None:
        if X.is_cuda:
            sms = torch.cuda.get_device_properties(X.device).multi_processor_count
            splits = max(1, min(triton.cdiv(n_rows, 4 * block_r), triton.cdiv(4 * sms, n_cblocks)))
        else:
            splits = 1 if n_rows <= 256 else 2
    splits = max(1, min(int(splits), max(1, n_rows)))
    rows_per_split = triton.cdiv(max(n_rows, 1), splits)
    rows_per_split = triton.cdiv(rows_per_split, block_r) * block_r
    splits = triton.cdiv(max(n_rows, 1), rows_per_split)
    part = torch.empty((splits, n_cols), dtype=torch.float32, device=out_dev)
    has_w = weights is not None
    w_bool = weights is not None and weights.dtype == torch.bool
    if weights is not None:
        wt = weights.contiguous()
        if w_bool:
            wt = wt.view(torch.int8)
    else:
        wt = X
    _colreduce_kernel[(n_cblocks, splits)](
        X, wt, part, n_rows, n_cols, X.stride(0), rows_per_split,
        SQUARE=square, HAS_W=has_w, W_BOOL=w_bool, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return part[0] if splits == 1 else part.sum(0)
