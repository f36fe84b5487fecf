"""SafeLoRA / SaLoRA projections, activation statistics and rank-one edits:
kernel (or low-rank form) against the dense reference within stated rel-RMS bounds.

Bounds: fp32 math everywhere, so results agree to fp32 rounding (rel-RMS <= 1e-5
for elementwise/streaming ops, <= 1e-4 for GEMM-shaped ones whose summation order
differs); 16-bit outputs add one rounding of the stored dtype (<= 1e-2 fp16/bf16).
"""

from __future__ import annotations

import pytest
import torch
from surgery.kernels import (
    channel_sq_norms,
    channel_sq_norms_reference,
    covariance,
    covariance_reference,
    direction_ablate_,
    direction_ablate_reference_,
    rank_one_update_,
    rank_one_update_reference_,
    safelora_project,
    safelora_project_reference,
    salora_fold,
    salora_fold_reference,
    salora_project,
    salora_project_reference,
)

HAS_CUDA = torch.cuda.is_available()
BF16 = pytest.param(
    torch.bfloat16,
    marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="interpreter bf16 is broken; needs CUDA")],
)
DTYPES = [torch.float32, torch.float16, BF16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def orthonormal(d: int, r: int, gen: torch.Generator, device: str) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0].float().to(device)


# ------------------------------------------------------------------ SafeLoRA


@pytest.mark.parametrize("dims", [(1, 1, 1), (48, 37, 16), (64, 1, 3), (1, 50, 2), (150, 70, 20)])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_safelora_lowrank_matches_dense(dims, exact, dtype, gen, helpers):
    """Low-rank (Triton on the fast path) vs the dense fp64 reference on the same V."""
    d_out, d_in, r = dims
    V = helpers.rand((d_out, d_in), dtype, gen)
    B = helpers.rand((d_out, r), torch.float32, gen)
    A = helpers.rand((r, d_in), torch.float32, gen)
    Bn, cos = safelora_project(V, B, A, exact=exact)
    Bn_ref, cos_ref = safelora_project_reference(V.cpu().double(), B.cpu().double(), A.cpu().double(), exact=exact)
    helpers.assert_close("B_new", Bn_ref, Bn, 1e-4)
    assert abs(cos - cos_ref) < 1e-4
    assert -1.0 - 1e-6 <= cos <= 1.0 + 1e-6


def test_safelora_fast_projector_is_not_idempotent(gen):
    """P = V V^T / ||V||_F: applying it twice is not applying it once (mirrors SafeLoRA)."""
    V, B, A = torch.randn(30, 20, generator=gen), torch.randn(30, 4, generator=gen), torch.randn(4, 20, generator=gen)
    once, _ = safelora_project(V, B, A)
    twice, _ = safelora_project(V, once, A)
    assert helpers_rel(once, twice) > 1e-2
    P = V @ V.T / torch.linalg.vector_norm(V)
    assert torch.allclose(once, P @ B, rtol=1e-4, atol=1e-4)


def test_safelora_exact_projector_rank_deficient(gen):
    """Exact mode projects onto col(V) even when V is rank-deficient: idempotent, keeps col(V)."""
    L = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    V = (L @ torch.randn(3, 25, generator=gen, dtype=torch.float64)).float()
    B = torch.randn(40, 5, generator=gen)
    A = torch.randn(5, 25, generator=gen)
    Bn, _ = safelora_project(V, B, A, exact=True)
    Bnn, cos2 = safelora_project(V, Bn, A, exact=True)
    assert helpers_rel(Bn, Bnn) < 1e-5 and abs(cos2 - 1.0) < 1e-5
    inside = L.float() @ torch.randn(3, 5, generator=gen)
    kept, cos3 = safelora_project(V, inside, A, exact=True)
    assert helpers_rel(inside, kept) < 1e-4 and abs(cos3 - 1.0) < 1e-5


def helpers_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ SaLoRA


