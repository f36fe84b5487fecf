"""`surgery methods [NAME] [--json]`: the registry, every method with its kind and the inputs it needs."""

from __future__ import annotations

import json

import click

from surgery.methods.registry import KINDS, ROLES, get, methods


@click.command("methods")
@click.argument("name", required=False)
@click.option("--kind", type=click.Choice(list(KINDS)), default=None, help="Only methods of this kind.")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON on stdout.")
def methods_command(name: str | None, kind: str | None, as_json: bool) -> None:
    """List every registered method: its kind, command, needed and optional inputs, adapter kinds.

    With NAME, also the method's options (from its config) with defaults and ranges.
    """
    specs = [get(name)] if name else methods(kind)
    if as_json:
        rows = []
        for spec in specs:
            row = spec.to_dict()
            if name and spec.config:
                row["options"] = [{"name": f.name, "flag": f.flag, "default": f.default, "help": f.help,
                                   "range": f.range_text() or None}
                                  for f in spec.config_class().fields() if f.cli]
            rows.append(row)
        click.echo(json.dumps(rows if not name else rows[0], indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="surgery methods")
    for col in ("method", "kind", "command", "needs", "optional", "adapters", "writes"):
        table.add_column(col)
    for s in specs:
        table.add_row(s.name, s.kind, s.command, ", ".join(s.needs), ", ".join(s.optional) or "-",
                      ", ".join(s.adapters) or "-", s.writes)
    console = Console()
    console.print(table)
    if name:
        spec = specs[0]
        console.print(f"{spec.summary} ({spec.reference or 'no reference'}); docs: {spec.docs}")
        for role in (*spec.needs, *spec.optional):
            console.print(f"  {role}: {ROLES[role]}")
        if spec.config:
            for f in spec.config_class().fields():
                if f.cli:
                    rng = f" {f.range_text()}" if f.range_text() else ""
                    console.print(f"  {f.flag} (default {f.default!r}{rng}): {f.help}")


COMMANDS = [methods_command]
