"""Demo rows of the safety landscape: the straight path from the aligned model to the attacked one.

Scores (1 − α)·aligned + α·(aligned + ΔW_attack) at a few α (3 with --quick, 5 otherwise),
writes the curve (`landscape.png`) and the diff heatmap of aligned vs attacked
(`diff-heatmap.png`) into the demo's work directory. α = 0 and α = 1 reproduce the
`aligned` and `attacked` rows of the baseline module. The curve is reported, not searched
(no α is picked from it), so it is scored on the `test` halves like every other row.
"""

from __future__ import annotations

from surgery.testbed.demo_api import DemoContext, DemoRow

ORDER = 150
COST = 2  # rough seconds on the quick testbed: the demo starts heavy modules first


def rows(ctx: DemoContext) -> list[DemoRow]:
    """One row per α on the aligned → attacked path."""
    from surgery.analysis.diff import diff_checkpoints
    from surgery.analysis.landscape import alpha_grid, landscape
    from surgery.analysis.plots import diff_heatmap, landscape_plot

    tb = ctx.testbed
    alphas = alpha_grid(3 if ctx.quick else 5)
    with ctx.timer() as t:
        report = landscape(tb.aligned, tb.attacked, harmful=tb.eval_rows("harmful_eval", "test"),
                           task=tb.eval_rows("task_eval", "test"), benign=tb.eval_rows("benign_eval", "test"),
                           alphas=alphas, max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size,
                           progress=False, judge=ctx.judge())
    curve = landscape_plot(report, ctx.path("landscape.png"), force=True,
                           title="safety landscape: aligned (α=0) → attacked (α=1)")
    diff = diff_checkpoints(tb.aligned, tb.attacked, base=tb.base)
    heatmap = diff_heatmap(diff, ctx.path("diff-heatmap.png"), force=True,
                           title="aligned → attacked: ‖ΔW‖/‖W‖ per layer and module")
    moved = sorted({x.module_type for x in diff.tensors if x.status == "changed"})
    out = []
    for p in report.points:
        out.append(DemoRow(
            stage=f"aligned→attacked α={p.alpha:.2f}", method="landscape (interpolate weights)",
            harmful_score=p.harmful_score, task_accuracy=p.task_accuracy, over_refusal=p.over_refusal,
            keyword_harmful_score=p.keyword_harmful_score, other_share=p.other_share, seconds=round(p.seconds, 2),
            note=f"curve {curve.name}" if p.alpha == alphas[-1] else "",
            extra={"alpha": p.alpha, "plot": str(curve), "heatmap": str(heatmap), "moved_types": moved,
                   "total_seconds": round(t["seconds"], 2)},
        ))
    return out
