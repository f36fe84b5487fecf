"""Pure tensor metrics of a weight change ΔW, for dense deltas and for LoRA factors.

A delta is either a dense fp32 matrix or a `LowRank` pair (ΔW = L @ R, never formed).
Every metric has a low-rank form that costs O((m + n) r²) or O(m n r) without holding
an m×n matrix:

- ‖ΔW‖_F² = Σ (LᵀL) ⊙ (RRᵀ)  (two r×r Gram matrices);
- ⟨X, ΔW⟩ = Σ (LᵀX) ⊙ R  (an r×n product);
- σ(ΔW) = σ(R_L R_Rᵀ) with L = Q_L R_L, Rᵀ = Q_R R_R thin QRs; the left singular
  vectors are Q_L U_core;
- max |ΔW| and the share of non-zero entries genuinely need entries: they are computed
  from row blocks L[rows] @ R, each at most `BLOCK_ELEMENTS` entries.

Dense spectra are exact (`torch.linalg.svd`) up to `EXACT_LIMIT` on the smaller side
and seeded randomized SVD (Halko, Martinsson & Tropp 2011) beyond it; a randomized
spectrum has only its top `spectrum_k` values, so the effective rank is then that of
the truncated spectrum (flagged by `Spectrum.full = False`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

EXACT_LIMIT = 1024  # exact SVD when min(m, n) is at most this
BLOCK_ELEMENTS = 1 << 20  # entries per row block in blockwise passes (4 MiB in fp32)
SPECTRUM_K = 32  # singular values a randomized SVD computes (at least top and rank)
_F64_BLOCK = 1 << 20  # entries per block of fp64 reductions (8 MiB)


@dataclass(frozen=True)
class LowRank:
    """ΔW = left @ right without forming it: left [m, r], right [r, n], fp32 or fp64."""

    left: torch.Tensor
    right: torch.Tensor

    def __post_init__(self) -> None:
        if self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[0]:
            raise ValueError(f"LowRank factors {tuple(self.left.shape)} and {tuple(self.right.shape)} do not chain")

    @classmethod
    def from_lora(cls, lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float, transpose: bool = False) -> LowRank:
        """ΔW = scale·B@A (or its transpose, for fan_in_fan_out and embedding layouts)."""
        b = lora_B.to(torch.float32)
        a = lora_A.to(torch.float32)
        if transpose:
            return cls(a.T * scale, b.T)
        return cls(b * scale, a)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        """The materialised ΔW (for tests and tiny tensors only)."""
        return self.left @ self.right


Delta = torch.Tensor | LowRank


@dataclass
class Spectrum:
    """Top singular values (descending) and left singular vectors of a matrix.

    `full`: the values are the whole spectrum (exact SVD or low-rank core), so the
    effective rank is exact; `method`: "exact", "randomized" or "lowrank".
    """

    values: torch.Tensor
    left: torch.Tensor
    full: bool
    method: str
    numerical_rank: int = 0


@dataclass
class DeltaMetrics:
    """Everything measured about one tensor's change. Norms are Frobenius; angles in radians."""

    norm_w: float
    norm_delta: float
    rel_change: float
    cosine: float | None
    max_abs: float | None
    changed_share: float | None
    stable_rank: float | None = None
    effective_rank: float | None = None
    singular_values: list[float] = field(default_factory=list)
    spectrum: str | None = None
    spectrum_full: bool | None = None
    numerical_rank: int | None = None
    # against the alignment update V = A - BASE
    norm_v: float | None = None
    cosine_v: float | None = None
    principal_angles: list[float] | None = None
    energy_in_v: float | None = None


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A tensor viewed as a matrix: vectors as one row, higher ranks flattened after dim 0."""
    if t.ndim == 2:
        return t
    if t.ndim <= 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def row_blocks(m: int, n: int, max_elements: int = BLOCK_ELEMENTS) -> Iterator[slice]:
    """Row slices of an m×n matrix with at most `max_elements` entries each (at least one row)."""
    step = max(1, max_elements // max(1, n))
    for start in range(0, m, step):
        yield slice(start, min(m, start + step))


# ------------------------------------------------------------------ norms and inner products
def sum_sq(x: torch.Tensor) -> float:
    """Σ x², accumulated in fp64 one row block at a time (no full-size temporary)."""
    m = as_matrix(x)
    return sum(float(torch.linalg.vector_norm(m[rows].double()) ** 2) for rows in row_blocks(m.shape[0], m.shape[1], _F64_BLOCK))


def dot(x: torch.Tensor, y: torch.Tensor) -> float:
    """Σ x ⊙ y, accumulated in fp64 one row block at a time (no full-size temporary)."""
    a, b = as_matrix(x), as_matrix(y)
    return sum(float((a[rows].double() * b[rows].double()).sum()) for rows in row_blocks(a.shape[0], a.shape[1], _F64_BLOCK))


def frob_sq(delta: Delta) -> float:
    """‖ΔW‖_F², from two r×r Gram matrices for a LowRank delta."""
    if isinstance(delta, LowRank):
        left = delta.left.double()
        right = delta.right.double()
        return float(((left.T @ left) * (right @ right.T)).sum().clamp_min(0.0))
    return sum_sq(delta)


def inner(x: torch.Tensor, delta: Delta) -> float:
    """⟨X, ΔW⟩ = tr(XᵀΔW); for a LowRank delta Σ (LᵀX) ⊙ R, never forming ΔW."""
    x = as_matrix(x)
    if isinstance(delta, LowRank):
        lx = delta.left.to(torch.float32).T @ x.to(torch.float32)  # [r, n]
        return float((lx.double() * delta.right.double()).sum())
    return dot(x, delta)


def blockwise_entry_stats(delta: Delta, atol: float = 0.0) -> tuple[float, float]:
    """(max |ΔW|, share of entries with |ΔW| > atol), from row blocks of ΔW.

    These two genuinely need entries; a LowRank delta is expanded one row block
    (at most `BLOCK_ELEMENTS` entries) at a time, so ΔW is never held whole.
    """
    m, n = delta.shape if isinstance(delta, LowRank) else as_matrix(delta).shape
    if m * n == 0:
        return 0.0, 0.0
    mx = 0.0
    count = 0
    if isinstance(delta, LowRank):
        left = delta.left.to(torch.float32)
        right = delta.right.to(torch.float32)
        for rows in row_blocks(m, n):
            block = (left[rows] @ right).abs_()
            mx = max(mx, float(block.max()))
            count += int(torch.count_nonzero(block > atol))
    else:
        d = as_matrix(delta)
        for rows in row_blocks(m, n):
            block = d[rows].abs()
            mx = max(mx, float(block.max()))
            count += int(torch.count_nonzero(block > atol))
    return mx, count / (m * n)


# ------------------------------------------------------------------------------ spectra
@contextmanager
def single_thread() -> Iterator[None]:
    """Run thin QRs and small SVDs on one thread: they gain nothing from more, and on a loaded
    machine OpenMP's waiting makes a 1536×42 QR take 0.5 s on two threads instead of 1 ms on one."""
    old = torch.get_num_threads()
    if old > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if old > 1:
            torch.set_num_threads(old)


