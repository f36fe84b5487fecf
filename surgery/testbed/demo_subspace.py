"""Demo rows of the subspace defenses: Safe LoRA, SaLoRA, and safety-critical weights (Wei et al.).

Settings are the papers'/reference code's defaults, not tuned on the testbed:
- Safe LoRA on the attacked adapter: number mode K=10 and threshold mode tau=0.5,
  projector V V^T/||V||_F (V = aligned - base).
- SaLoRA: U fitted on the aligned model with the alignment set's refusal pairs (first 128,
  response tokens), on every module the attack's LoRA targets; then the testbed's attack
  recipe (task data + 10% shipped harmful pairs, same r/alpha/epochs/lr/seed) with C in
  the forward, beside the same fine-tuning without it (control: the harmful pairs differ
  from those inside `attacked/`). Rank 8 of d=64 (the paper removes 32 of 4096 directions;
  at d=64 a proportional rank would round to zero).
- Neurons: SNIP set difference (the paper's `wandg_set_difference`) with the paper's
  example p=0.04, q=0.02, safety = refusal pairs, utility = `utility.jsonl` (first 128 each);
  restored from aligned into the merged attacked model (a repair) and zeroed in the
  aligned model (the brittleness attack).
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.methods.config import Runtime
from surgery.testbed.demo_api import DemoContext, DemoRow

ORDER = 230
COST = 20  # rough seconds on the quick testbed: the demo starts heavy modules first
SHARED = ("harmful_finetune",)  # DemoContext runs this module uses: the demo computes each once, first

SAFELORA_K = 10
SAFELORA_TAU = 0.5
SALORA_RANK = 8
NEURONS_P, NEURONS_Q = 0.04, 0.02
NEURONS_SCORE = "snip"
N_CALIB = 128


def safety_pairs(ctx: DemoContext) -> Path:
    """The alignment set's harmful-prompt + refusal pairs, written once under the work dir."""
    from surgery.testbed.world import REFUSALS

    out = ctx.path("subspace_safety.jsonl")
    if not out.exists():
        rows = [json.loads(line) for line in ctx.testbed.file("alignment.jsonl").read_text().splitlines() if line]
        refusals = [r for r in rows if r.get("response") in REFUSALS]
        out.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in refusals))
    return out


def safelora_rows(ctx: DemoContext) -> list[DemoRow]:
    from surgery.methods.safelora import module_results, projected_modules, safelora

    tb = ctx.testbed
    rows = []
    for label, kwargs in ((f"K={SAFELORA_K}", {"num_layers": SAFELORA_K}),
                          (f"tau={SAFELORA_TAU}", {"threshold": SAFELORA_TAU})):
        out = ctx.path(f"safelora-{label.replace('=', '')}")
        with ctx.timer() as t:
            report = safelora(tb.attacked, tb.base, tb.aligned, out, runtime=Runtime(force=True), **kwargs)
        modules, projected = module_results(report), projected_modules(report)
        res = ctx.evaluate(tb.aligned, adapter=out)
        rows.append(DemoRow.from_eval(
            "attacked + SafeLoRA", f"safelora {label}", res, seconds=t["seconds"],
            note=f"projected {len(projected)}/{len(modules)} modules",
            cosines={m.module: round(m.cosine, 5) for m in modules},
            norm_ratios={m.module: round(m.norm_ratio, 4) for m in modules}, projected=projected))
    return rows


def salora_rows(ctx: DemoContext) -> list[DemoRow]:
    from surgery.calib.data import load_pairs
    from surgery.methods.finetune import finetune
    from surgery.methods.salora import fit_salora, salora_prepare

    tb = ctx.testbed
    recipe = ctx.attack_recipe()
    module = ctx.path("salora-module.safetensors")
    with ctx.timer() as t_fit:
        fit = fit_salora(tb.aligned, safety_pairs(ctx), module, rank=SALORA_RANK, targets=recipe["targets"],
                         num_samples=N_CALIB, runtime=Runtime(force=True))
    out = ctx.path("salora-ft-salora")
    with ctx.timer() as t:
        finetune(tb.aligned, load_pairs(tb.file("task_train.jsonl")), out,
                 harmful_pairs=load_pairs(tb.file("harmful_train.jsonl")), prepare_model=salora_prepare(module),
                 **recipe)
    control, _, control_seconds = ctx.harmful_finetune()  # the same run as the `attack finetune` row
    note = "attack recipe, shipped harmful pairs"
    rows = [DemoRow.from_eval("fine-tune on attack data", "LoRA (control)", ctx.evaluate(tb.aligned, adapter=control),
                              seconds=control_seconds, note=note + " (the `attack finetune` run)")]
    rows.append(DemoRow.from_eval(
        "fine-tune on attack data", "SaLoRA", ctx.evaluate(tb.aligned, adapter=out),
        seconds=t["seconds"] + t_fit["seconds"],
        note=note + f"; C = I - UU^T, rank {SALORA_RANK}, {len(fit.metrics['modules'])} modules",
        energy={m["module"]: round(m["energy"], 4) for m in fit.metrics["modules"]}))
    return rows


def neurons_rows(ctx: DemoContext) -> list[DemoRow]:
    from surgery.io.merge import merge_adapter
    from surgery.methods.neurons import apply_neurons, find_neurons

    tb = ctx.testbed
    mask = ctx.path("neurons-mask.safetensors")
    with ctx.timer() as t_find:
        rep = find_neurons(tb.aligned, safety_pairs(ctx), tb.file("utility.jsonl"), mask, p=NEURONS_P, q=NEURONS_Q,
                           score=NEURONS_SCORE, num_samples=N_CALIB, runtime=Runtime(force=True))
    merged = ctx.path("neurons-attacked-merged")
    merge_adapter(tb.aligned, tb.attacked, merged, force=True)
    settings = f"{NEURONS_SCORE}, p={NEURONS_P}, q={NEURONS_Q}, {100 * rep.metrics['sparsity']:.2f}% of weights"
    rows = []
    for stage, mode, model, kw in (("attacked (merged) + restore", "restore", merged, {"aligned": tb.aligned}),
                                   ("aligned + zero (attack)", "zero", tb.aligned, {})):
        out = ctx.path(f"neurons-{mode}")
        with ctx.timer() as t:
            applied = apply_neurons(model, mask, out, mode=mode, runtime=Runtime(force=True), **kw)  # type: ignore[arg-type]
        res = ctx.evaluate(out)
        rows.append(DemoRow.from_eval(stage, f"neurons {mode}", res, seconds=t["seconds"] + t_find["seconds"],
                                      note=settings, changed=applied.changed, selected=applied.selected,
                                      sparsity=rep.metrics["sparsity"]))
    return rows


def rows(ctx: DemoContext) -> list[DemoRow]:
    """SafeLoRA (2 rows), SaLoRA vs plain LoRA on the attack data (2 rows), neurons restore/zero (2 rows)."""
    return safelora_rows(ctx) + salora_rows(ctx) + neurons_rows(ctx)
