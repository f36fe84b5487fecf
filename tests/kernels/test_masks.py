"""Top-k masks, the fused Wanda prune, the Wanda score and the set-difference mask:
kernel against reference, masks exactly equal under the tie rule."""

from __future__ import annotations

import importlib

import pytest
import torch
from surgery.kernels import (
    setdiff_mask,
    setdiff_mask_reference,
    topk_mask,
    topk_mask_reference,
    wanda_prune_,
    wanda_prune_reference_,
    wanda_score,
    wanda_score_reference,
)

TOPK_TRITON = importlib.import_module("surgery.kernels.topk.triton")  # the kernels and launchers

HAS_CUDA = torch.cuda.is_available()
BF16 = pytest.param(
    torch.bfloat16,
    marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="interpreter bf16 is broken; needs CUDA")],
)
DTYPES = [torch.float32, torch.float16, BF16]
SHAPES = [(1, 1), (1, 300), (16, 1), (5, 45), (2, 1000)]  # interpreter: ~0.05 s per row program
DEV = "cuda" if HAS_CUDA else "cpu"


def scores_of(kind: str, shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Score tensors that stress the select: plain, heavy ties, ulp-close, specials."""
    n = 1
    for s in shape:
        n *= s
    if kind == "normal":
        x = torch.randn(n, generator=gen) * 3
    elif kind == "ties":  # few distinct values, +0.0 and -0.0 among them
        x = torch.randint(-3, 4, (n,), generator=gen).float() * 0.5
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where((x == 0) & flip, torch.full_like(x, -0.0), x)
    elif kind == "ulp":  # keys differ only in the lowest digits (last radix rounds)
        base = torch.full((n,), 1.0) if dtype == torch.float32 else torch.full((n,), 1.0)
        steps = torch.randint(0, 600 if dtype == torch.float32 else 6, (n,), generator=gen)
        x = base.to(dtype)
        for _ in range(int(steps.max()) if n else 0):
            bump = steps > 0
            x = torch.where(bump, torch.nextafter(x, torch.full_like(x, 2.0)), x)
            steps = steps - bump.long()
        sign = torch.rand(n, generator=gen) < 0.3
        x = torch.where(sign, -x, x).float()
    elif kind == "special":
        x = torch.randn(n, generator=gen)
        pick = torch.randint(0, 8, (n,), generator=gen)
        x = torch.where(pick == 0, torch.full_like(x, float("inf")), x)
        x = torch.where(pick == 1, torch.full_like(x, float("-inf")), x)
        x = torch.where(pick == 2, torch.full_like(x, float("nan")), x)
        x = torch.where(pick == 3, torch.full_like(x, -0.0), x)
        x = torch.where(pick == 4, torch.full_like(x, 0.0), x)
    else:
        raise AssertionError(kind)
    return x.reshape(shape).to(dtype).to(DEV)


def check_mask(scores, ratio, largest, scope, helpers, k=None, block=None):
    out = helpers.poison_(torch.empty(scores.shape, dtype=torch.bool, device=scores.device))
    got = topk_mask(scores, ratio, largest=largest, scope=scope, k=k, out=out, _block=block)
    want = topk_mask_reference(scores.cpu(), ratio, largest=largest, scope=scope, k=k)
    raw = got.view(torch.uint8).cpu()
    assert ((raw == 0) | (raw == 1)).all(), "unwritten mask elements"
    assert torch.equal(got.cpu(), want), f"mask differs in {(got.cpu() != want).sum().item()} places"
    n = scores.numel() if scope == "tensor" else scores.shape[-1]
    kk = k if k is not None else int(n * ratio)
    per = want.reshape(-1, n).sum(-1) if n else want.reshape(-1)
    assert (per == kk).all()


KIND_DTYPE = [
    ("normal", torch.float32),
    ("normal", torch.float16),
    ("ties", torch.float32),
    ("ties", torch.float16),
    ("special", torch.float32),
    ("special", torch.float16),
    pytest.param("normal", torch.bfloat16, marks=BF16.marks),
    pytest.param("ties", torch.bfloat16, marks=BF16.marks),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,dtype", KIND_DTYPE)
@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_topk_mask_exact(shape, dtype, kind, scope, gen, helpers):
    x = scores_of(kind, shape, dtype, gen)
    for largest in (True, False):
        ratio = float(torch.rand((), generator=gen))
        check_mask(x, ratio, largest, scope, helpers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_topk_mask_ulp_keys(dtype, scope, gen, helpers):
    """Keys that differ only in their low digits exercise every radix round."""
    x = scores_of("ulp", (6, 333), dtype, gen)
    for largest in (True, False):
        check_mask(x, float(torch.rand((), generator=gen)), largest, scope, helpers)


@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_topk_mask_chunked_blocks(scope, gen, helpers):
    """Rows/tensors longer than one block: the re-read path and the multi-block tie prefix."""
    for kind in ("normal", "ties"):
        x = scores_of(kind, (3, 1111), torch.float32, gen)
        for largest in (True, False):
            check_mask(x, float(torch.rand((), generator=gen)), largest, scope, helpers, block=256)


@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_topk_mask_counts_at_the_edges(scope, gen, helpers):
    x = scores_of("ties", (4, 77), torch.float32, gen)
    n = x.numel() if scope == "tensor" else 77
    for k in (0, 1, n - 1, n):
        for largest in (True, False):
            check_mask(x, 0.5, largest, scope, helpers, k=k)
    for ratio in (0.0, 1.0):
        check_mask(x, ratio, True, scope, helpers)


def test_topk_mask_higher_dims_and_int_scores(gen, helpers):
    x = torch.randint(-5, 5, (2, 3, 40), generator=gen).to(DEV)
    for scope in ("row", "tensor"):
        check_mask(x, 0.3, True, scope, helpers)


def test_topk_reference_is_the_sort_formulation(gen):
    """The reference equals Wanda's (lowest k per row) and Antidote's (highest) code."""
    x = torch.randint(0, 4, (5, 50), generator=gen).float()
    n, ratio = 50, 0.3
    k = int(n * ratio)
    idx = torch.sort(x, dim=-1, stable=True)[1]
    wanda = torch.zeros_like(x, dtype=torch.bool).scatter_(1, idx[:, :k], True)
    antidote = torch.zeros_like(x, dtype=torch.bool).scatter_(1, idx[:, n - k :], True)
    assert torch.equal(topk_mask_reference(x, ratio, largest=False), wanda)
    assert torch.equal(topk_mask_reference(x, ratio, largest=True), antidote)


def test_topk_mask_rejects_bad_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError):
        topk_mask(x, 1.5)
    with pytest.raises(ValueError):
        topk_mask(x, 0.5, scope="column")
    with pytest.raises(ValueError):
        topk_mask(x, 0.5, k=5)


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (9, 130)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_wanda_score(shape, dtype, gen, helpers):
    W = helpers.rand(shape, dtype, gen)
    s = torch.rand(shape[1], generator=gen).to(DEV) * 4 + 0.01
    got = wanda_score(W, s)
    want = wanda_score_reference(W.cpu(), s.cpu())
    assert got.dtype == torch.float32
    assert torch.equal(got.cpu(), want)  # correctly rounded sqrt on both sides: bit-identical


@pytest.mark.parametrize("shape", [(1, 300), (16, 1), (5, 45), (3, 600)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_wanda_prune_fused(shape, dtype, scope, gen, helpers):
    for largest in (False, True):
        W = helpers.rand(shape, dtype, gen)
        s = torch.rand(shape[1], generator=gen).to(DEV) * 4 + 0.01
        ratio = float(torch.rand((), generator=gen))
        want = wanda_prune_reference_(W.cpu().clone(), s.cpu(), ratio, largest=largest, scope=scope)
        got = W.clone()
        ret = wanda_prune_(got, s, ratio, largest=largest, scope=scope)
        assert ret is got
        assert torch.equal(got.cpu(), want)
        # the zeroed set is exactly the reference mask of the materialised score
        mask = topk_mask_reference(wanda_score_reference(W.cpu(), s.cpu()), ratio, largest, scope)
        assert torch.equal(got.cpu() == 0, mask | (W.cpu() == 0))


def test_wanda_prune_many_ties_and_chunks(gen, helpers):
    """Integer-valued weights and norms give many equal scores; 1111 columns > one 256-block."""
    W = torch.randint(1, 4, (3, 1111), generator=gen).float() * torch.where(
        torch.rand(3, 1111, generator=gen) < 0.5, -1.0, 1.0
    )
    s = torch.randint(1, 3, (1111,), generator=gen).float()
    W, s = W.to(DEV), s.to(DEV)
    for scope in ("row", "tensor"):
        for largest in (False, True):
            want = wanda_prune_reference_(W.cpu().clone(), s.cpu(), 0.45, largest, scope)
            got = wanda_prune_(W.clone(), s, 0.45, largest, scope, _block=256)
            assert torch.equal(got.cpu(), want)


def test_wanda_prune_noncontiguous(gen, helpers):
    base = helpers.rand((40, 12), torch.float32, gen)
    W = base.T  # [12, 40], column stride != 1
    s = torch.rand(40, generator=gen).to(DEV) + 0.1
    want = wanda_prune_reference_(W.cpu().clone(), s.cpu(), 0.5)
    wanda_prune_(W, s, 0.5)
    assert torch.equal(W.cpu(), want)


@pytest.mark.parametrize("shape", [(1, 500), (500, 1), (13, 57)])
def test_setdiff_mask(shape, gen, helpers):
    for kind in ("normal", "ties"):
        a = scores_of(kind, shape, torch.float32, gen)
        b = scores_of(kind, shape, torch.float32, gen)
        p, q = float(torch.rand((), generator=gen)), float(torch.rand((), generator=gen))
        got = setdiff_mask(a, b, p, q)
        want = setdiff_mask_reference(a.cpu(), b.cpu(), p, q)
        assert torch.equal(got.cpu(), want)
        # independent expectation: sort-based top-q minus top-p on flattened scores
        n = a.numel()
        ia = torch.sort(a.cpu().float().flatten(), stable=True)[1]
        ib = torch.sort(b.cpu().float().flatten(), stable=True)[1]
        sa, sb = set(ia[n - int(n * q) :].tolist()), set(ib[n - int(n * p) :].tolist())
        expect = torch.zeros(n, dtype=torch.bool)
        expect[sorted(sa - sb)] = True
        assert torch.equal(want.flatten(), expect)


def test_tensor_scope_beyond_2_24_elements(gen):
    """Per-tensor select past torch.quantile's 2^24 limit, kernel path, exact vs sort."""
    n = (1 << 24) + 4099
    x = torch.randn(n, generator=gen).to(DEV)
    x[::7] = 0.25  # a block of ties straddling every program block
    k = int(n * 0.37)
    got = topk_mask(x, 0.37, largest=True, scope="tensor")
    assert int(got.sum()) == k
    thr_idx = torch.sort(x.cpu(), stable=True)[1][n - k :]
    want = torch.zeros(n, dtype=torch.bool)
    want[thr_idx] = True
    assert torch.equal(got.cpu(), want)


def test_histogram_without_mask_argument(monkeypatch, gen, helpers):
    """The portable path for Tritons whose tl.histogram lacks mask= (bin-0 subtraction)."""
    monkeypatch.setattr(TOPK_TRITON, "_HIST_HAS_MASK", TOPK_TRITON.tl.constexpr(False))
    if HAS_CUDA:  # compiled kernels cache per constexpr value of globals only on recompile
        pytest.skip("checked under the interpreter")
    x = scores_of("ties", (3, 300), torch.float32, gen)
    for scope in ("row", "tensor"):
        for largest in (True, False):
            check_mask(x, float(torch.rand((), generator=gen)), largest, scope, helpers, block=256)


@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_bf16_key_format_under_the_interpreter(monkeypatch, scope, gen, helpers):
    """bf16 scores use 16-bit keys (2 radix rounds, shift 16). The interpreter cannot load
    bf16, so feed bf16-representable fp32 scores through that key format: exact masks."""
    monkeypatch.setattr(TOPK_TRITON, "_key_format", lambda dtype: (2, 16))
    for kind in ("normal", "ties", "special"):
        x = scores_of(kind, (4, 300), torch.float32, gen).to(torch.bfloat16).float()
        for largest in (True, False):
            check_mask(x, float(torch.rand((), generator=gen)), largest, scope, helpers, block=256)
