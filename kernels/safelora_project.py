"""SafeLoRA projection of a LoRA update onto the alignment subspace (Hsu et al. 2024).

V = W_aligned - W_base is [d_out, d_in]; the LoRA update is B [d_out, r] @ A [r, d_in].
SafeLoRA's fast projector is P = V V^T / ||V||_F (the Frobenius norm, not its square,
so P is NOT idempotent; we mirror the reference code). It replaces B by P B and
decides from the cosine between flattened P B A and B A.

Low-rank form (this module's `safelora_project`): never forms P or any d_out x d_in
product. C = V^T B (d_in x r), B_new = V C / ||V||_F, and with G_A = A A^T (r x r):
    <P B A, B A>_F = tr((B^T B_new) G_A),   ||P B A||^2 = tr((B_new^T B_new) G_A),
    ||B A||^2 = tr((B^T B) G_A).
Two passes over V (V^T B and V C, thin GEMMs at memory bandwidth) plus r x r work,
against O(d_out^2 d_in) flops for the dense reference.

exact=True uses the true orthogonal projector onto the column space of V,
Q Q^T with Q the left singular vectors whose singular value exceeds
tol = max(d_out, d_in) * eps(fp32) * sigma_max (NumPy's matrix_rank rule): the
paper's V (V^T V)^+ V^T, computed stably. It costs one thin SVD of V.
The cosine uses cos = <x, y> / (max(||x||, eps) * max(||y||, eps)) with eps = 1e-8,
as torch.nn.functional.cosine_similarity does.
"""

from __future__ import annotations

import math

import torch

__all__ = ["safelora_project", "safelora_project_reference", "column_space_basis"]

_EPS = 1e-8


def _check(V: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> None:
    if V.dim() != 2 or B.dim() != 2 or A.dim() != 2:
        raise ValueError("V, B and A must be 2-D")
    if B.shape[0] != V.shape[0] or A.shape[1] != V.shape[1] or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"shapes do not chain: V {tuple(V.shape)} (d_out x d_in), B {tuple(B.shape)} (d_out x r), "
            f"A {tuple(A.shape)} (r x d_in)"
        )


def column_space_basis(V: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis Q [d_out, rank] of V's column space via a rank-revealing thin SVD (fp32)."""
    Vf = V.float()
    if Vf.numel() == 0:
        return Vf.new_zeros((V.shape[0], 0))
    U, S, _ = torch.linalg.svd(Vf, full_matrices=False)
    tol = max(V.shape) * torch.finfo(torch.float32).eps * (S[0] if S.numel() else 0.0)
    rank = int((S > tol).sum())
    return U[:, :rank].contiguous()


def _cos(num: float, n1: float, n2: float) -> float:
    return num / (max(math.sqrt(max(n1, 0.0)), _EPS) * max(math.sqrt(max(n2, 0.0)), _EPS))


def safelora_project_reference(
    V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, exact: bool = False
) -> tuple[torch.Tensor, float]:
    """Dense formulation as in the SafeLoRA/PEFT code: P materialised, P B A and B A formed."""
    _check(V, B, A)
    Vf, Bf, Af = V.float(), B.float(), A.float()
    if exact:
        Q = column_space_basis(Vf)
        P = Q @ Q.T
    else:
        P = (Vf @ Vf.T) / torch.linalg.vector_norm(Vf)
    B_new = P @ Bf
    fW = (B_new @ Af).reshape(1, -1)
    ori = (Bf @ Af).reshape(1, -1)
    cos = float(torch.nn.functional.cosine_similarity(fW, ori, eps=_EPS).item())
    return B_new.to(B.dtype), cos


def safelora_project(
    V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, exact: bool = False
) -> tuple[torch.Tensor, float]:
    """(P B, cos(P B A, B A)) in low-rank form, never forming P or a d_out x d_in product.

    Same result as `safelora_project_reference` (within fp32 rounding) on any device;
    B_new is returned in B's dtype, the math is fp32 (the r x r traces in fp64).
    """
    _check(V, B, A)
    Vf, Bf, Af = V.float(), B.float(), A.float()
    if exact:
        Q = column_space_basis(Vf)
        B_new = Q @ (Q.T @ Bf)
    else:
        norm = torch.linalg.vector_norm(Vf)
        B_new = (Vf @ (Vf.T @ Bf)) / norm
    GA = (Af @ Af.T).double()
    num = float(torch.sum((Bf.T @ B_new).double() * GA))  # tr(X G) = sum(X^T * G), G symmetric
    n1 = float(torch.sum((B_new.T @ B_new).double() * GA))
    n2 = float(torch.sum((Bf.T @ Bf).double() * GA))
    return B_new.to(B.dtype), _cos(num, n1, n2)
