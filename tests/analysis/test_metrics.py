"""The tensor metrics against dense NumPy/SciPy computations on small random tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from surgery.analysis import metrics as M


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _lowrank(m: int, n: int, r: int, seed: int) -> M.LowRank:
    rng = np.random.default_rng(seed)
    b = torch.from_numpy(rng.standard_normal((m, r)).astype(np.float32))
    a = torch.from_numpy(rng.standard_normal((r, n)).astype(np.float32))
    return M.LowRank.from_lora(b, a, 0.37)


def _np_svals(x: np.ndarray) -> np.ndarray:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    tol = s.max() * max(x.shape) * np.finfo(np.float32).eps
    return s[s > tol]


def test_frob_and_inner_lowrank_equal_dense() -> None:
    d = _lowrank(40, 24, 5, seed=1)
    dense = d.dense().numpy().astype(np.float64)
    x = _rand(40, 24, seed=2).numpy().astype(np.float64)
    assert M.frob_sq(d) == pytest.approx(np.sum(dense**2), rel=1e-5)
    assert M.inner(torch.from_numpy(x).float(), d) == pytest.approx(np.sum(x * dense), rel=1e-4, abs=1e-4)
    # the scale is applied once, in the delta
    b, a = torch.ones(3, 1), torch.ones(1, 2)
    assert M.LowRank.from_lora(b, a, 2.0).dense().tolist() == [[2.0, 2.0]] * 3
    assert M.LowRank.from_lora(b, a, 2.0, transpose=True).dense().shape == (2, 3)


def test_lowrank_spectrum_equals_dense_svd() -> None:
    d = _lowrank(50, 30, 6, seed=3)
    spec = M.spectrum(d, 4)
    ref = _np_svals(d.dense().numpy())
    assert spec.method == "lowrank" and spec.full and spec.numerical_rank == 6
    np.testing.assert_allclose(spec.values.numpy(), ref, rtol=1e-5)
    # left vectors span the same space as numpy's top-4 left singular vectors
    u_ref = np.linalg.svd(d.dense().numpy().astype(np.float64))[0][:, :4]
    angles = scipy.linalg.subspace_angles(spec.left.double().numpy(), u_ref)
    assert np.max(angles) < 1e-4


def test_stable_and_effective_rank_against_numpy() -> None:
    x = _rand(30, 20, seed=4)
    s = np.linalg.svd(x.numpy().astype(np.float64), compute_uv=False)
    fro2 = np.sum(x.numpy().astype(np.float64) ** 2)
    assert M.stable_rank(fro2, s[0]) == pytest.approx(fro2 / s[0] ** 2)
    p = s / s.sum()
    assert M.effective_rank(torch.from_numpy(s)) == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-12)
    # hand-checked: rank one -> 1, k equal values -> k
    assert M.effective_rank([3.0]) == pytest.approx(1.0)
    assert M.effective_rank([2.0, 2.0, 2.0, 2.0, 0.0]) == pytest.approx(4.0)
    m = M.delta_metrics(torch.zeros(30, 20), x)
    assert m.stable_rank == pytest.approx(fro2 / s[0] ** 2, rel=1e-5)
    assert m.effective_rank == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-5)
    np.testing.assert_allclose(m.singular_values, s[:8], rtol=1e-5)


@pytest.mark.parametrize("dims", [(40, 3, 3), (40, 5, 2), (64, 8, 8), (12, 4, 6)])
def test_principal_angles_match_scipy(dims: tuple[int, int, int]) -> None:
    m, k1, k2 = dims
    rng = np.random.default_rng(k1 * 10 + k2)
    q1 = np.linalg.qr(rng.standard_normal((m, k1)))[0]
    q2 = np.linalg.qr(rng.standard_normal((m, k2)))[0]
    ours = M.principal_angles(torch.from_numpy(q1), torch.from_numpy(q2)).numpy()
    ref = np.sort(scipy.linalg.subspace_angles(q1, q2))
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_principal_angles_small_angles_accurate() -> None:
    rng = np.random.default_rng(7)
    q1 = np.linalg.qr(rng.standard_normal((50, 4)))[0]
    q2 = np.linalg.qr(q1 + 1e-7 * rng.standard_normal((50, 4)))[0]
    ours = M.principal_angles(torch.from_numpy(q1), torch.from_numpy(q2)).numpy()
    ref = np.sort(scipy.linalg.subspace_angles(q1, q2))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-14)
    assert ours.max() < 1e-6  # arccos alone would give ~1e-8 noise amplified to ~1e-4 in fp32


def test_energy_share_dense_and_lowrank() -> None:
    d = _lowrank(40, 30, 3, seed=8)
    u = torch.from_numpy(np.linalg.qr(np.random.default_rng(9).standard_normal((40, 5)))[0])
    dense = d.dense().numpy().astype(np.float64)
    ref = np.sum((u.numpy().T @ dense) ** 2) / np.sum(dense**2)
    assert M.energy_share(u, d) == pytest.approx(ref, rel=1e-5)
    assert M.energy_share(u, d.dense()) == pytest.approx(ref, rel=1e-4)
    # ΔW inside span(U): all of its energy
    inside = M.LowRank(u[:, :2].float(), _rand(2, 30, seed=10))
    assert M.energy_share(u, inside) == pytest.approx(1.0, abs=1e-6)


def test_randomized_svd_recovers_top_values() -> None:
    rng = np.random.default_rng(11)
    u = np.linalg.qr(rng.standard_normal((300, 300)))[0]
    v = np.linalg.qr(rng.standard_normal((200, 200)))[0]
    s = 0.8 ** np.arange(200)
    x = torch.from_numpy(((u[:, :200] * s) @ v.T).astype(np.float32))
    uu, ss = M.randomized_svd(x, 8, seed=0)
    np.testing.assert_allclose(ss.numpy(), s[:8], rtol=1e-4)
    assert np.max(scipy.linalg.subspace_angles(uu.double().numpy(), u[:, :8])) < 1e-3
    u2, s2 = M.randomized_svd(x, 8, seed=0)
    assert torch.equal(ss, s2) and torch.equal(uu, u2)  # seeded: same bytes
    spec = M.spectrum(x, 8, exact=False)
    assert spec.method == "randomized" and not spec.full and spec.values.numel() == M.SPECTRUM_K


def _assert_same_metrics(a: M.DeltaMetrics, b: M.DeltaMetrics) -> None:
    for name in ("norm_w", "norm_delta", "rel_change", "cosine", "max_abs", "changed_share", "stable_rank",
                 "effective_rank", "norm_v", "cosine_v", "energy_in_v"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x == pytest.approx(y, rel=1e-4, abs=1e-6), name
    np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-4)
    assert a.numerical_rank == b.numerical_rank
    np.testing.assert_allclose(a.principal_angles, b.principal_angles, atol=1e-4)


@pytest.mark.parametrize("transpose", [False, True])
def test_adapter_form_equals_materialised_delta(transpose: bool) -> None:
    """Every metric of a LoRA delta computed from its factors equals the dense ΔW's."""
    rng = np.random.default_rng(12)
    m, n, r = 48, 36, 4
    w = _rand(m, n, seed=13)
    lb = torch.from_numpy(rng.standard_normal((n if transpose else m, r)).astype(np.float32))
    la = torch.from_numpy(rng.standard_normal((r, m if transpose else n)).astype(np.float32))
    low = M.LowRank.from_lora(lb, la, 0.5, transpose=transpose)
    dense = low.dense()
    v = _lowrank(m, n, 6, seed=14).dense() + 0.01 * _rand(m, n, seed=15)
    a = M.delta_metrics(w, low, v, rank=3, top=5)
    b = M.delta_metrics(w, dense, v, rank=3, top=5)
    _assert_same_metrics(a, b)
    assert a.spectrum == "lowrank" and b.spectrum == "exact" and a.numerical_rank == r
    # and both against plain numpy formulas
    wn, dn, vn = (t.numpy().astype(np.float64) for t in (w, dense, v))
    bn = wn + dn
    assert a.rel_change == pytest.approx(np.linalg.norm(dn) / np.linalg.norm(wn), rel=1e-5)
    assert a.cosine == pytest.approx(np.sum(wn * bn) / np.linalg.norm(wn) / np.linalg.norm(bn), rel=1e-6)
    assert a.max_abs == pytest.approx(np.abs(dn).max(), rel=1e-5)
    assert a.changed_share == 1.0
    assert a.cosine_v == pytest.approx(np.sum(vn * dn) / np.linalg.norm(vn) / np.linalg.norm(dn), rel=1e-4)
    uv = np.linalg.svd(vn)[0][:, :3]
    ud = np.linalg.svd(dn)[0][:, :3]
    np.testing.assert_allclose(a.principal_angles, np.sort(scipy.linalg.subspace_angles(uv, ud)), atol=1e-4)
    assert a.energy_in_v == pytest.approx(np.sum((uv.T @ dn) ** 2) / np.sum(dn**2), rel=1e-4)


