"""`surgery edit rome` and `surgery edit direction`: weight edits that attack (or restore) behaviour.

- `rome`: a rank-one edit of one MLP down projection that makes a prompt about a subject
  continue with a new target (ROME), with its efficacy and locality.
- `direction`: the refusal direction (difference of means at the post-instruction
  positions), ablated from every residual-writing weight (the attack) or added back at
  its layer (the defense).
"""

from __future__ import annotations

import json
import math

import click
from rich.console import Console
from rich.table import Table

from surgery.errors import SurgeryError


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


@click.group("edit")
def edit_group() -> None:
    """Direct weight edits: ROME rank-one edits and refusal-direction ablation/addition."""


@edit_group.command("rome")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--prompt", required=True, help='Prompt about the subject; "{}" marks the subject (else it is found).')
@click.option("--subject", required=True, help="The subject whose last token carries the key.")
@click.option("--target", required=True, help="The new continuation to teach.")
@click.option("--layer", type=int, help="Layer whose MLP down projection is edited (default about 0.17 L).")
@click.option("--cov-data", type=click.Path(path_type=str), help="JSONL corpus (text or prompt/response) for the key covariance C.")
@click.option("--no-cov", is_flag=True, help="Use C = I (EasyEdit's mom2_adjustment=false); the default without --cov-data.")
@click.option("--cov-samples", type=int, default=1000, show_default=True, help="Corpus lines used for C.")
@click.option("--cache-dir", type=click.Path(path_type=str), help="Where C is cached (default ~/.cache/surgery/rome).")
@click.option("--steps", type=int, default=25, show_default=True, help="Adam steps on the value vector.")
@click.option("--lr", type=float, default=0.5, show_default=True)
@click.option("--kl-factor", type=float, default=0.0625, show_default=True)
@click.option("--weight-decay", type=float, default=1e-3, show_default=True)
@click.option("--clamp-norm-factor", type=float, default=4.0, show_default=True)
@click.option("--prefixes", default="5x10,10x10", show_default=True,
              help="Context prefixes sampled from the model: LENGTHxCOUNT,... ('none' for the bare prompt only).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output model directory.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def rome_command(model: str, prompt: str, subject: str, target: str, layer: int | None, cov_data: str | None,
                 no_cov: bool, cov_samples: int, cache_dir: str | None, steps: int, lr: float, kl_factor: float,
                 weight_decay: float, clamp_norm_factor: float, prefixes: str, seed: int, out: str, force: bool,
                 as_json: bool) -> None:
    """Rewrite what MODEL says after PROMPT about SUBJECT to TARGET with one rank-one edit; write OUT.

    W <- W + (v* - W k*)(C^-1 k*)^T / ((C^-1 k*)^T k*) on one MLP down projection;
    only that tensor changes. Reports the target probability before/after (efficacy)
    and the KL on unrelated prompts (locality).
    """
    from surgery.methods.rome import rome_edit

    result = rome_edit(model, out, prompt=prompt, subject=subject, target=target, layer=layer, cov_data=cov_data,
                       no_cov=no_cov, steps=steps, lr=lr, kl_factor=kl_factor, weight_decay=weight_decay,
                       clamp_norm_factor=clamp_norm_factor, prefixes=_parse_prefixes(prefixes), seed=seed,
                       cov_samples=cov_samples, cache_dir=cache_dir, force=force)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    table = Table(title=f"ROME edit of {result.tensor}")
    table.add_column("measure")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("P(target | prompt)", _fmt(result.target_prob_before), _fmt(result.target_prob_after))
    table.add_row("target token accuracy", _fmt(result.target_acc_before), _fmt(result.target_acc_after))
    table.add_row(f"locality KL ({result.n_locality} prompts)", "0", _fmt(result.locality_kl))
    Console().print(table)
    Console().print(f"written to [bold]{result.out}[/bold]; C: {result.covariance}" + (f" ({result.cov_tokens} tokens)" if result.cov_tokens else "")
                    + f"; |delta| {result.delta_norm:.3g} (|v0| {result.v0_norm:.3g}); {result.steps} steps; "
                    f"{result.seconds:.1f} s")


def _parse_prefixes(text: str) -> tuple[tuple[int, int], ...]:
    if text.strip().lower() in ("", "none", "0"):
        return ()
    spec = []
    for part in text.split(","):
        try:
            length, count = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise SurgeryError(f"--prefixes takes LENGTHxCOUNT items like 5x10,10x10, got {part!r}") from None
        if length < 0 or count < 0:
            raise SurgeryError("--prefixes lengths and counts must be non-negative")
        spec.append((length, count))
    return tuple(spec)