def _tolerance(values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> float:
    """Singular values at or below this are numerical zeros (numpy's matrix_rank rule)."""
    if values.numel() == 0:
        return 0.0
    return float(values.max()) * max(shape) * torch.finfo(dtype).eps


def randomized_svd(
    x: torch.Tensor, k: int, *, oversample: int = 10, power_iters: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left singular vectors and values of x (Halko et al. 2011, seeded, fp32).

    A Gaussian sketch of k + oversample columns, `power_iters` subspace iterations
    re-orthonormalised by QR, then an exact SVD of the small projected matrix.
    """
    x = as_matrix(x).to(torch.float32)
    m, n = x.shape
    width = min(m, n, k + oversample)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, dtype=torch.float32)
    y = x @ omega
    with single_thread():
        q, _ = torch.linalg.qr(y)
    for _ in range(power_iters):
        y = x.T @ q
        with single_thread():
            z, _ = torch.linalg.qr(y)
        y = x @ z
        with single_thread():
            q, _ = torch.linalg.qr(y)
    small = q.T @ x  # [width, n]
    with single_thread():
        u, s, _ = torch.linalg.svd(small, full_matrices=False)
    k = min(k, width)
    return q @ u[:, :k], s[:k]


def spectrum(
    delta: Delta, k: int, *, exact: bool | None = None, seed: int = 0, exact_limit: int = EXACT_LIMIT
) -> Spectrum:
    """Singular values (descending) and the top-k left singular vectors of ΔW.

    LowRank: σ(ΔW) = σ(R_L R_Rᵀ) from thin QRs of L and Rᵀ (exact, whole spectrum).
    Dense: exact SVD when `exact` or min(m, n) <= exact_limit, else randomized SVD
    with max(k, SPECTRUM_K) values. Values below the numerical-rank tolerance are dropped.
    """
    if isinstance(delta, LowRank):
        with single_thread():
            ql, rl = torch.linalg.qr(delta.left.double())
            _, rr = torch.linalg.qr(delta.right.double().T)
            u, s, _ = torch.linalg.svd(rl @ rr.T)
        tol = _tolerance(s, delta.shape, torch.float32)
        keep = int((s > tol).sum())
        return Spectrum(s[:keep].float(), (ql @ u[:, :keep]).float()[:, :k], True, "lowrank", keep)
    d = as_matrix(delta).to(torch.float32)
    m, n = d.shape
    use_exact = exact if exact is not None else min(m, n) <= exact_limit
    if use_exact:
        u, s, _ = torch.linalg.svd(d, full_matrices=False)
        full, method = True, "exact"
    else:
        u, s = randomized_svd(d, max(k, SPECTRUM_K), seed=seed)
        full, method = False, "randomized"
    tol = _tolerance(s, (m, n), torch.float32)
    keep = int((s > tol).sum())
    return Spectrum(s[:keep], u[:, : min(k, keep)], full, method, keep)


def stable_rank(fro_sq_value: float, sigma1: float) -> float | None:
    """‖ΔW‖_F² / σ₁²: how many directions carry the energy (1 for rank one); None for ΔW = 0."""
    if sigma1 <= 0.0:
        return None
    return fro_sq_value / (sigma1 * sigma1)


def effective_rank(singular_values: torch.Tensor | list[float]) -> float | None:
    """exp(H(p)), p = σ / Σσ (Roy & Vetterli 2007): between 1 and the rank; None for ΔW = 0."""
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    s = s[s > 0]
    if s.numel() == 0:
        return None
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


def principal_angles(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of two orthonormal bases.

    Björck & Golub: cosines are the singular values of U1ᵀU2; angles below 45° are
    taken from the sines (singular values of the part of the smaller basis outside
    the larger one's span), which stay accurate for small angles.
    """
    a = u1.double()
    b = u2.double()
    if a.shape[1] < b.shape[1]:
        a, b = b, a
    k = b.shape[1]
    if k == 0:
        return torch.zeros(0, dtype=torch.float64)
    with single_thread():
        cos = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)  # descending -> angles ascending
        sin = torch.linalg.svdvals(b - a @ (a.T @ b)).clamp(max=1.0).flip(0)  # ascending
    small = cos * cos >= 0.5
    return torch.where(small, torch.arcsin(sin), torch.arccos(cos))


def energy_share(u: torch.Tensor, delta: Delta) -> float | None:
    """‖UᵀΔW‖_F² / ‖ΔW‖_F²: the share of ΔW's energy inside the span of U (orthonormal)."""
    total = frob_sq(delta)
    if total <= 0.0:
        return None
    if isinstance(delta, LowRank):
        x = u.double().T @ delta.left.double()  # [k, r]
        right = delta.right.double()
        inside = float(((x.T @ x) * (right @ right.T)).sum())
    else:
        inside = sum_sq(u.T.to(torch.float32) @ as_matrix(delta))
    return min(1.0, max(0.0, inside / total))


def _safe_div(a: float, b: float) -> float | None:
    return a / b if b > 0.0 else None


# ------------------------------------------------------------------------------ all together
def unchanged_metrics(w: torch.Tensor) -> DeltaMetrics:
    """The metrics of ΔW = 0 without touching a zero tensor (tensors an adapter leaves alone)."""
    norm_w = math.sqrt(sum_sq(w))
    is_matrix = w.ndim >= 2 and min(as_matrix(w).shape) > 1
    return DeltaMetrics(norm_w=norm_w, norm_delta=0.0, rel_change=0.0, cosine=1.0 if norm_w > 0 else None,
                        max_abs=0.0, changed_share=0.0, numerical_rank=0 if is_matrix else None)


def delta_metrics(
    w: torch.Tensor,
    delta: Delta,
    v: torch.Tensor | None = None,
    *,
    rank: int = 8,
    top: int = 8,
    exact: bool | None = None,
    seed: int = 0,
    atol: float = 0.0,
    entrywise: bool = True,
) -> DeltaMetrics:
    """Every metric of a change W -> W + ΔW (and against V = A − BASE when `v` is given).

    `w` is the first weight (any float dtype, read as fp32), `delta` dense fp32 or
    LowRank, `v` the alignment update. `rank` is the subspace dimension for the angles
    and the energy share, `top` how many singular values to report, `atol` the
    threshold above which an entry counts as changed. `entrywise=False` skips the
    blockwise pass (max |ΔW|, changed share) for LowRank deltas.
    """
    wm = as_matrix(w).to(torch.float32)
    lowrank = isinstance(delta, LowRank)
    d: Delta = delta if isinstance(delta, LowRank) else as_matrix(delta).to(torch.float32)
    norm_w2 = sum_sq(wm)
    norm_d2 = frob_sq(d)
    wd = inner(wm, d)
    # ‖B‖² and ⟨A, B⟩ from A and ΔW, so B itself is never needed.
    norm_b2 = max(0.0, norm_w2 + 2.0 * wd + norm_d2)
    cos_ab = _safe_div(norm_w2 + wd, math.sqrt(norm_w2 * norm_b2)) if norm_w2 > 0 and norm_b2 > 0 else None
    if entrywise or not lowrank:
        max_abs, changed = blockwise_entry_stats(d, atol)
    else:
        max_abs, changed = None, None
    if norm_d2 == 0.0:
        cos_ab = 1.0 if norm_w2 > 0 else None
    out = DeltaMetrics(
        norm_w=math.sqrt(norm_w2),
        norm_delta=math.sqrt(norm_d2),
        rel_change=(math.sqrt(norm_d2 / norm_w2) if norm_w2 > 0 else (0.0 if norm_d2 == 0 else math.inf)),
        cosine=None if cos_ab is None else max(-1.0, min(1.0, cos_ab)),
        max_abs=max_abs,
        changed_share=changed,
    )
    is_matrix = w.ndim >= 2 and min(wm.shape) > 1
    spec: Spectrum | None = None
    if is_matrix and norm_d2 > 0:
        spec = spectrum(d, rank, exact=exact, seed=seed)
        if spec.values.numel():
            s1 = float(spec.values[0])
            out.stable_rank = stable_rank(norm_d2, s1)
            out.effective_rank = effective_rank(spec.values)
            out.singular_values = [float(x) for x in spec.values[:top]]
        out.spectrum = spec.method
        out.spectrum_full = spec.full
        out.numerical_rank = spec.numerical_rank if spec.full else None
    elif is_matrix:
        out.numerical_rank = 0
    if v is not None:
        vm = as_matrix(v).to(torch.float32)
        norm_v2 = sum_sq(vm)
        out.norm_v = math.sqrt(norm_v2)
        vd = inner(vm, d)
        out.cosine_v = _safe_div(vd, math.sqrt(norm_v2 * norm_d2)) if norm_v2 > 0 and norm_d2 > 0 else None
        if is_matrix and spec is not None and norm_v2 > 0:
            vspec = spectrum(vm, rank, exact=exact, seed=seed + 1)
            uv = vspec.left[:, :rank]
            if uv.shape[1] > 0 and spec.left.shape[1] > 0:
                out.principal_angles = [float(x) for x in principal_angles(uv, spec.left[:, :rank])]
                out.energy_in_v = energy_share(uv, d)
    return out
