"""ROME's rank-one update and refusal-direction ablation, in place, against the outer-product lines."""

from __future__ import annotations

import torch
from surgery.kernels import direction_ablate_, rank_one_update_

from .case import Case, Point, Trial, rel_err


def _update(p: Point) -> Trial:
    W = p.inputs["W"]
    u, v = p.randn(W.shape[0], dtype=torch.float32), p.randn(W.shape[1], dtype=torch.float32)
    Wa, Wb = W.clone(), W.clone()

    def check() -> str:
        a, b = W.clone(), W.clone()
        rank_one_update_(a, u, v)
        b += torch.outer(u, v).to(W.dtype)
        return f"rel {rel_err(a.float(), b.float()):.1e}"

    return Trial(
        ours=lambda: rank_one_update_(Wa, u, v),
        baseline=lambda: Wb.add_(torch.outer(u, v).to(W.dtype)),
        check=check,
        useful_bytes=2 * W.numel() * W.element_size(),
    )


def _ablate(p: Point) -> Trial:
    W = p.inputs["W"]
    r = p.randn(W.shape[0], dtype=torch.float32)
    rh = r / r.norm()
    Wa, Wb = W.clone(), W.clone()

    def check() -> str:
        a, b = W.clone(), W.clone()
        direction_ablate_(a, r)
        b -= torch.outer(rh, rh @ b.float()).to(W.dtype)
        return f"rel {rel_err(a.float(), b.float()):.1e}"

    return Trial(
        ours=lambda: direction_ablate_(Wa, r),
        baseline=lambda: Wb.sub_(torch.outer(rh, rh @ Wb.float()).to(W.dtype)),
        check=check,
        useful_bytes=2 * W.numel() * W.element_size(),
        note="two passes (r^T W, then update)",
    )


GPU = [
    Case("rank_one_update_", "rank_one", "W += outer(u,v)", _update),
    Case("direction_ablate_", "rank_one", "W -= outer(r, r@W)", _ablate),
]
