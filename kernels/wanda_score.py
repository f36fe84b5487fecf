"""Wanda importance score |W| * sqrt(s) (Sun et al. 2023).

`s` holds the per-input-channel squared activation norms ||X_j||^2, so the score of
weight W[i, j] is |W[i, j]| * ||X_j||. The result is always fp32, as in the Wanda
reference code (fp16/bf16 weights times an fp32 norm vector promote to fp32).
The kernel uses a correctly rounded square root so its scores are bit-identical to
the reference and masks built from them agree exactly.
"""

from __future__ import annotations

import torch

from ._runtime import tl, triton, use_triton

__all__ = ["wanda_score", "wanda_score_reference"]


def _check(W: torch.Tensor, sq_norms: torch.Tensor) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [d_out, d_in], got shape {tuple(W.shape)}")
    if sq_norms.dim() != 1 or sq_norms.shape[0] != W.shape[1]:
        raise ValueError(f"sq_norms must have shape [{W.shape[1]}] (d_in), got {tuple(sq_norms.shape)}")


def _sqrt_rn(s: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt (via fp64; double rounding is innocuous for sqrt).

    torch's CPU fp32 sqrt is not always correctly rounded; CUDA's and Triton's
    `sqrt_rn` are, so this keeps the reference bit-identical to the kernel.
    """
    return torch.sqrt(s.float().double()).float()


def wanda_score_reference(W: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """fp32 |W| * sqrt(sq_norms) broadcast over rows; the source of truth."""
    _check(W, sq_norms)
    return W.float().abs() * _sqrt_rn(sq_norms).reshape(1, -1)


@triton.jit
def _wanda_score_kernel(W, S, OUT, n_cols, stride_w, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    w = tl.load(W + row * stride_w + cols, mask=valid, other=0.0).to(tl.float32)
    s = tl.load(S + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, tl.abs(w) * tl.sqrt_rn(s), mask=valid)


def _wanda_score_triton(W: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    if W.stride(1) != 1:
        W = W.contiguous()
    s = sq_norms.contiguous()
    out = torch.empty(W.shape, dtype=torch.float32, device=W.device)
    n_rows, n_cols = W.shape
    if out.numel() == 0:
        return out
    block = 1024
    _wanda_score_kernel[(n_rows, triton.cdiv(n_cols, block))](
        W, s, out, n_cols, W.stride(0), out.stride(0), BLOCK=block
    )
    return out


def wanda_score(W: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """fp32 Wanda score |W| * sqrt(s) for W [d_out, d_in] and s [d_in] (Triton on CUDA)."""
    _check(W, sq_norms)
    if use_triton(W, sq_norms):
        return _wanda_score_triton(W, sq_norms)
    return wanda_score_reference(W, sq_norms)
