"""Demo rows for the testbed's own stages: base, aligned, attacked (harmful fine-tuning), benign-ft."""

from __future__ import annotations

from surgery.testbed.demo_api import DemoContext, DemoRow

ORDER = 0
COST = 6  # rough seconds on the quick testbed: the demo starts heavy modules first


def rows(ctx: DemoContext) -> list[DemoRow]:
    """Evaluate the four testbed models; `seconds` is the stage's build time when built in this run."""
    tb = ctx.testbed
    built = tb.manifest.get("build_seconds") or {}
    ratio = tb.manifest.get("ratio", 0.1)
    stages = [
        ("base", "pretrain (benign)", tb.base, None, "base"),
        ("aligned", "alignment SFT", tb.aligned, None, "aligned"),
        ("attacked", f"harmful fine-tune p={ratio:g}", tb.aligned, tb.attacked, "attacked"),
        ("benign-ft", "benign fine-tune p=0", tb.aligned, tb.benign_ft, "benign-ft"),
    ]
    out = []
    for stage, method, model, adapter, key in stages:
        res = ctx.evaluate(model, adapter)
        seconds = built.get(key)
        out.append(DemoRow.from_eval(stage, method, res, seconds=seconds,
                                     note="" if seconds is not None else "prebuilt",
                                     eval_seconds=round(res.seconds, 2)))
    return out
