"""Kernel benchmark cases, one module per op (as in `kernels/`), registered here in the
order the tables list them. `benchmarks/kernels.py` runs them.

GPU_SUITE: every op at the weight shapes (`--shapes`) and dtypes (`--dtypes`) on a CUDA
device (or, with `--smoke`, at one tiny shape on any device). CPU_SUITES: the comparisons
that mean something without a GPU, each at its own shapes.
"""

from __future__ import annotations

import torch

from . import activation_stats, rank_one, safelora, salora, topk, wanda_score
from .case import DTYPES, Case, Point, Suite, Trial

__all__ = ["DTYPES", "Case", "Point", "Suite", "Trial", "GPU_SUITE", "CPU_SUITES", "OP_GROUPS", "ALL_CASES"]


def _draw_weights(p: Point) -> None:
    """W [d_out, d_in] in the point's dtype and calibration norms s [d_in] in fp32."""
    p.inputs["W"] = p.randn(*p.shape)
    p.inputs["s"] = torch.rand(p.shape[1], generator=p.gen).to(p.dev) * 4 + 0.01


GPU_SUITE = Suite(
    "gpu",
    (*wanda_score.GPU, *topk.GPU, *activation_stats.GPU, *safelora.GPU, *salora.GPU, *rank_one.GPU),
    setup=_draw_weights,
)
CPU_SUITES = (safelora.CPU, activation_stats.CPU, topk.CPU_SELECT, topk.CPU_PAST_2_24)
ALL_CASES: tuple[Case, ...] = GPU_SUITE.cases + tuple(c for suite in CPU_SUITES for c in suite.cases)
OP_GROUPS = ("score", "prune", "mask", "stats", "safelora", "salora", "rank_one")