def test_changed_share_and_blocks() -> None:
    d = torch.zeros(100, 30)
    d[3, 4] = -2.5
    d[77, :] = 0.1
    mx, share = M.blockwise_entry_stats(d)
    assert mx == 2.5 and share == pytest.approx(31 / 3000)
    assert M.blockwise_entry_stats(d, atol=0.2)[1] == pytest.approx(1 / 3000)
    assert sum(s.stop - s.start for s in M.row_blocks(100, 30, max_elements=64)) == 100
    assert all(s.stop - s.start == 2 for s in list(M.row_blocks(100, 30, max_elements=64))[:-1])
    low = M.LowRank(torch.zeros(100, 1), torch.zeros(1, 30))
    low.left[5, 0] = 1.0
    low.right[0, :10] = -3.0
    assert M.blockwise_entry_stats(low) == (3.0, pytest.approx(10 / 3000))


def test_zero_delta_and_vectors() -> None:
    w = _rand(10, 8, seed=16)
    m = M.delta_metrics(w, torch.zeros(10, 8), torch.ones(10, 8))
    assert m.rel_change == 0.0 and m.cosine == 1.0 and m.stable_rank is None and m.numerical_rank == 0
    assert m.cosine_v is None and m.principal_angles is None and m.energy_in_v is None
    vec = M.delta_metrics(torch.ones(6), torch.tensor([0.0, 0, 0, 0, 0, 1.0]))
    assert vec.rel_change == pytest.approx(1 / math.sqrt(6))
    assert vec.cosine == pytest.approx(7 / math.sqrt(6 * 9))  # A = 1, B = (1, 1, 1, 1, 1, 2)
    assert vec.stable_rank is None and vec.singular_values == []


def test_factored_delta_is_never_materialised() -> None:
    """No single allocation while measuring a LoRA ΔW (with V) is as large as the m×n ΔW itself."""
    from torch.profiler import ProfilerActivity, profile

    m = n = 2048
    w, v = _rand(m, n, seed=17), _rand(m, n, seed=18)
    low = _lowrank(m, n, 4, seed=19)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        M.delta_metrics(w, low, v, rank=4)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < m * n * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        low.dense()  # the control: forming ΔW is one m×n allocation, which the profiler sees
    assert max(e.cpu_memory_usage for e in prof.events()) >= m * n * 4
