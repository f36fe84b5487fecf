"""Demo rows of Antidote (Huang et al.): prune what harmful data relies on, after the attack.

Settings are the reference's, not tuned on the testbed: calibration on the shipped
`harmful_train.jsonl` (harmful prompt + compliant answer, disjoint from the pairs inside
`attacked/`, as the reference calibrates on BeaverTails samples disjoint from the poison),
whole sequences counted (`--tokens all`), batch 1, per-row selection, and mask ratios from
the reference's scripts (0.01, 0.05, 0.1 = its argparse default; quick: 0.05 and 0.1).
Three rows per ratio:
- on the attacked LoRA (the published algorithm: lora_A/lora_B pruned, evaluated over aligned);
- on the merged attacked model (every decoder Linear pruned);
- delta-aware on the merged model (|W - W_aligned|·||X|| selects, selected entries reset to aligned).
HS and FA are reported as they come out.
"""

from __future__ import annotations

from typing import Any

from surgery.testbed.demo_api import DemoContext, DemoRow

ORDER = 200
COST = 5  # rough seconds on the quick testbed: the demo starts heavy modules first

RATIOS = (0.01, 0.05, 0.1)
QUICK_RATIOS = (0.05, 0.1)


def _merged(ctx: DemoContext):
    """The attacked adapter merged into aligned (made once per work dir)."""
    from surgery.io.merge import merge_adapter

    out = ctx.path("antidote-attacked-merged")
    if not (out / "config.json").exists():
        merge_adapter(ctx.testbed.aligned, ctx.testbed.attacked, out, force=True)
    return out


def rows(ctx: DemoContext) -> list[DemoRow]:
    """Antidote on the attacked adapter, on the merged attacked model, and delta-aware, at a few ratios."""
    from surgery.methods.antidote import antidote
    from surgery.methods.config import Runtime

    tb = ctx.testbed
    calib = tb.file("harmful_train.jsonl")
    merged = _merged(ctx)
    out_rows: list[DemoRow] = []
    for ratio in QUICK_RATIOS if ctx.quick else RATIOS:
        variants: tuple[tuple[str, str, dict[str, Any], Any], ...] = (
            ("attacked + Antidote (LoRA)", "adapter", dict(adapter=tb.attacked), tb.aligned),
            ("attacked merged + Antidote", "merged", {}, merged),
            ("attacked merged + Antidote (delta)", "delta", dict(aligned=tb.aligned), merged),
        )
        for stage, mode, kwargs, model in variants:
            out = ctx.path(f"antidote-{mode}-{ratio:g}")
            with ctx.timer() as t:
                rep = antidote(model, calib, ratio, out, runtime=Runtime(force=True, device="cpu"), **kwargs)
            if mode == "adapter":
                res = ctx.evaluate(tb.aligned, adapter=out)
            else:
                res = ctx.evaluate(out)
            numel = sum(x.numel for x in rep.tensors)
            out_rows.append(DemoRow.from_eval(
                stage, f"antidote {mode} r={ratio:g}", res, seconds=t["seconds"],
                note=f"{rep.changed:,} of {numel:,} entries changed in {len(rep.tensors)} tensors",
                ratio=ratio, mode=mode, changed=rep.changed, entries=numel, samples=rep.metrics["samples"],
            ))
    return out_rows