@pytest.mark.parametrize("dims", [(1, 1, 1), (1, 40, 4), (50, 1, 1), (33, 70, 16), (20, 100, 20)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_salora_project_forward_backward(dims, dtype, gen, helpers):
    T, d, r = dims
    U = orthonormal(d, r, gen, helpers.device)
    X = helpers.rand((T, d), dtype, gen).requires_grad_(True)
    Y = salora_project(X, U)
    Xr = X.detach().cpu().float().requires_grad_(True)
    Yr = salora_project_reference(Xr, U.cpu())
    assert Y.dtype == dtype
    helpers.assert_close("Y", Yr, Y.float(), TOL[dtype])
    G = helpers.rand((T, d), dtype, gen)
    Y.backward(G)
    Yr.backward(G.cpu().float())
    helpers.assert_close("dX", Xr.grad, X.grad.float(), TOL[dtype])


def test_salora_project_grad_u_and_batched(gen, helpers):
    """Batched activations, and the gradient of U against fp64 autograd of X - X U U^T."""
    U0 = orthonormal(24, 3, gen, helpers.device)
    X = helpers.rand((2, 5, 24), torch.float32, gen)
    G = helpers.rand((2, 5, 24), torch.float32, gen)
    U = U0.clone().requires_grad_(True)
    Xg = X.clone().requires_grad_(True)
    Y = salora_project(Xg, U)
    Y.backward(G)
    Ud = U0.cpu().double().requires_grad_(True)
    Xd = X.cpu().double().requires_grad_(True)
    Yd = Xd - (Xd @ Ud) @ Ud.T
    Yd.backward(G.cpu().double())
    helpers.assert_close("Y", Yd.detach(), Y.detach(), 1e-5)
    helpers.assert_close("dX", Xd.grad, Xg.grad, 1e-5)
    helpers.assert_close("dU", Ud.grad, U.grad, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_salora_fold(dtype, gen, helpers):
    U = orthonormal(60, 7, gen, helpers.device)
    B = helpers.rand((60, 16), dtype, gen)
    got = salora_fold(U, B)
    want = salora_fold_reference(U.cpu(), B.cpu().float())
    helpers.assert_close("fold", want, got.float(), TOL[dtype])
    # folding removes every component along U
    assert (U.T.float() @ got.float()).abs().max().item() < 1e-2 * B.float().abs().max().item()


# ------------------------------------------------------------------ activation statistics


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (77, 130), (513, 17)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_channel_sq_norms(shape, dtype, masked, gen, helpers):
    X = helpers.rand(shape, dtype, gen)
    mask = (torch.rand(shape[0], generator=gen) < 0.6).to(helpers.device) if masked else None
    got = channel_sq_norms(X, mask)
    want = channel_sq_norms_reference(X.cpu(), None if mask is None else mask.cpu())
    assert got.dtype == torch.float32 and got.shape == (shape[1],)
    if masked and not bool(mask.any()):
        assert torch.equal(got.cpu(), want)
    else:
        helpers.assert_close("sq_norms", want, got, 1e-5)
    # independent expectation: sum over the kept rows in fp64
    Xd = X.cpu().double()
    if mask is not None:
        Xd = Xd[mask.cpu()]
    helpers.assert_close("sq_norms64", (Xd * Xd).sum(0), got, 1e-5) if Xd.shape[0] else None


def test_channel_sq_norms_batched_mask(gen, helpers):
    X = helpers.rand((3, 11, 40), torch.float32, gen)
    mask = torch.rand(3, 11, generator=gen) < 0.5
    got = channel_sq_norms(X, mask.to(helpers.device))
    want = (X.cpu().double()[mask] ** 2).sum(0)
    helpers.assert_close("batched", want, got, 1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (1, 70), (90, 1), (45, 70), (130, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_covariance(shape, dtype, masked, gen, helpers):
    X = helpers.rand(shape, dtype, gen)
    mask = (torch.rand(shape[0], generator=gen) < 0.6).to(helpers.device) if masked else None
    got = covariance(X, mask)
    assert got.dtype == torch.float32 and got.shape == (shape[1], shape[1])
    Xd = X.cpu().double()
    if mask is not None:
        Xd = Xd[mask.cpu()]
    want = Xd.T @ Xd
    if Xd.shape[0] == 0:
        assert torch.equal(got.cpu(), torch.zeros_like(got.cpu()))
        return
    helpers.assert_close("cov", want, got, 1e-5)
    helpers.assert_close("cov_ref", covariance_reference(X.cpu(), None if mask is None else mask.cpu()), got, 1e-5)


# ------------------------------------------------------------------ rank-one edits


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (37, 70)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_one_update(shape, dtype, gen, helpers):
    W = helpers.rand(shape, dtype, gen)
    u = helpers.rand((shape[0],), torch.float32, gen)
    v = helpers.rand((shape[1],), torch.float32, gen)
    want = rank_one_update_reference_(W.cpu().clone(), u.cpu(), v.cpu())
    got = W.clone()
    assert rank_one_update_(got, u, v) is got
    assert got.dtype == dtype
    helpers.assert_close("W", want.float(), got.float(), TOL[dtype] if dtype != torch.float32 else 1e-6)
    exact = (W.cpu().double() + torch.outer(u.cpu().double(), v.cpu().double())).float()
    helpers.assert_close("W64", exact, got.float(), TOL[dtype])


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (37, 70), (130, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_direction_ablate(shape, dtype, gen, helpers):
    W = helpers.rand(shape, dtype, gen)
    r = helpers.rand((shape[0],), torch.float32, gen, scale=3.0)
    want = direction_ablate_reference_(W.cpu().clone(), r.cpu())
    got = W.clone()
    assert direction_ablate_(got, r) is got
    helpers.assert_close("W", want.float(), got.float(), TOL[dtype])
    rh = r.cpu().double() / r.cpu().double().norm()
    resid = (rh @ got.cpu().double()).abs().max().item()
    assert resid <= 1e-5 * max(1.0, W.cpu().float().abs().max().item()) or dtype != torch.float32
    with pytest.raises(ValueError):
        direction_ablate_(W.clone(), torch.zeros_like(r))
