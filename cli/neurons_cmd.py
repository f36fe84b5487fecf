"""`surgery neurons find|apply`: safety-critical weights (Wei et al., ICML 2024)."""

from __future__ import annotations

import click
from surgery.cli.options import allow_pickle_option, config_options, input_option, json_option, output_options
from surgery.cli.report_view import show_report

from surgery.methods.config import Runtime
from surgery.methods.neurons import NeuronsApplyConfig, NeuronsFindConfig, run_apply, run_find


@click.group("neurons")
def neurons_group() -> None:
    """Find, zero, restore (and freeze) the weights that matter for safety but not for utility."""


@neurons_group.command("find")
@click.argument("model", type=click.Path(path_type=str))
@input_option("safety", help="JSONL {prompt, response}: harmful prompts with refusals.")
@input_option("utility", help="JSONL {prompt, response}: ordinary instructions with answers.")
@config_options(NeuronsFindConfig)
@output_options(what="Mask .safetensors file")
@json_option
def find_command(model: str, safety: str, utility: str, config: NeuronsFindConfig, out: str, force: bool,
                 as_json: bool) -> None:
    """Mask of MODEL's safety-critical weights: per tensor, top-q safety minus top-p utility importance."""
    report = run_find(config, {"model": model, "safety": safety, "utility": utility}, out, Runtime(force=force))
    show_report(report, as_json, title=f"safety-critical weights ({config.score}, p={config.p:g}, q={config.q:g}, "
                                       f"{100 * report.metrics['sparsity']:.3f}% selected)")


@neurons_group.command("apply")
@click.argument("model", type=click.Path(path_type=str))
@input_option("mask", help="Mask from `surgery neurons find`.")
@input_option("aligned", required=False, help="Checkpoint to restore the masked weights from (mode restore).")
@config_options(NeuronsApplyConfig)
@output_options(what="Output model directory")
@allow_pickle_option
@json_option
def apply_command(model: str, mask: str, aligned: str | None, config: NeuronsApplyConfig, out: str, force: bool,
                  allow_pickle: bool, as_json: bool) -> None:
    """Stream MODEL into OUT with the masked weights zeroed or restored from ALIGNED."""
    inputs = {"model": model, "mask": mask, **({"aligned": aligned} if aligned is not None else {})}
    report = run_apply(config, inputs, out, Runtime(force=force, allow_pickle=allow_pickle))
    show_report(report, as_json, title=f"neurons {config.mode}: {report.metrics['masked_tensors']} masked tensors")


COMMANDS = [neurons_group]
