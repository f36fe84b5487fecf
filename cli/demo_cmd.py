"""`surgery demo`: the whole story on the synthetic testbed, alignment to attack to every repair."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table


@click.command("demo")
@click.option("-o", "--output", "out", default="surgery-demo", show_default=True, type=click.Path(path_type=str),
              help="Directory for the testbed, the methods' outputs, results.json and the chart.")
@click.option("--quick", is_flag=True, help="The quick testbed and the cheapest settings (about a minute).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--only", multiple=True, help="Run only these row modules (demo_<name>.py names, repeatable).")
@click.option("--testbed", "testbed_dir", type=click.Path(path_type=str),
              help="Use this prebuilt testbed (surgery testbed build) instead of building one under OUT.")
@click.option("--jobs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes for the row modules (1: all in this process).")
@click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout instead of the table.")
def demo_command(out: str, quick: bool, seed: int, only: tuple[str, ...], testbed_dir: str | None,
                 jobs: int, as_json: bool) -> None:
    """Build or reuse the testbed, run every attack and defense the toolkit has, score each.

    Prints stage/method, harmful score HS (testbed judge: compliance only), the keyword
    judge's HS, the share of "other" (incoherent, empty, off-format) answers to harmful
    prompts, task accuracy FA, over-refusal (percent, all on the eval sets' test halves)
    and the method's seconds; writes OUT/results.json and OUT/hs_vs_fa.png.
    """
    from transformers.utils import logging as hf_logging

    from surgery.testbed.demo import format_value, run_demo

    hf_logging.disable_progress_bar()  # our own progress and tables only
    hf_logging.set_verbosity_error()

    err = Console(stderr=True)

    def on_row(name: str, rows: list) -> None:
        if not as_json:
            err.print(f"[dim]done {name}: {len(rows)} row(s)[/dim]")

    report = run_demo(out, quick=quick, seed=seed, only=list(only) or None, progress=not as_json, on_row=on_row,
                      testbed=testbed_dir, jobs=jobs)
    if as_json:
        sys.stdout.write(report.results_path.read_text())
        return
    table = Table(title=f"surgery demo ({'quick' if quick else 'default'}, seed {seed})")
    for col, justify in (("stage", "left"), ("method", "left"), ("HS %", "right"), ("HS kw %", "right"),
                         ("other %", "right"), ("FA %", "right"), ("over-refusal %", "right"), ("seconds", "right"),
                         ("note", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in report.rows:
        table.add_row(r.stage, r.method, format_value(r.harmful_score), format_value(r.keyword_harmful_score),
                      format_value(r.other_share), format_value(r.task_accuracy), format_value(r.over_refusal),
                      "-" if r.seconds is None else f"{r.seconds:.1f}", r.note)
    Console().print(table)
    click.echo(f"results: {report.results_path}", err=True)
    if report.chart_path is not None:
        click.echo(f"chart:   {report.chart_path}", err=True)
    click.echo(f"total:   {report.seconds:.1f}s" + (f"  failed: {', '.join(report.failures)}" if report.failures
                                                     else ""), err=True)


COMMANDS = [demo_command]
