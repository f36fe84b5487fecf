"""`surgery salora fit|apply`: SaLoRA's fixed safety module C = I - U U^T."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from surgery.methods.salora import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_NITER,
    DEFAULT_SAMPLES,
    DEFAULT_TARGETS,
    DEFAULT_TASK_RANK,
    SOLVERS,
    apply_salora,
    fit_salora,
)


@click.group("salora")
def salora_group() -> None:
    """Safety-preserving LoRA: fit the fixed module on an aligned model, fold it into adapters."""


@salora_group.command("fit")
@click.argument("aligned", type=click.Path(path_type=str))
@click.option("--safety", required=True, type=click.Path(path_type=str),
              help="JSONL {prompt, response}: harmful prompts with refusals.")
@click.option("--rank", required=True, type=int, help="Safety directions removed per module (the paper: 32).")
@click.option("--targets", default=",".join(DEFAULT_TARGETS), show_default=True,
              help="Comma-separated module names to fit (use the same as the LoRA's targets).")
@click.option("--samples", "n_samples", type=int, default=DEFAULT_SAMPLES, show_default=True,
              help="First N pairs of the file.")
@click.option("--max-length", type=int, default=DEFAULT_MAX_LENGTH, show_default=True)
@click.option("--solver", type=click.Choice(SOLVERS), default="auto", show_default=True,
              help="eigh: exact eigenvectors of Y^T Y; randomized: seeded subspace iteration; "
                   "auto: eigh up to d_out=4096.")
@click.option("--niter", type=int, default=DEFAULT_NITER, show_default=True, help="Randomized solver iterations.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--task", default=None, type=click.Path(path_type=str),
              help="JSONL task data: also store its output directions for the task-specific initialisation.")
@click.option("--task-rank", type=int, default=DEFAULT_TASK_RANK, show_default=True,
              help="Task output directions kept per module (the paper's ds).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Module .safetensors file.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def fit_command(aligned: str, safety: str, rank: int, targets: str, n_samples: int, max_length: int, solver: str,
                niter: int, seed: int, task: str | None, task_rank: int, out: str, force: bool,
                as_json: bool) -> None:
    """Fit U (top-R output directions on safety data, response tokens) per target module of ALIGNED."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    report = fit_salora(aligned, safety, out, rank=rank, targets=names, n_samples=n_samples,
                        max_length=max_length, solver=solver, niter=niter, seed=seed, task=task,
                        task_rank=task_rank, force=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return
    table = Table(title=f"SaLoRA module (rank {rank}, {solver})")
    for col in ("module", "d_out", "tokens", "energy in U"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in report.modules:
        table.add_row(m.module, str(m.d_out), str(m.tokens), f"{100 * m.energy:.1f}%")
    Console().print(table)
    Console().print(f"written to [bold]{report.out}[/bold] in {report.seconds:.1f} s")


@salora_group.command("apply")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--module", "module", required=True, type=click.Path(path_type=str),
              help="Module file from `surgery salora fit`.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output adapter directory.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def apply_command(adapter: str, module: str, out: str, force: bool, as_json: bool) -> None:
    """Fold C = I - U U^T into the ADAPTER's lora_B (B' = C B) and write a peft adapter."""
    report = apply_salora(adapter, module, out, force=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return
    msg = f"folded C into {len(report.folded)} modules -> [bold]{report.out}[/bold]"
    if report.unprotected:
        msg += f" ({len(report.unprotected)} LoRA modules have no fitted U and were copied unchanged)"
    Console().print(msg)


COMMANDS = [salora_group]
