"""`surgery neurons find|apply`: safety-critical weights (Wei et al., ICML 2024)."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from surgery.methods.neurons import DEFAULT_MAX_LENGTH, DEFAULT_SAMPLES, SCORES, apply_neurons, find_neurons


def _targets(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


@click.group("neurons")
def neurons_group() -> None:
    """Find, zero, restore (and freeze) the weights that matter for safety but not for utility."""


@neurons_group.command("find")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--safety", required=True, type=click.Path(path_type=str),
              help="JSONL {prompt, response}: harmful prompts with refusals.")
@click.option("--utility", required=True, type=click.Path(path_type=str),
              help="JSONL {prompt, response}: ordinary instructions with answers.")
@click.option("--p", "p", required=True, type=float, help="Top fraction of utility importance removed (per tensor).")
@click.option("--q", "q", required=True, type=float, help="Top fraction of safety importance kept (per tensor).")
@click.option("--score", type=click.Choice(SCORES), default="wanda", show_default=True,
              help="wanda: |W|·||X|| on response tokens; snip: |W ⊙ Σ|∇W L||.")
@click.option("--targets", default=None, help="Comma-separated module names (default: every Linear but the head).")
@click.option("--samples", "n_samples", type=int, default=DEFAULT_SAMPLES, show_default=True,
              help="First N pairs of each file.")
@click.option("--max-length", type=int, default=DEFAULT_MAX_LENGTH, show_default=True)
@click.option("--layers-per-pass", type=int, default=0, show_default=True,
              help="SNIP: gradients for this many decoder layers per pass (0: all at once; 1: the reference's "
                   "layer-by-layer loop, least memory).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Mask .safetensors file.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the sparsity report as JSON on stdout.")
def find_command(model: str, safety: str, utility: str, p: float, q: float, score: str, targets: str | None,
                 n_samples: int, max_length: int, layers_per_pass: int, out: str, force: bool,
                 as_json: bool) -> None:
    """Mask of MODEL's safety-critical weights: per tensor, top-q safety minus top-p utility importance."""
    report = find_neurons(model, safety, utility, out, p=p, q=q, score=score, targets=_targets(targets),
                          n_samples=n_samples, max_length=max_length, layers_per_pass=layers_per_pass or None,
                          force=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return
    table = Table(title=f"safety-critical weights ({score}, p={p}, q={q})")
    for col in ("tensor", "selected", "of", "sparsity"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for t in report.tensors:
        table.add_row(t.name, str(t.selected), str(t.numel), f"{100 * t.sparsity:.3f}%")
    table.add_row("[bold]all[/bold]", str(report.selected), str(report.numel), f"{100 * report.sparsity:.3f}%")
    Console().print(table)
    Console().print(f"mask written to [bold]{report.out}[/bold] in {report.seconds:.1f} s")


@neurons_group.command("apply")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--mask", required=True, type=click.Path(path_type=str), help="Mask from `surgery neurons find`.")
@click.option("--mode", required=True, type=click.Choice(["zero", "restore"]),
              help="zero: remove the weights (an attack); restore: copy them from --aligned (a repair).")
@click.option("--aligned", default=None, type=click.Path(path_type=str), help="Checkpoint to restore from.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output model directory.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def apply_command(model: str, mask: str, mode: str, aligned: str | None, out: str, force: bool,
                  as_json: bool) -> None:
    """Stream MODEL into OUT with the masked weights zeroed or restored from ALIGNED."""
    report = apply_neurons(model, mask, out, mode=mode, aligned=aligned, force=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return
    Console().print(f"{mode}: {report.selected} masked weights in {report.masked_tensors} tensors "
                    f"({report.changed} changed) -> [bold]{report.out}[/bold] in {report.seconds:.1f} s")


COMMANDS = [neurons_group]
