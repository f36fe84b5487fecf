"""`surgery safelora ADAPTER --base BASE --aligned ALIGNED -o OUT`: Safe LoRA projection of an adapter."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from surgery.methods.safelora import DEFAULT_NUM_LAYERS, safelora


@click.command("safelora")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--base", required=True, type=click.Path(path_type=str), help="Unaligned base checkpoint.")
@click.option("--aligned", required=True, type=click.Path(path_type=str),
              help="Aligned checkpoint (the one the adapter was trained on).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output adapter directory.")
@click.option("--num-layers", type=int, default=None,
              help=f"Project the K modules with the lowest cosine (default {DEFAULT_NUM_LAYERS}).")
@click.option("--threshold", type=float, default=None,
              help="Instead project every module with cosine <= T (the reference's default T is 0.5).")
@click.option("--exact", is_flag=True,
              help="Use the orthogonal projector onto V's column space instead of V V^T/||V||_F.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Read pickle (.bin) weights with weights_only=True.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def safelora_command(adapter: str, base: str, aligned: str, out: str, num_layers: int | None,
                     threshold: float | None, exact: bool, force: bool, allow_pickle: bool, as_json: bool) -> None:
    """Project the LoRA ADAPTER's least-aligned modules onto the alignment subspace (Safe LoRA).

    V = W_aligned - W_base per module; lora_B <- P·lora_B with P = V V^T/||V||_F (as the
    reference code), for the K lowest cos(P·ΔW, ΔW) modules (default 10) or those below
    --threshold. Writes a peft adapter plus safelora_report.json.
    """
    if num_layers is not None and threshold is not None:
        raise click.UsageError("give either --num-layers or --threshold, not both")
    report = safelora(adapter, base, aligned, out, num_layers=num_layers, threshold=threshold, exact=exact,
                      force=force, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return
    table = Table(title=f"Safe LoRA ({report.mode}{', exact' if exact else ''})")
    table.add_column("module")
    table.add_column("cosine", justify="right")
    table.add_column("‖PΔW‖/‖ΔW‖", justify="right")
    table.add_column("projected")
    for m in report.modules:
        table.add_row(m.module, f"{m.cosine:.5f}", f"{m.norm_ratio:.3f}", "yes" if m.projected else "")
    console = Console()
    console.print(table)
    console.print(f"projected {len(report.projected)} of {len(report.modules)} modules into "
                  f"[bold]{report.out}[/bold] in {report.seconds:.1f} s")


COMMANDS = [safelora_command]
