"""SaLoRA's fixed safety projection C = I - U U^T (Li et al., ICLR 2025).

U [d_out, r] has orthonormal columns (the top safety output directions); C removes
them. Two uses:
- `salora_fold(U, B)`: fold C into a LoRA B after training, C B = B - U (U^T B),
  since (I - U U^T) B A = (B - U (U^T B)) A;
- `salora_project(X, U)`: X C on activations [tokens, d_out] during fine-tuning, as an
  autograd function. C is symmetric, so grad_X = grad_out C; U is normally frozen,
  but its gradient -(X^T G + G^T X) U (G = grad_out) is returned when it is asked for.
Math in fp32, results in the input's dtype. U is assumed orthonormal (not checked:
that would cost an r x r Gram per call; `orthonormal_check` does it on request).
"""

from __future__ import annotations

import torch

from ._runtime import tl, triton, use_triton

__all__ = [
    "salora_fold",
    "salora_fold_reference",
    "salora_project",
    "salora_project_reference",
    "orthonormal_check",
]


def orthonormal_check(U: torch.Tensor, atol: float = 1e-4) -> bool:
    """Whether U^T U is the identity within atol (fp32)."""
    Uf = U.float()
    eye = torch.eye(U.shape[1], dtype=torch.float32, device=U.device)
    return bool(torch.allclose(Uf.T @ Uf, eye, atol=atol))


def salora_fold_reference(U: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(I - U U^T) B with the dense d_out x d_out projector; fp32 math, B's dtype."""
    Uf = U.float()
    C = torch.eye(U.shape[0], dtype=torch.float32, device=U.device) - Uf @ Uf.T
    return (C @ B.float()).to(B.dtype)


def salora_fold(U: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(I - U U^T) B as B - U (U^T B), never forming the d_out x d_out projector."""
    if U.dim() != 2 or B.dim() != 2 or U.shape[0] != B.shape[0]:
        raise ValueError(f"U [d_out, r] and B [d_out, r'] must share d_out, got {tuple(U.shape)}, {tuple(B.shape)}")
    Uf, Bf = U.float(), B.float()
    return (Bf - Uf @ (Uf.T @ Bf)).to(B.dtype)


def salora_project_reference(X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """X (I - U U^T) with the dense projector; fp32 math, X's dtype. Differentiable by autograd."""
    Uf = U.float()
    C = torch.eye(U.shape[0], dtype=torch.float32, device=U.device) - Uf @ Uf.T
    return (X.float() @ C).to(X.dtype)


@triton.jit
def _project_rows_kernel(
    X, U, Y, n_rows, d, r, stride_x, stride_y,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Y[t] = X[t] - (X[t] U) U^T for a block of BLOCK_T rows; two sweeps over d, fp32.

    The first sweep accumulates T = X_blk U (BLOCK_T x r) in registers; the second
    re-reads X (from cache) and writes X - T U^T. U is [d, r] contiguous.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < n_rows
    ks = tl.arange(0, BLOCK_R)
    kmask = ks < r
    t = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        cmask = cols < d
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        u = tl.load(U + cols[:, None] * r + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        t += tl.dot(x.to(tl.float32), u.to(tl.float32), input_precision="ieee")
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        cmask = cols < d
        m2 = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        u = tl.load(U + cols[:, None] * r + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        y = x - tl.dot(t, tl.trans(u.to(tl.float32)), input_precision="ieee")
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=m2)


def _project_forward(X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """X (I - U U^T) on a 2-D X, fp32 math, X's dtype, through Triton or torch."""
    if use_triton(X, U) and U.shape[1] <= 64:
        Xc = X if X.stride(-1) == 1 else X.contiguous()
        Uc = U.float().contiguous()
        if Xc.dtype == torch.bfloat16 and not Xc.is_cuda:  # interpreter bf16 is broken
            Xc = Xc.float()
        Y = torch.empty(X.shape, dtype=Xc.dtype, device=X.device)
        n, d = X.shape
        r = U.shape[1]
        if n and d:
            block_r = max(16, triton.next_power_of_2(r))
            block_t = 16
            block_d = 64 if block_r <= 16 else 32
            _project_rows_kernel[(triton.cdiv(n, block_t),)](
                Xc, Uc, Y, n, d, r, Xc.stride(0), Y.stride(0),
                BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_R=block_r,
            )
        return Y.to(X.dtype)
    Uf = U.float()
    Xf = X.float()
    return (Xf - (Xf @ Uf) @ Uf.T).to(X.dtype)


class _SaloraProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(X, U)
        shape = X.shape
        return _project_forward(X.reshape(-1, shape[-1]), U).reshape(shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        X, U = ctx.saved_tensors
        shape = X.shape
        g2 = grad.reshape(-1, shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _project_forward(g2, U).reshape(shape)
        grad_u = None
        if ctx.needs_input_grad[1]:
            Uf = U.float()
            Gf = g2.float()
            Xf = X.reshape(-1, shape[-1]).float()
            grad_u = -(Xf.T @ (Gf @ Uf) + Gf.T @ (Xf @ Uf))
            grad_u = grad_u.to(U.dtype)
        return grad_x, grad_u


def salora_project(X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """X (I - U U^T) for activations X [..., d_out] and orthonormal U [d_out, r], differentiable.

    Triton on CUDA (one read of X from memory, one write; U and X U stay on chip for
    r <= 64), torch's two thin GEMMs otherwise. Backward is the same projection.
    """
    if U.dim() != 2 or X.shape[-1] != U.shape[0]:
        raise ValueError(f"X [..., d_out] and U [d_out, r] must share d_out, got {tuple(X.shape)}, {tuple(U.shape)}")
    return _SaloraProject.apply(X, U)
