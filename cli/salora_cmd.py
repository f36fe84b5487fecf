"""`surgery salora fit|apply`: SaLoRA's fixed safety module C = I - U U^T."""

from __future__ import annotations

import click
from surgery.cli.options import allow_pickle_option, config_options, input_option, json_option, output_options
from surgery.cli.report_view import show_report

from surgery.methods.config import Runtime
from surgery.methods.salora import SaloraApplyConfig, SaloraFitConfig, run_apply, run_fit


@click.group("salora")
def salora_group() -> None:
    """Safety-preserving LoRA: fit the fixed module on an aligned model, fold it into adapters."""


@salora_group.command("fit")
@click.argument("aligned", type=click.Path(path_type=str))
@input_option("safety", help="JSONL {prompt, response}: harmful prompts with refusals.")
@input_option("task", required=False,
              help="JSONL task data: also store its output directions for the task-specific initialisation.")
@config_options(SaloraFitConfig)
@output_options(what="Module .safetensors file")
@json_option
def fit_command(aligned: str, safety: str, task: str | None, config: SaloraFitConfig, out: str, force: bool,
                as_json: bool) -> None:
    """Fit U (top-R output directions on safety data, response tokens) per target module of ALIGNED."""
    inputs = {"model": aligned, "safety": safety, **({"task": task} if task is not None else {})}
    report = run_fit(config, inputs, out, Runtime(force=force))
    energy = ", ".join(f"{m['module']} {100 * m['energy']:.1f}%" for m in report.metrics["modules"][:4])
    show_report(report, as_json, title=f"SaLoRA module (rank {config.rank}, {config.solver}; energy in U: {energy})")


@salora_group.command("apply")
@click.argument("adapter", type=click.Path(path_type=str))
@input_option("module", help="Module file from `surgery salora fit`.")
@config_options(SaloraApplyConfig)
@output_options(what="Output adapter directory")
@allow_pickle_option
@json_option
def apply_command(adapter: str, module: str, config: SaloraApplyConfig, out: str, force: bool, allow_pickle: bool,
                  as_json: bool) -> None:
    """Fold C = I - U U^T into the ADAPTER's lora_B (B' = C B) and write a peft adapter."""
    report = run_apply(config, {"adapter": adapter, "module": module}, out,
                       Runtime(force=force, allow_pickle=allow_pickle))
    unprotected = report.metrics["unprotected"]
    show_report(report, as_json, title=f"folded C into {len(report.metrics['folded'])} modules"
                + (f" ({len(unprotected)} LoRA modules have no fitted U, copied unchanged)" if unprotected else ""))


COMMANDS = [salora_group]
