"""SafeLoRA projection of a LoRA update onto the alignment subspace (Hsu et al. 2024).

V = W_aligned - W_base is [d_out, d_in]; the LoRA update is B [d_out, r] @ A [r, d_in].
SafeLoRA's fast projector is P = V V^T / ||V||_F (the Frobenius norm, not its square,
so P is NOT idempotent; we mirror the reference code). It replaces B by P B and
decides from the cosine between flattened P B A and B A.

Low-rank form (this module's `safelora_project`): never forms P or any d_out x d_in
product. C = V^T B (d_in x r), B_new = V C / ||V||_F, and with G_A = A A^T (r x r):
    <P B A, B A>_F = tr((B^T B_new) G_A),   ||P B A||^2 = tr((B_new^T B_new) G_A),
    ||B A||^2 = tr((B^T B) G_A).
Two passes over V plus r x r work, against O(d_out^2 d_in) flops for the dense
reference. On CUDA two Triton kernels stream V in its own dtype (no fp32 copy): the
first computes C = V^T B and ||V||_F^2 together (fp32 partials per row split, summed
in a fixed order), the second V C; on CPU the same algebra runs through torch.

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

from ._runtime import interpreting, tl, triton, use_triton

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


def _fro_norm(V: torch.Tensor) -> torch.Tensor:
    """||V||_F: fp32 dots over 64K-element chunks, summed in fp64 (torch's fp32 CPU
    vector_norm is off by ~1e-4 at 4M elements; this is within ~1e-8, at the cost of one pass)."""
    if V.is_cuda:  # CUDA's tree reduction is accurate; one pass, fp64 accumulation
        return torch.linalg.vector_norm(V, dtype=torch.float64)
    flat = V.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=V.device)
    for chunk in flat.split(1 << 16):
        total += torch.dot(chunk, chunk).double()
    return total.sqrt()


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
    """Dense formulation as in the SafeLoRA/PEFT code: P materialised, P B A and B A formed.

    fp32 math, or fp64 when V is fp64 (an accurate yardstick for tests and benchmarks).
    """
    _check(V, B, A)
    dt = torch.float64 if V.dtype == torch.float64 else torch.float32
    Vf, Bf, Af = V.to(dt), B.to(dt), A.to(dt)
    if exact:
        Q = column_space_basis(Vf).to(dt)
        P = Q @ Q.T
    else:
        P = (Vf @ Vf.T) / _fro_norm(Vf).to(dt)
    B_new = P @ Bf
    fW = (B_new @ Af).reshape(1, -1)
    ori = (Bf @ Af).reshape(1, -1)
    cos = float(torch.nn.functional.cosine_similarity(fW, ori, eps=_EPS).item())
    return B_new.to(B.dtype), cos


@triton.jit
def _vtb_kernel(
    V, Bm, CPART, SQPART, d_out, d_in, r, stride_v, rows_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """CPART[split, cols, :] = V[rows, cols]^T B[rows, :] and SQPART[split, col block] =
    sum of V^2 over the split's rows, fp32 (B is fp32 [d_out, r] contiguous)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < d_in
    ks = tl.arange(0, BLOCK_R)
    kmask = ks < r
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    sq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_lo = pid_s.to(tl.int64) * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, d_out)
    for off in range(0, rows_per_split, BLOCK_M):  # scalar-int bounds: portable to Triton 3.6's interpreter
        rows = row_lo + off + tl.arange(0, BLOCK_M)
        rmask = rows < row_hi
        v = tl.load(V + rows[:, None] * stride_v + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        v = v.to(tl.float32)
        b = tl.load(Bm + rows[:, None] * r + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(tl.trans(v), b, input_precision="ieee")
        sq += v * v
    out = CPART + pid_s.to(tl.int64) * d_in * BLOCK_R + cols[:, None] * BLOCK_R + ks[None, :]
    tl.store(out, acc, mask=cmask[:, None])
    tl.store(SQPART + pid_s * tl.num_programs(0) + pid_n, tl.sum(tl.sum(sq, axis=1), axis=0))


@triton.jit
def _vc_kernel(
    V, Cm, OUT, d_out, d_in, r, stride_v, scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """OUT[rows, :r] = scale * V[rows, :] @ C, C fp32 [d_in, BLOCK_R] zero-padded."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < d_out
    ks = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for start in range(0, d_in, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        cmask = cols < d_in
        v = tl.load(V + rows[:, None] * stride_v + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        c = tl.load(Cm + cols[:, None] * BLOCK_R + ks[None, :], mask=cmask[:, None], other=0.0)
        acc += tl.dot(v.to(tl.float32), c, input_precision="ieee")
    tl.store(OUT + rows[:, None] * r + ks[None, :], acc * scale, mask=rmask[:, None] & (ks < r)[None, :])


def _project_b_triton(V: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """V (V^T B) / ||V||_F in fp32 with two streaming passes over V (Triton)."""
    if V.stride(1) != 1 or (interpreting() and V.dtype == torch.bfloat16):
        V = V.float() if V.dtype == torch.bfloat16 else V.contiguous()
    d_out, d_in = V.shape
    r = B.shape[1]
    Bf = B.float().contiguous()
    block_r = max(16, triton.next_power_of_2(r))
    block_m, block_n = 64, 64
    n_cb = triton.cdiv(d_in, block_n)
    if V.is_cuda:
        sms = torch.cuda.get_device_properties(V.device).multi_processor_count
        splits = max(1, min(triton.cdiv(d_out, 4 * block_m), triton.cdiv(4 * sms, n_cb)))
    else:
        splits = 1 if d_out <= 128 else 2
    rows_per_split = triton.cdiv(triton.cdiv(d_out, splits), block_m) * block_m
    splits = triton.cdiv(d_out, rows_per_split)
    cpart = torch.empty((splits, d_in, block_r), dtype=torch.float32, device=V.device)
    sqpart = torch.empty((splits, n_cb), dtype=torch.float32, device=V.device)
    _vtb_kernel[(n_cb, splits)](
        V, Bf, cpart, sqpart, d_out, d_in, r, V.stride(0), rows_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
    )
    C = cpart.sum(0) if splits > 1 else cpart[0]
    norm = math.sqrt(float(sqpart.double().sum()))
    out = torch.empty((d_out, r), dtype=torch.float32, device=V.device)
    if norm == 0.0:
        return out.fill_(float("nan"))  # 0/0, as the reference gives
    bm = 64
    _vc_kernel[(triton.cdiv(d_out, bm),)](
        V, C.contiguous(), out, d_out, d_in, r, V.stride(0), 1.0 / norm,
        BLOCK_M=bm, BLOCK_K=64, BLOCK_R=block_r,
    )
    return out


def safelora_project(
    V: torch.Tensor, B: torch.Tensor, A: torch.Tensor, exact: bool = False
) -> tuple[torch.Tensor, float]:
    """(P B, cos(P B A, B A)) in low-rank form, never forming P or a d_out x d_in product.

    Same result as `safelora_project_reference` (within fp32 rounding) on any device;
    B_new is returned in B's dtype; the math is fp32, the r x r Gram traces fp64.
    """
    _check(V, B, A)
    Bf, Af = B.float(), A.float()
    if exact:
        Q = column_space_basis(V)
        B_new = Q @ (Q.T @ Bf)
    elif use_triton(V, B) and V.numel() > 0:
        B_new = _project_b_triton(V, B)
    else:
        Vf = V.float()
        B_new = (Vf @ (Vf.T @ Bf)) / _fro_norm(Vf).float()
    # r x r Gram matrices in fp64: cheap (d x r inputs) and free of cancellation in the traces
    Ad, Bd, Nd = Af.double(), Bf.double(), B_new.double()
    GA = Ad @ Ad.T
    num = float(torch.sum((Bd.T @ Nd) * GA))  # tr(X G) = sum(X * G) for symmetric G
    n1 = float(torch.sum((Nd.T @ Nd) * GA))
    n2 = float(torch.sum((Bd.T @ Bd) * GA))
    return B_new.to(B.dtype), _cos(num, n1, n2)
