"""Set-difference mask of safety-critical weights (Wei et al., ICML 2024).

S(q) = the top-q fraction of safety scores and U(p) = the top-p fraction of utility
scores, both over the flattened tensor; the mask is S(q) minus U(p): weights that
matter for safety but not for utility. Counts and ties follow `topk_mask` with
scope="tensor" (k = int(numel * fraction), ties by flat index, largest = last k);
note a fraction of 0 selects nothing (Python's `[-0:]` slice would select all).
"""

from __future__ import annotations

import torch

from .topk import topk_mask, topk_mask_reference

__all__ = ["setdiff_mask", "setdiff_mask_reference"]


def _check(safety_scores: torch.Tensor, utility_scores: torch.Tensor) -> None:
    if safety_scores.shape != utility_scores.shape:
        raise ValueError(
            f"safety and utility scores must have the same shape, got {tuple(safety_scores.shape)} "
            f"and {tuple(utility_scores.shape)}"
        )


def setdiff_mask_reference(
    safety_scores: torch.Tensor, utility_scores: torch.Tensor, p: float, q: float
) -> torch.Tensor:
    """top-q(safety) & ~top-p(utility) over the flattened tensor, via torch.sort."""
    _check(safety_scores, utility_scores)
    s = topk_mask_reference(safety_scores, q, largest=True, scope="tensor")
    u = topk_mask_reference(utility_scores, p, largest=True, scope="tensor")
    return s & ~u


def setdiff_mask(safety_scores: torch.Tensor, utility_scores: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """Bool mask of weights in the top-q safety scores but not the top-p utility scores."""
    _check(safety_scores, utility_scores)
    s = topk_mask(safety_scores, q, largest=True, scope="tensor")
    u = topk_mask(utility_scores, p, largest=True, scope="tensor")
    return s.logical_and_(~u)
