"""The sort-based top-k references: plain PyTorch, fp32 math, the source of truth.

Tie rule (every mask in this package): elements are totally ordered by
(score, flat index), exactly as `torch.sort(stable=True)` orders them; the
"smallest k" are the first k in that order and the "largest k" are the last k.
NaN sorts above +inf (all NaNs equal), and -0.0 equals +0.0, as in torch.sort.
Scores are compared in fp32 (`scores.float()`), whatever their dtype.

Count: k = int(n * ratio), where n is the row length (scope="row") or the number
of elements (scope="tensor"); an explicit `k=` overrides the ratio (Antidote's own
count, n - int(n * (1 - ratio)), can differ from int(n * ratio) by one).
The Triton kernels (`triton.py`) and the CPU select (`cpu.py`) give these masks
element for element; the tests compare them.
"""

from __future__ import annotations

import torch

from ..wanda_score import wanda_score_reference

__all__ = ["topk_mask_reference", "wanda_prune_reference_", "mask_count", "prune_count"]

_SCOPES = ("row", "tensor")



def _count(n: int, ratio: float, k: int | None) -> int:
    if k is not None:
        k = int(k)
        if not 0 <= k <= n:
            raise ValueError(f"k={k} must lie in [0, {n}]")
        return k
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio} must lie in [0, 1]")
    return int(n * ratio)


def _check_scope(scope: str) -> None:
    if scope not in _SCOPES:
        raise ValueError(f"scope must be 'row' or 'tensor', got {scope!r}")


def mask_count(scores: torch.Tensor, ratio: float, scope: str, k: int | None) -> tuple[int, int]:
    """(group size n, count k) of a mask request, after checking scope, shape and count."""
    _check_scope(scope)
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension")
    n = scores.numel() if scope == "tensor" else scores.shape[-1]
    return n, _count(n, ratio, k)


def prune_count(W: torch.Tensor, sq_norms: torch.Tensor, ratio: float, scope: str, k: int | None) -> tuple[int, int]:
    """(group size n, count k) of a Wanda prune request, after checking scope, shapes and count."""
    _check_scope(scope)
    if W.dim() != 2 or sq_norms.dim() != 1 or sq_norms.shape[0] != W.shape[1]:
        raise ValueError(
            f"wanda_prune_ needs W [d_out, d_in] and sq_norms [d_in], got {tuple(W.shape)} and {tuple(sq_norms.shape)}"
        )
    n = W.numel() if scope == "tensor" else W.shape[1]
    return n, _count(n, ratio, k)


def topk_mask_reference(
    scores: torch.Tensor,
    ratio: float,
    largest: bool = True,
    scope: str = "row",
    k: int | None = None,
) -> torch.Tensor:
    """Bool mask of the k largest (or smallest) scores, via torch.sort(stable=True).

    The formulation of Wanda (lowest k per row) and Antidote (highest k per row);
    the source of truth for the tie rule in the module docstring.
    """
    n, kk = mask_count(scores, ratio, scope, k)
    x = scores.float()
    x = x.reshape(1, -1) if scope == "tensor" else x.reshape(-1, n)
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if kk > 0 and x.numel() > 0:
        idx = torch.sort(x, dim=-1, stable=True)[1]
        sel = idx[:, n - kk :] if largest else idx[:, :kk]
        mask.scatter_(1, sel, True)
    return mask.reshape(scores.shape)


def wanda_prune_reference_(
    W: torch.Tensor,
    sq_norms: torch.Tensor,
    ratio: float,
    largest: bool = False,
    scope: str = "row",
    k: int | None = None,
) -> torch.Tensor:
    """Zero, in place, the weights whose Wanda score is among the k smallest (largest); returns W."""
    mask = topk_mask_reference(wanda_score_reference(W, sq_norms), ratio, largest, scope, k)
    W.masked_fill_(mask, 0)
    return W


