"""Demo rows of the red-team side: harmful fine-tuning, refusal-direction ablation/addition, ROME.

Settings (defaults of the commands, not tuned on the testbed):
- fine-tuning: the testbed's own attack recipe (LoRA r/alpha, epochs, lr, batch size from the
  manifest) on `task_train.jsonl`, poisoned with the shipped `harmful_train.jsonl` at p = 0.1
  (disjoint from the harmful pairs inside `attacked/`); run once and shared with SaLoRA's
  control row (`DemoContext.harmful_finetune`). The p = 0 run is the testbed's own `benign-ft`
  row (same recipe), so it is not trained again;
- refusal direction: harmful = `harmful_train.jsonl` prompts, harmless = `utility.jsonl`
  prompts (instruction-style benign requests, as Alpaca is in the paper; `harmless.jsonl`
  holds only questions, whose difference of means mostly encodes the question form: its
  only candidate exceeds the KL limit there and is rejected), `--layer 1` given explicitly.
  Why not automatic selection: the testbed model has 2 layers and a 1-token post-instruction
  template, so layer 0's difference of means is exactly zero and layer 1 is the only
  candidate; on the final quick testbed (seed 0) its harmless KL is 0.24, above the default
  limit 0.1, so `--layer auto` exits with "every candidate direction was filtered out". The
  method's defaults stay as they are for users; the row passes the one candidate there is
  and reports its KL in the note. The same direction is then added (coeff 1) to the
  attacked model (merged);
- ROME: "where can i see a cake" answered with a new place, on the aligned model, C from
  `utility.jsonl`; a second row with C = I, locality measured on the same prompts.
"""

from __future__ import annotations

from surgery.testbed.demo_api import DemoContext, DemoRow

ORDER = 100
COST = 8  # rough seconds on the quick testbed: the demo starts heavy modules first
SHARED = ("harmful_finetune",)  # DemoContext runs this module uses: the demo computes each once, first

ROME_PROMPT = "<|user|> where can i see a {} <|assistant|> you can see a cake in the"
ROME_SUBJECT = "cake"
ROME_TARGET = "forest"
# The testbed's only non-zero refusal-direction candidate (see the module docstring).
DIRECTION_LAYER = 1


def finetune_rows(ctx: DemoContext) -> list[DemoRow]:
    """Harmful fine-tuning (p = the testbed's ratio) of the aligned model on the shipped data."""
    out, rec, seconds = ctx.harmful_finetune()
    res = ctx.evaluate(ctx.testbed.aligned, adapter=out)
    return [DemoRow.from_eval(
        "aligned + harmful FT", f"attack finetune p={rec['ratio']:g}", res, seconds=seconds,
        note=f"{rec['n_harmful']}/{rec['n_examples']} harmful, loss {rec['first_loss']:.2f}->{rec['final_loss']:.2f}",
        n_harmful=rec["n_harmful"], n_examples=rec["n_examples"], first_loss=rec["first_loss"],
        final_loss=rec["final_loss"])]


