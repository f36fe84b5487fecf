"""Top-k masks and the fused Wanda prune against the sort formulations of Wanda and Antidote,
torch.kthvalue, and (on a CPU, past 2^24 elements) torch.quantile."""

from __future__ import annotations

import torch
from surgery.kernels import topk_mask, topk_mask_reference, wanda_prune_, wanda_prune_reference_

from .case import Case, Point, Suite, Trial

RATIO = 0.5


def baseline_wanda_row(W: torch.Tensor, s: torch.Tensor, ratio: float) -> None:
    """locuslab/wanda `prune_wanda`: score, stable sort per row, scatter, zero."""
    W_metric = torch.abs(W) * torch.sqrt(s.reshape(1, -1))
    W_mask = torch.zeros_like(W_metric) == 1
    sort_res = torch.sort(W_metric, dim=-1, stable=True)
    indices = sort_res[1][:, : int(W_metric.shape[1] * ratio)]
    W_mask.scatter_(1, indices, True)
    W[W_mask] = 0


def baseline_row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Antidote-style highest-k per row via stable sort + scatter."""
    n = score.shape[1]
    k = int(n * ratio)
    idx = torch.sort(score, dim=-1, stable=True)[1][:, n - k :]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def baseline_tensor_sort(score: torch.Tensor, ratio: float) -> torch.Tensor:
    flat = score.flatten().float()
    n = flat.numel()
    k = int(n * ratio)
    idx = torch.sort(flat, stable=True)[1][n - k :]
    return torch.zeros(n, dtype=torch.bool, device=score.device).scatter_(0, idx, True).reshape(score.shape)


def baseline_tensor_kthvalue(score: torch.Tensor, ratio: float) -> torch.Tensor:
    flat = score.flatten().float()
    n = flat.numel()
    k = int(n * ratio)
    thr = torch.kthvalue(flat, n - k + 1).values
    return score.float() >= thr


def _esz(p: Point) -> int:
    return torch.finfo(p.dtype).bits // 8


def _score_of(p: Point) -> torch.Tensor:
    """The Wanda score in the weight dtype, shared by the mask cases."""
    W, s = p.inputs["W"], p.inputs["s"]
    return p.shared("score", lambda: (W.float().abs() * torch.sqrt(s).reshape(1, -1)).to(p.dtype))


# ----------------------------------------------------------------------------- GPU


def _prune_row(p: Point) -> Trial:
    """In place: repeated runs keep the work per run the same (a pruned row prunes the same weights)."""
    W, s = p.inputs["W"], p.inputs["s"]
    Wa, Wb = W.clone(), W.clone()

    def check() -> str:
        a, b = W.clone(), W.clone()
        wanda_prune_(a, s, RATIO)
        baseline_wanda_row(b, s, RATIO)
        return "exact" if torch.equal(a, b) else "MISMATCH"

    return Trial(
        ours=lambda: wanda_prune_(Wa, s, RATIO),
        baseline=lambda: baseline_wanda_row(Wb, s, RATIO),
        check=check,
        useful_bytes=2 * W.numel() * _esz(p),
    )


def _mask_row(p: Point) -> Trial:
    score = _score_of(p)

    def check() -> str:
        same = torch.equal(topk_mask(score, RATIO, largest=True, scope="row"), baseline_row_mask(score.float(), RATIO))
        return "exact" if same else "MISMATCH"

    return Trial(
        ours=lambda: topk_mask(score, RATIO, largest=True, scope="row"),
        baseline=lambda: baseline_row_mask(score, RATIO),
        check=check,
        useful_bytes=score.numel() * (_esz(p) + 1),
    )


def _mask_tensor_sort(p: Point) -> Trial:
    score = _score_of(p)

    def check() -> str:
        same = torch.equal(topk_mask(score, RATIO, largest=True, scope="tensor"), baseline_tensor_sort(score, RATIO))
        return "exact" if same else "MISMATCH"

    return Trial(
        ours=lambda: topk_mask(score, RATIO, largest=True, scope="tensor"),
        baseline=lambda: baseline_tensor_sort(score, RATIO),
        check=check,
        useful_bytes=score.numel() * (_esz(p) + 1),
        note=f"{score.numel() / 2**24:.1f}x 2^24 elements",
        baseline_may_oom=True,
    )


def _mask_tensor_kthvalue(p: Point) -> Trial:
    """kthvalue gives a threshold, not a tie-exact mask: the check compares the counts."""
    score = _score_of(p)
    numel = score.numel()

    def check() -> str:
        count = int(topk_mask(score, RATIO, largest=True, scope="tensor").sum())
        return "count equal" if count == int(numel * RATIO) else "MISMATCH"

    return Trial(
        ours=lambda: topk_mask(score, RATIO, largest=True, scope="tensor"),
        baseline=lambda: baseline_tensor_kthvalue(score, RATIO),
        check=check,
        useful_bytes=numel * (_esz(p) + 1),
        note="kthvalue threshold ignores ties",
        quick_baseline=True,
    )


GPU = [
    Case("wanda_prune_ row (fused)", "prune", "wanda sort+scatter", _prune_row),
    Case("topk_mask row", "mask", "sort+scatter", _mask_row),
    Case("topk_mask tensor", "mask", "torch.sort flat", _mask_tensor_sort),
    Case("topk_mask tensor", "mask", "torch.kthvalue flat", _mask_tensor_kthvalue),
]


# ----------------------------------------------------------------------------- CPU


def _draw_select_inputs(p: Point) -> None:
    """A uniform score, bf16 weights and norms per shape, for the CPU select cases."""
    p.inputs["score"] = torch.rand(p.shape, generator=p.gen)
    p.inputs["W"] = torch.randn(p.shape, generator=p.gen).to(torch.bfloat16)
    p.inputs["s"] = torch.rand(p.shape[1], generator=p.gen)


def _cpu_select(scope: str, ratio: float):
    def prepare(p: Point) -> Trial:
        score = p.inputs["score"]

        def check() -> str:
            same = torch.equal(topk_mask(score, ratio, True, scope), topk_mask_reference(score, ratio, True, scope))
            return "mask equal" if same else "MISMATCH"

        return Trial(
            ours=lambda: topk_mask(score, ratio, True, scope),
            baseline=lambda: topk_mask_reference(score, ratio, True, scope),
            check=check,
            useful_bytes=score.numel() * 5,
            quick_baseline=True,
        )

    return prepare


def _cpu_prune(p: Point) -> Trial:
    W, s = p.inputs["W"], p.inputs["s"]

    def check() -> str:
        same = torch.equal(wanda_prune_(W.clone(), s, 0.5), wanda_prune_reference_(W.clone(), s, 0.5))
        return "weights equal" if same else "MISMATCH"

    return Trial(
        ours=lambda: wanda_prune_(W.clone(), s, 0.5),
        baseline=lambda: wanda_prune_reference_(W.clone(), s, 0.5),
        check=check,
        useful_bytes=W.numel() * 4,
        dtype="bf16",
        note="both times include a clone",
        quick_baseline=True,
    )


def _quantile_refusal(x: torch.Tensor) -> str:
    try:
        torch.quantile(x.flatten(), 0.5)
        return "torch.quantile worked"
    except RuntimeError as exc:
        return "torch.quantile: " + str(exc).split("\n")[0][:60]


def _cpu_tensor_past_2_24(p: Point) -> Trial:
    """A per-tensor mask where torch.quantile refuses: only ours is timed."""
    x = torch.randn(p.shape, generator=p.gen)
    n = x.numel()
    note = f"{n / 2**24:.2f}x 2^24 elements; {_quantile_refusal(x)}; CPU path = select_cpu's radix histograms"

    def check() -> str:
        return "count exact" if int(topk_mask(x, 0.5, scope="tensor").sum()) == int(n * 0.5) else "MISMATCH"

    return Trial(
        ours=lambda: topk_mask(x, 0.5, scope="tensor"),
        baseline=None,
        check=check,
        useful_bytes=n * 5,
        note=note,
        quick_ours=True,
    )


# the sort-free CPU select (compiled row select, numpy per tensor) vs the sort
CPU_SELECT = Suite(
    "cpu select",
    (
        Case("topk_mask row 0.1 (CPU select)", "mask", "torch.sort", _cpu_select("row", 0.1)),
        Case("topk_mask tensor 0.5 (CPU select)", "mask", "torch.sort", _cpu_select("tensor", 0.5)),
        Case("wanda_prune_ row 0.5 (CPU select)", "prune", "score + torch.sort + fill", _cpu_prune),
    ),
    shapes=lambda quick: [(2048, 5632)] if quick else [(2048, 5632), (4096, 14336)],
    dtypes=("fp32",),
    setup=_draw_select_inputs,
)
CPU_PAST_2_24 = Suite(
    "cpu tensor mask past 2^24",
    (Case("topk_mask tensor", "mask", "torch.quantile", _cpu_tensor_past_2_24),),
    shapes=lambda quick: [(4096, 4097)],
    dtypes=("fp32",),
)
