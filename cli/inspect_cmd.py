"""`surgery inspect PATH`: what a checkpoint or LoRA adapter holds, from headers alone."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

# surgery.io.summary (and so torch) is imported where it is used, so `surgery inspect --help` stays light.


def _print_checkpoint(s: dict, console: Console) -> None:
    from surgery.io.summary import format_size

    arch = s.get("architecture") or s.get("model_type") or "unknown architecture"
    layout = f"{len(s['files'])} shards" if s["sharded"] else s["files"][0] if s["files"] else "no files"
    console.print(f"[bold]{s['path']}[/bold]: checkpoint, {arch}, {layout}")
    console.print(
        f"{s['tensors']} tensors, {s['parameters']:,} parameters, {format_size(s['bytes'])}, "
        f"{s['layers']} layers"
    )
    meta = s.get("metadata") or {}
    if "surgery.method" in meta:
        console.print(
            f"written by surgery {meta.get('surgery.version', '?')} {meta['surgery.method']} "
            f"{meta.get('surgery.params', '')}"
        )
    dtypes = Table(title="by dtype")
    for col in ("dtype", "tensors", "parameters", "bytes"):
        dtypes.add_column(col, justify="left" if col == "dtype" else "right")
    for dtype, d in s["dtypes"].items():
        dtypes.add_row(dtype, str(d["tensors"]), f"{d['parameters']:,}", format_size(d["bytes"]))
    console.print(dtypes)
    types = Table(title="module types (per layer where repeated)")
    for col in ("tensor", "count", "shape", "dtype", "parameters"):
        types.add_column(col, justify="left" if col in ("tensor", "dtype") else "right")
    for name, t in s["module_types"].items():
        types.add_row(name, str(t["count"]), "×".join(map(str, t["shape"])), t["dtype"], f"{t['parameters']:,}")
    console.print(types)


def _print_adapter(s: dict, console: Console) -> None:
    from surgery.io.summary import format_size

    flags = [f for f in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias") if s[f]]
    console.print(f"[bold]{s['path']}[/bold]: LoRA adapter" + (f" over {s['base_model']}" if s["base_model"] else ""))
    console.print(
        f"{s['modules']} modules in {s['layers']} layers, {s['tensors']} tensors, {s['parameters']:,} parameters, "
        f"{format_size(s['bytes'])}; r={s['r']}, lora_alpha={s['lora_alpha']}"
        + (f"; {', '.join(flags)}" if flags else "")
    )
    table = Table(title="targets")
    for col in ("module", "kind", "count", "r", "alpha"):
        table.add_column(col, justify="left" if col in ("module", "kind") else "right")
    for name, t in s["targets"].items():
        table.add_row(name, t["kind"], str(t["modules"]), ",".join(map(str, t["r"])),
                      ",".join(f"{a:g}" for a in t["alpha"]))
    console.print(table)
    if s["full_tensors"]:
        console.print(f"full tensors (modules_to_save / saved layers): {', '.join(s['full_tensors'])}")
    dtypes = ", ".join(f"{k}: {format_size(v['bytes'])}" for k, v in s["dtypes"].items())
    console.print(f"bytes per dtype: {dtypes}")


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
@click.option("--allow-pickle", is_flag=True, help="Read pickle (.bin) weights with weights_only=True.")
def inspect_command(path: str, as_json: bool, allow_pickle: bool) -> None:
    """Show what a checkpoint or LoRA adapter holds: tensors, parameters, bytes per dtype,
    layers and module types; for adapters rank, alpha and targets. Reads headers only."""
    from surgery.io.summary import summarize

    summary = summarize(path, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    console = Console()
    if summary["kind"] == "adapter":
        _print_adapter(summary, console)
    else:
        _print_checkpoint(summary, console)


COMMANDS = [inspect_command]
