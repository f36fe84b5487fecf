"""`surgery edit rome` and `surgery edit direction`: weight edits that attack (or restore) behaviour.

- `rome`: a rank-one edit of one MLP down projection that makes a prompt about a subject
  continue with a new target (ROME), with its efficacy and locality.
- `direction`: the refusal direction (difference of means at the post-instruction
  positions), ablated from every residual-writing weight (the attack) or added back at
  its layer (the defense).
"""

from __future__ import annotations

import click
from surgery.cli.options import config_options, device_option, input_option, json_option, output_options
from surgery.cli.report_view import show_report

from surgery.io.atomic import check_no_overlap, check_output
from surgery.methods.config import Runtime
from surgery.methods.direction import DirectionConfig
from surgery.methods.rome import RomeConfig


@click.group("edit")
def edit_group() -> None:
    """Direct weight edits: ROME rank-one edits and refusal-direction ablation/addition."""


@edit_group.command("rome")
@click.argument("model", type=click.Path(path_type=str))
@input_option("corpus", "--cov-data", required=False, help="JSONL corpus (text or prompt/response) for the key "
                                                           "covariance C.")
@config_options(RomeConfig)
@click.option("--cache-dir", type=click.Path(path_type=str), help="Where C is cached (default ~/.cache/surgery/rome).")
@output_options(what="Output model directory")
@device_option
@json_option
def rome_command(model: str, corpus: str | None, config: RomeConfig, cache_dir: str | None, out: str, force: bool,
                 device: str | None, as_json: bool) -> None:
    """Rewrite what MODEL says after PROMPT about SUBJECT to TARGET with one rank-one edit; write OUT.

    W <- W + (v* - W k*)(C^-1 k*)^T / ((C^-1 k*)^T k*) on one MLP down projection;
    only that tensor changes. Reports the target probability before/after (efficacy)
    and the KL on unrelated prompts (locality).
    """
    from surgery.methods.rome import run

    flags = {"MODEL": model, "--cov-data": corpus}
    check_output(out, force, flags)
    if cache_dir is not None:
        check_no_overlap(cache_dir, flags)
    inputs = {k: v for k, v in {"model": model, "corpus": corpus}.items() if v is not None}
    report = run(config, inputs, out, Runtime(device=device, force=force), cache_dir=cache_dir)
    show_report(report, as_json, title=f"ROME edit of {report.metrics['tensor']}")


def _layer(_ctx: click.Context, _param: click.Parameter, value: str) -> int | None:
    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"a layer number or auto, got {value!r}") from None


@edit_group.command("direction")
@click.argument("model", type=click.Path(path_type=str))
@input_option("harmful", required=False, help="Harmful prompts, JSONL with a prompt field.")
@input_option("harmless", required=False, help="Harmless prompts, JSONL with a prompt field.")
@input_option("direction", required=False,
              help="Reuse a saved direction (refusal_direction.safetensors) instead of computing one.")
@config_options(DirectionConfig, exclude=("layer",))
@click.option("--layer", default="auto", show_default=True, callback=_layer,
              help="Layer of the direction, or auto (selection).")
@output_options(what="Output model directory")
@device_option
@json_option
def direction_command(model: str, harmful: str | None, harmless: str | None, direction: str | None,
                      config: DirectionConfig, layer: int | None, out: str, force: bool, device: str | None,
                      as_json: bool) -> None:
    """Find MODEL's refusal direction from --harmful/--harmless prompts and ablate or add it; write OUT.

    OUT holds the edited model, refusal_direction.safetensors (direction, mean_diff,
    layer, pos) and surgery_report.json (the scores of every candidate).
    """
    from surgery.methods.direction import run

    if direction is None and (harmful is None or harmless is None):
        raise click.UsageError("give --harmful and --harmless prompt files (or --direction FILE)")
    check_output(out, force, {"MODEL": model, "--harmful": harmful, "--harmless": harmless, "--direction": direction})
    inputs = {k: v for k, v in {"model": model, "harmful": harmful, "harmless": harmless,
                                "direction": direction}.items() if v is not None}
    report = run(config.replace(layer=layer), inputs, out, Runtime(device=device, force=force))
    show_report(report, as_json, title=f"refusal direction ({config.mode}, layer {report.metrics['layer']}, "
                                       f"pos {report.metrics['pos']})")


COMMANDS = [edit_group]
