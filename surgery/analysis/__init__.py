"""Where and how weights moved: checkpoint/adapter diffs, subspace metrics, the safety landscape.

- `surgery.analysis.metrics`: pure ΔW metrics, dense or factored (`LowRank`), never forming a LoRA ΔW;
- `surgery.analysis.diff`: `diff_checkpoints(a, b, base=None) -> DiffReport`, the streaming driver;
- `surgery.analysis.landscape`: `landscape(a, b, harmful=...) -> LandscapeReport` (HS/FA along A → B);
- `surgery.analysis.plots`: `diff_heatmap`, `landscape_plot` (PNG, atomic).
"""

from surgery.analysis.diff import DiffReport, TensorDiff, diff_checkpoints
from surgery.analysis.landscape import LandscapeReport, landscape
from surgery.analysis.metrics import DeltaMetrics, LowRank, delta_metrics

__all__ = ["DeltaMetrics", "DiffReport", "LandscapeReport", "LowRank", "TensorDiff", "delta_metrics",
           "diff_checkpoints", "landscape"]
