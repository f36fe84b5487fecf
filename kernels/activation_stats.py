"""Streaming activation statistics over calibration tokens, with a token mask.

X is [tokens, d] (leading dimensions are flattened: [batch, seq, d] works, with a
[batch, seq] mask). `mask` (bool, one entry per token) keeps only the tokens where
it is True, e.g. response tokens (Wei et al.'s `disentangle`, SaLoRA's ActLinear).
- `channel_sq_norms`: s_j = sum over kept tokens of x_j^2 (Wanda's ||X_j||^2, before
  any division by the number of samples), fp32.
- `covariance`: the uncentred X^T X over kept tokens, fp32 accumulation (as
  SparseGPT's reference: no TF32). fp16/bf16 products are exact in fp32, so only the
  summation order differs from the reference.
Sum these over batches to stream a calibration set.
"""

from __future__ import annotations

import torch

from ._colreduce import column_reduce
from ._runtime import interpreting, tl, triton, use_triton

__all__ = ["channel_sq_norms", "channel_sq_norms_reference", "covariance", "covariance_reference"]


def _flatten(X: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if X.dim() < 1:
        raise ValueError("X must be [tokens, d] (or [..., d])")
    X2 = X.reshape(-1, X.shape[-1]) if X.dim() != 2 else X
    if mask is None:
        return X2, None
    m = mask.reshape(-1)
    if m.dtype != torch.bool:
        m = m != 0
    if m.shape[0] != X2.shape[0]:
        raise ValueError(f"mask has {m.shape[0]} entries but X has {X2.shape[0]} tokens")
    return X2, m.to(X2.device)


def channel_sq_norms_reference(X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [d]: sum of x_j^2 over the kept tokens."""
    X2, m = _flatten(X, mask)
    Xf = X2.float()
    if m is not None:
        Xf = Xf[m]
    return (Xf * Xf).sum(0)


def covariance_reference(X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [d, d]: X^T X over the kept tokens, fp32 GEMM without TF32."""
    X2, m = _flatten(X, mask)
    Xf = X2.float()
    if m is not None:
        Xf = Xf[m]
    if Xf.is_cuda:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return Xf.T @ Xf
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    return Xf.T @ Xf


def channel_sq_norms(X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [d] per-channel sums of squares over the masked tokens (one streaming pass on CUDA)."""
    X2, m = _flatten(X, mask)
    if not use_triton(X2, m):
        return channel_sq_norms_reference(X2, m)
    if interpreting() and X2.dtype == torch.bfloat16:
        X2 = X2.float()
    return column_reduce(X2, m, square=True)


@triton.jit
def _gram_kernel(
    X, M, OUT, n_tok, d, stride_x, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[m-block, n-block] = sum over kept tokens t of X[t, m] X[t, n], fp32 accumulation."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_tok, BLOCK_K):
        tk = start + tl.arange(0, BLOCK_K)
        tmask = tk < n_tok
        if HAS_MASK:
            tmask = tmask & (tl.load(M + tk, mask=tk < n_tok, other=0) != 0)
        a = tl.load(X + tk[:, None].to(tl.int64) * stride_x + rm[None, :], mask=tmask[:, None] & (rm < d)[None, :], other=0.0)
        b = tl.load(X + tk[:, None].to(tl.int64) * stride_x + rn[None, :], mask=tmask[:, None] & (rn < d)[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(a), b, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b)
    omask = (rm < d)[:, None] & (rn < d)[None, :]
    tl.store(OUT + rm[:, None].to(tl.int64) * d + rn[None, :], acc, mask=omask)


def covariance(X: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [d, d] uncentred X^T X over the masked tokens, fp32 accumulation.

    Triton GEMM on CUDA with the token mask applied in the loads (no gathered copy);
    16-bit inputs use the tensor cores (exact products), fp32 inputs IEEE fp32.
    """
    X2, m = _flatten(X, mask)
    if not use_triton(X2, m):
        return covariance_reference(X2, m)
    if X2.stride(1) != 1:
        X2 = X2.contiguous()
    if interpreting() and X2.dtype == torch.bfloat16:
        X2 = X2.float()
    n_tok, d = X2.shape
    out = torch.empty((d, d), dtype=torch.float32, device=X2.device)
    if d == 0:
        return out
    if n_tok == 0:
        return out.zero_()
    bm = bn = 64 if d >= 64 else 16
    bk = 32
    mm = m.contiguous().view(torch.int8) if m is not None else X2
    _gram_kernel[(triton.cdiv(d, bm), triton.cdiv(d, bn))](
        X2, mm, out, n_tok, d, X2.stride(0), HAS_MASK=m is not None, IEEE=X2.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return out
