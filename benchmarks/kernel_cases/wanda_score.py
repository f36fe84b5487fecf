"""Wanda score |W| * sqrt(s) against Wanda's own `W_metric` line."""

from __future__ import annotations

import torch
from surgery.kernels import wanda_score

from .case import Case, Point, Trial


def _score(p: Point) -> Trial:
    W, s = p.inputs["W"], p.inputs["s"]
    d_out, d_in = W.shape
    esz = torch.finfo(W.dtype).bits // 8

    def check() -> str:
        same = torch.equal(wanda_score(W, s), W.float().abs() * torch.sqrt(s.double()).float().reshape(1, -1))
        return "exact" if same else "MISMATCH"

    return Trial(
        ours=lambda: wanda_score(W, s),
        baseline=lambda: W.abs() * torch.sqrt(s.reshape(1, -1)),
        check=check,
        useful_bytes=d_out * d_in * (esz + 4) + 4 * d_in,
    )


GPU = [Case("wanda_score", "score", "abs(W)*sqrt(s)", _score)]
