"""Rank-one weight edits in place, in W's dtype with fp32 math.

- `rank_one_update_(W, u, v)`: W += u v^T (ROME's edit; u [d_out], v [d_in]).
- `direction_ablate_(W, r)`: W -= r_hat (r_hat^T W), r_hat = r / ||r|| (normalised
  inside), removing the direction r from the output space of W [d_out, d_in]
  (refusal-direction ablation on matrices that write to the residual stream).
Each element is computed as fp32(W) + fp32(u_i) fp32(v_j) and rounded once to W's
dtype; the outer product is never materialised.
"""

from __future__ import annotations

import torch

from ._colreduce import column_reduce
from ._runtime import interpreting, tl, triton, use_triton

__all__ = ["rank_one_update_", "rank_one_update_reference_", "direction_ablate_", "direction_ablate_reference_"]


def _check(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    if W.dim() != 2 or u.dim() != 1 or v.dim() != 1 or u.shape[0] != W.shape[0] or v.shape[0] != W.shape[1]:
        raise ValueError(
            f"need W [d_out, d_in], u [d_out], v [d_in]; got {tuple(W.shape)}, {tuple(u.shape)}, {tuple(v.shape)}"
        )


def rank_one_update_reference_(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W += u v^T in place via a materialised fp32 outer product; returns W."""
    _check(W, u, v)
    W.copy_((W.float() + torch.outer(u.float(), v.float())).to(W.dtype))
    return W


def _unit(r: torch.Tensor) -> torch.Tensor:
    rf = r.float()
    n = torch.linalg.vector_norm(rf)
    if float(n) == 0.0:
        raise ValueError("direction r must be non-zero")
    return rf / n


def direction_ablate_reference_(W: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W -= r_hat (r_hat^T W) in place with r_hat = r / ||r||, dense fp32; returns W."""
    if W.dim() != 2 or r.dim() != 1 or r.shape[0] != W.shape[0]:
        raise ValueError(f"need W [d_out, d_in] and r [d_out]; got {tuple(W.shape)}, {tuple(r.shape)}")
    rh = _unit(r)
    Wf = W.float()
    W.copy_((Wf - torch.outer(rh, rh @ Wf)).to(W.dtype))
    return W


@triton.jit
def _rank_one_kernel(
    W, U, V, n_rows, n_cols, stride_w, alpha, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    cmask = cols < n_cols
    m2 = rmask[:, None] & cmask[None, :]
    u = tl.load(U + rows, mask=rmask, other=0.0).to(tl.float32) * alpha
    v = tl.load(V + cols, mask=cmask, other=0.0).to(tl.float32)
    ptr = W + rows[:, None] * stride_w + cols[None, :]
    w = tl.load(ptr, mask=m2, other=0.0).to(tl.float32)
    tl.store(ptr, (w + u[:, None] * v[None, :]).to(W.dtype.element_ty), mask=m2)


def _rank_one_triton(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: float) -> None:
    if W.stride(1) != 1 or (interpreting() and W.dtype == torch.bfloat16):
        work = W.float() if W.dtype == torch.bfloat16 and interpreting() else W.contiguous()
        _rank_one_triton(work, u, v, alpha)
        W.copy_(work)
        return
    n_rows, n_cols = W.shape
    if W.numel() == 0:
        return
    bm, bn = 16, 256
    _rank_one_kernel[(triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))](
        W, u.contiguous(), v.contiguous(), n_rows, n_cols, W.stride(0), float(alpha), BLOCK_M=bm, BLOCK_N=bn
    )


def rank_one_update_(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W += u v^T in place (W's dtype, fp32 math, no outer product on CUDA); returns W."""
    _check(W, u, v)
    if not use_triton(W, u, v):
        return rank_one_update_reference_(W, u, v)
    _rank_one_triton(W, u, v, 1.0)
    return W


def direction_ablate_(W: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W -= r_hat (r_hat^T W) in place, r normalised inside; two streaming passes on CUDA; returns W."""
    if W.dim() != 2 or r.dim() != 1 or r.shape[0] != W.shape[0]:
        raise ValueError(f"need W [d_out, d_in] and r [d_out]; got {tuple(W.shape)}, {tuple(r.shape)}")
    if not use_triton(W, r):
        return direction_ablate_reference_(W, r)
    rh = _unit(r).contiguous()
    src = W.float() if (interpreting() and W.dtype == torch.bfloat16) else W
    c = column_reduce(src, rh, square=False)  # r_hat^T W in fp32, [d_in]
    _rank_one_triton(W, rh, c, -1.0)
    return W