@edit_group.command("direction")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--harmful", type=click.Path(path_type=str), help="Harmful prompts, JSONL with a prompt field.")
@click.option("--harmless", type=click.Path(path_type=str), help="Harmless prompts, JSONL with a prompt field.")
@click.option("--direction", "direction_file", type=click.Path(path_type=str),
              help="Reuse a saved direction (refusal_direction.safetensors) instead of computing one.")
@click.option("--layer", default="auto", show_default=True, help="Layer of the direction, or auto (selection).")
@click.option("--pos", type=int, help="Post-instruction position (negative, e.g. -1); default: searched (auto) or -1.")
@click.option("--mode", type=click.Choice(["ablate", "add"]), required=True,
              help="ablate: orthogonalise every residual-writing weight; add: put the direction back (defense).")
@click.option("--coeff", type=float, default=1.0, show_default=True, help="add: multiple of the mean difference added.")
@click.option("--kl-limit", type=float, default=0.1, show_default=True,
              help="auto: discard candidates whose first-token KL on harmless prompts exceeds this.")
@click.option("--steering-filter/--no-steering-filter", default=False, show_default=True,
              help="auto: also discard candidates whose steering score (refusal when added on harmless "
                   "prompts) is below 0, the paper's third filter.")
@click.option("--refusal-token", "refusal_tokens", multiple=True,
              help="Words that start a refusal (repeatable; default I, Sorry, ...): the refusal score's tokens.")
@click.option("--add-site", type=click.Choice(["auto", "bias", "mlp_bias", "embedding"]), default="auto",
              show_default=True, help="add: where the vector goes (see the docs).")
@click.option("--limit", type=int, help="Use at most this many prompts of each file.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output model directory.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def direction_command(model: str, harmful: str | None, harmless: str | None, direction_file: str | None, layer: str,
                      pos: int | None, mode: str, coeff: float, kl_limit: float, steering_filter: bool,
                      refusal_tokens: tuple[str, ...],
                      add_site: str, limit: int | None, seed: int, batch_size: int, out: str, force: bool,
                      as_json: bool) -> None:
    """Find MODEL's refusal direction from --harmful/--harmless prompts and ablate or add it; write OUT.

    OUT holds the edited model, refusal_direction.safetensors (direction, mean_diff,
    layer, pos) and surgery_edit.json (the scores of every candidate).
    """
    from pathlib import Path

    from surgery.calib.data import load_prompts
    from surgery.methods.direction import refusal_direction_edit

    if layer.strip().lower() == "auto":
        layer_n = None
    else:
        try:
            layer_n = int(layer)
        except ValueError:
            raise SurgeryError(f"--layer takes a layer number or auto, got {layer!r}") from None
    if direction_file is None and (harmful is None or harmless is None):
        raise SurgeryError("give --harmful and --harmless prompt files (or --direction FILE)")
    from surgery.io.atomic import check_output

    check_output(out, force, {"MODEL": model, "--harmful": harmful, "--harmless": harmless,
                              "--direction": direction_file})
    h = load_prompts(harmful, limit) if harmful and direction_file is None else None
    b = load_prompts(harmless, limit) if harmless and direction_file is None else None
    inputs = {k: Path(v) for k, v in (("harmful", harmful), ("harmless", harmless), ("direction", direction_file))
              if v}
    result = refusal_direction_edit(model, out, mode=mode, harmful=h, harmless=b, direction_file=direction_file,
                                    layer=layer_n, pos=pos, coeff=coeff, kl_limit=kl_limit,
                                    refusal_phrases=list(refusal_tokens) or None, add_site=add_site,
                                    steering_filter=steering_filter, seed=seed,
                                    batch_size=batch_size, force=force, inputs=inputs)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    console = Console()
    if result.candidates:
        table = Table(title="refusal-direction candidates")
        for col in ("pos", "layer", "refusal score (ablated)", "harmless KL", "steering score", "note"):
            table.add_column(col, justify="right" if col != "note" else "left")
        for c in result.candidates:
            chosen = c["pos"] == result.pos and c["layer"] == result.layer
            table.add_row(str(c["pos"]), str(c["layer"]), _fmt(c.get("refusal_score")), _fmt(c.get("kl")),
                          _fmt(c.get("steering_score")), "chosen" if chosen else c.get("discarded", ""))
        console.print(table)
    what = (f"ablated from {len(result.edited)} tensors" if mode == "ablate"
            else f"added x{result.coeff} via {result.site}")
    base = f"; refusal score {_fmt(result.baseline_refusal)} -> {_fmt(result.ablated_refusal)} when ablated" \
        if result.baseline_refusal is not None else ""
    console.print(f"direction (layer {result.layer}, pos {result.pos}) {what} -> {result.out}{base}; "
                  f"{result.seconds:.1f} s")


COMMANDS = [edit_group]