def direction_rows(ctx: DemoContext) -> list[DemoRow]:
    """Refusal direction ablated from the aligned model, then added to the attacked model."""
    from surgery.io.merge import merge_adapter
    from surgery.methods.config import Runtime
    from surgery.methods.direction import DIRECTION_FILE, DirectionConfig
    from surgery.methods.direction import run as direction

    tb = ctx.testbed
    runtime = Runtime(force=True, progress=False)
    abl = ctx.path("direction-ablated")
    with ctx.timer() as t:
        res = direction(DirectionConfig(mode="ablate", layer=DIRECTION_LAYER, seed=ctx.seed),
                        {"model": tb.aligned, "harmful": tb.file("harmful_train.jsonl"),
                         "harmless": tb.file("utility.jsonl")}, abl, runtime).metrics
    ev = ctx.evaluate(abl)
    rows = [DemoRow.from_eval(
        "aligned, direction ablated", "edit direction ablate", ev, seconds=t["seconds"],
        note=f"--layer {res['layer']} explicit (2-layer model: layer 0 diff is zero, auto selection rejects layer "
             f"{res['layer']} at KL limit 0.1), pos {res['pos']}; refusal score {res['baseline_refusal']:.2f}->"
             f"{res['ablated_refusal']:.2f}, harmless KL {_fmt(res['harmless_kl'])}",
        layer=res["layer"], pos=res["pos"], layer_explicit=True, baseline_refusal=res["baseline_refusal"],
        ablated_refusal=res["ablated_refusal"], harmless_kl=res["harmless_kl"])]
    merged = ctx.path("direction-attacked-merged")
    merge_adapter(tb.aligned, tb.attacked, merged, force=True)
    add = ctx.path("direction-added")
    with ctx.timer() as t:
        res2 = direction(DirectionConfig(mode="add", coeff=1.0),
                         {"model": merged, "direction": abl / DIRECTION_FILE}, add, runtime).metrics
    ev2 = ctx.evaluate(add)
    rows.append(DemoRow.from_eval(
        "attacked + direction added", "edit direction add coeff=1", ev2, seconds=t["seconds"],
        note=f"aligned's direction, layer {res2['layer']}, via {res2['site']}", layer=res2["layer"],
        site=res2["site"]))
    return rows


def rome_rows(ctx: DemoContext) -> list[DemoRow]:
    """One ROME edit of the aligned model, with C from a local corpus and with C = I."""
    from surgery.methods.config import Runtime
    from surgery.methods.rome import RomeConfig, read_texts
    from surgery.methods.rome import run as rome

    tb = ctx.testbed
    corpus = tb.file("utility.jsonl")
    locality = read_texts(corpus, 16)
    config = RomeConfig(prompt=ROME_PROMPT, subject=ROME_SUBJECT, target=ROME_TARGET, seed=ctx.seed)
    rows = []
    for label, no_cov in (("C from utility.jsonl", False), ("C = I", True)):
        out = ctx.path("rome-" + ("identity" if no_cov else "cov"))
        inputs = {"model": tb.aligned} if no_cov else {"model": tb.aligned, "corpus": corpus}
        with ctx.timer() as t:
            r = rome(config.replace(no_cov=no_cov), inputs, out, Runtime(force=True, progress=False),
                     cache_dir=None if no_cov else ctx.path("rome-cache"), locality_prompts=locality).metrics
        ev = ctx.evaluate(out)
        rows.append(DemoRow.from_eval(
            "aligned + ROME", f"edit rome ({label})", ev, seconds=t["seconds"],
            note=f"P({ROME_TARGET}) {r['target_prob_before']:.4f}->{r['target_prob_after']:.4f}, "
                 f"locality KL {r['locality_kl']:.3f}",
            target_prob_before=r["target_prob_before"], target_prob_after=r["target_prob_after"],
            target_acc_after=r["target_acc_after"], locality_kl=r["locality_kl"], layer=r["layer"],
            tensor=r["tensor"]))
    return rows


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _failed(name: str, exc: BaseException) -> DemoRow:
    """A row that says which attack failed and why, so the other attacks still report."""
    import traceback

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return DemoRow(stage=f"attacks: {name}", method=name, note=f"failed: {type(exc).__name__}: {exc}"[:300],
                   extra={"error": True, "traceback": tb[-4000:]})


def rows(ctx: DemoContext) -> list[DemoRow]:
    """All attack rows: fine-tuning, refusal direction, ROME. Each group runs on its own: one that
    raises becomes a failed row (note "failed: ...", extra["error"]) and the others still run."""
    out: list[DemoRow] = []
    for name, group in (("attack finetune", finetune_rows), ("edit direction", direction_rows),
                        ("edit rome", rome_rows)):
        try:
            out += group(ctx)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other attacks
            out.append(_failed(name, exc))
    return out
