"""`surgery landscape A B --harmful H.jsonl`: HS and FA along the straight path from A to B."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from surgery.analysis.landscape import alpha_grid, landscape
from surgery.io.atomic import check_output


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@click.command("landscape")
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option("--harmful", required=True, type=click.Path(path_type=str),
              help="Harmful eval prompts (JSONL {\"prompt\"}): the harmful score HS.")
@click.option("--task", type=click.Path(path_type=str), default=None,
              help="Task eval (JSONL {\"prompt\", \"answer\"}): the task accuracy FA.")
@click.option("--benign", type=click.Path(path_type=str), default=None,
              help="Benign prompts (JSONL {\"prompt\"}): over-refusal.")
@click.option("--steps", type=click.IntRange(2), default=5, show_default=True, help="Points on the path.")
@click.option("--from", "start", type=float, default=0.0, show_default=True, help="First α (negative: beyond A).")
@click.option("--to", "stop", type=float, default=1.0, show_default=True, help="Last α (above 1: beyond B).")
@click.option("--plot", type=click.Path(path_type=str), default=None, help="Write the curve as a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the points as JSON on stdout.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N prompts of each set.")
@click.option("--device", default=None, help="torch device (default: cuda if present, else cpu).")
@click.option("--title", default=None, help="Title of the --plot figure.")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
def landscape_command(a: str, b: str, harmful: str, task: str | None, benign: str | None, steps: int,
                      start: float, stop: float, plot: str | None, as_json: bool, max_new_tokens: int,
                      batch_size: int, limit: int | None, device: str | None, title: str | None,
                      force: bool) -> None:
    """Score the models (1 − α)·A + α·B for α from --from to --to (Peng et al.'s safety landscape).

    B is a checkpoint with A's tensors, or a LoRA adapter over A (α then scales the
    adapter's update). A is loaded once; each α rewrites only the tensors that differ.
    """
    inputs = {"A": a, "B": b, "--harmful": harmful, "--task": task, "--benign": benign}
    if plot is not None:
        check_output(plot, force, inputs)
    alphas = alpha_grid(steps, start, stop)
    report = landscape(a, b, harmful=harmful, task=task, benign=benign, alphas=alphas,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, device=device)
    if plot is not None:
        from surgery.analysis.plots import landscape_plot

        landscape_plot(report, plot, force=force, title=title, inputs=inputs)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"safety landscape: {a} → {b} ({report.moving_tensors} tensors move)",
                  title_justify="left")
    for col in ("α", "HS", "FA", "over-refusal", "s"):
        table.add_column(col, justify="right")
    for p in report.points:
        table.add_row(f"{p.alpha:.3g}", _pct(p.harmful_score), _pct(p.task_accuracy), _pct(p.over_refusal),
                      f"{p.seconds:.1f}")
    console = Console()
    console.print(table)
    if plot is not None:
        console.print(f"curve written to [bold]{plot}[/bold]")


COMMANDS = [landscape_command]
