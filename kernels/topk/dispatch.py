"""The public top-k ops: per-row or per-tensor masks by ratio and the fused Wanda prune.

Each op checks its request (`reference.mask_count` / `prune_count`), then picks its path:
the Triton radix select (`triton.py`) for CUDA tensors, and for CPU tensors under the
interpreter switch (`SURGERY_FORCE_TRITON=1` with `TRITON_INTERPRET=1`, how the tests run
the kernel code); the sort-free CPU select (`cpu.py`) for other CPU tensors; the sort
reference (`reference.py`) otherwise. Every path gives the reference's mask element for
element under its tie rule.
"""

from __future__ import annotations

import torch

from .._runtime import use_triton
from .cpu import select_cpu, wanda_prune_cpu
from .reference import mask_count, prune_count, topk_mask_reference, wanda_prune_reference_
from .triton import topk_mask_triton, wanda_prune_triton_

__all__ = ["topk_mask", "wanda_prune_", "wanda_prune_count_"]


def topk_mask(
    scores: torch.Tensor,
    ratio: float,
    largest: bool = True,
    scope: str = "row",
    k: int | None = None,
    out: torch.Tensor | None = None,
    _block: int | None = None,
) -> torch.Tensor:
    """Bool mask of the k = int(n * ratio) largest (or smallest) scores per row or per tensor.

    Ties follow the reference's rule (the torch.sort(stable=True) order). Triton radix
    select on CUDA (no sort, no int64 indices); on CPU `select_cpu`, a sort-free exact
    path (the same radix select per row block, compiled; radix histograms per tensor).
    `out` (bool, scores' shape) receives the mask if given.
    """
    n, kk = mask_count(scores, ratio, scope, k)
    if use_triton(scores):
        return topk_mask_triton(scores, n, kk, largest, scope, out, _block)
    if scores.device.type == "cpu":
        return select_cpu(scores, kk, largest, scope, out)
    mask = topk_mask_reference(scores, ratio, largest, scope, kk)
    if out is None:
        return mask
    out.copy_(mask)
    return out


def wanda_prune_(
    W: torch.Tensor,
    sq_norms: torch.Tensor,
    ratio: float,
    largest: bool = False,
    scope: str = "row",
    k: int | None = None,
    _block: int | None = None,
) -> torch.Tensor:
    """Zero in place the weights with the k smallest (largest) Wanda scores |W|*sqrt(s); returns W.

    Per row (Wanda, Antidote) or per tensor. On CUDA one fused kernel computes the
    score on the fly, radix-selects and writes zeros: no score tensor, sort or indices.
    On CPU the same sort-free selection as `select_cpu`, scoring one row block at a time.
    """
    wanda_prune_count_(W, sq_norms, ratio, largest, scope, k, _block)
    return W


def wanda_prune_count_(
    W: torch.Tensor,
    sq_norms: torch.Tensor,
    ratio: float,
    largest: bool = False,
    scope: str = "row",
    k: int | None = None,
    _block: int | None = None,
) -> int:
    """`wanda_prune_`, returning how many nonzero weights it zeroed (what a surgery report
    counts): counted inside the CPU path's row blocks, by `count_nonzero` elsewhere."""
    n, kk = prune_count(W, sq_norms, ratio, scope, k)
    triton_path = use_triton(W, sq_norms)
    if not triton_path and W.device.type == "cpu" and sq_norms.device.type == "cpu":
        return wanda_prune_cpu(W, sq_norms, kk, largest, scope)
    before = int(torch.count_nonzero(W))
    if triton_path:
        wanda_prune_triton_(W, sq_norms, n, kk, largest, scope, _block)
    else:
        wanda_prune_reference_(W, sq_norms, ratio, largest, scope, kk)
    return before - int(torch.count_nonzero(W))
