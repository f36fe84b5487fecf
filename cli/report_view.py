"""How every command shows its `Report`: a table for a person, JSON for a program."""

from __future__ import annotations

import json
from typing import Any

import click

from surgery.report import Report

__all__ = ["show_report"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def show_report(report: Report, as_json: bool, title: str | None = None, max_rows: int = 60) -> None:
    """Print `report`: `--json` gives `report.to_dict()` on stdout; else a per-tensor table and a summary."""
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if report.tensors:
        table = Table(title=title or report.method)
        for col, justify in (("tensor", "left"), ("shape", "right"), ("selected", "right"), ("changed", "right")):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for t in report.tensors[:max_rows]:
            table.add_row(t.name, "x".join(map(str, t.shape)), f"{t.selected:,}", f"{t.changed:,}")
        if len(report.tensors) > max_rows:
            table.add_row(f"... {len(report.tensors) - max_rows} more (see --json)", "", "", "")
        console.print(table)
    for key, value in report.metrics.items():
        if not isinstance(value, (dict, list)) or isinstance(value, list) and len(value) <= 8:
            console.print(f"{key}: {_fmt(value)}")
    where = "dry run: nothing written" if report.dry_run else (
        f"written to [bold]{report.out}[/bold]" if report.out else "nothing written")
    total = report.seconds.get("total")
    tail = f" in {total:.1f} s" if total is not None else ""
    if report.tensors:
        console.print(f"{report.changed:,} entries changed in {len(report.tensors)} tensors; {where}{tail}")
    else:
        console.print(f"{where}{tail}")
