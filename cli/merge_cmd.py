"""`surgery merge BASE ADAPTER -o OUT`: stream a LoRA adapter into its base checkpoint."""

from __future__ import annotations

import json

import click
from rich.console import Console

from surgery.errors import SurgeryError
from surgery.io.merge import merge_adapter
from surgery.io.summary import format_size, parse_size


class ByteSize(click.ParamType):
    """A byte count written like 5GB (10^9), 500MB, 1.5GiB (2^30) or plain bytes."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except SurgeryError as exc:
            self.fail(str(exc), param, ctx)


SIZE = ByteSize()


@click.command("merge")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output model directory.")
@click.option("--shard-size", type=SIZE, default="5GB", show_default=True,
              help="Largest shard, in bytes of tensor data (5GB = 5*10^9, 5GiB = 5*2^30).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new output is complete).")
@click.option("--allow-nonfinite", is_flag=True, help="Write the result even if it holds NaN or Inf.")
@click.option("--allow-pickle", is_flag=True, help="Read pickle (.bin) weights with weights_only=True.")
@click.option("--unmerge", is_flag=True, help="Subtract the adapter instead (undo an earlier merge).")
@click.option("--json", "as_json", is_flag=True, help="Print the merge report as JSON on stdout.")
def merge_command(
    base: str, adapter: str, out: str, shard_size: int, force: bool, allow_nonfinite: bool,
    allow_pickle: bool, unmerge: bool, as_json: bool,
) -> None:
    """Merge the LoRA ADAPTER into the BASE checkpoint, one tensor at a time, into OUT.

    Computes W + scaling·B@A in fp32 (DoRA, rslora, rank/alpha patterns, Conv1D and
    embedding LoRA as peft does), stores each tensor in its own dtype, and copies the
    config and tokenizer files. The output appears whole or not at all.
    """
    report = merge_adapter(
        base, adapter, out, shard_size=shard_size, unmerge=unmerge,
        allow_nonfinite=allow_nonfinite, force=force, allow_pickle=allow_pickle,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return
    verb = "unmerged" if unmerge else "merged"
    extras = []
    if report.dora:
        extras.append(f"{len(report.dora)} DoRA")
    if report.biases:
        extras.append(f"{len(report.biases)} biases")
    if report.replaced:
        extras.append(f"{len(report.replaced)} full tensors replaced")
    if report.nonfinite:
        extras.append(f"[red]{len(report.nonfinite)} with NaN/Inf[/red]")
    Console().print(
        f"{verb} {len(report.merged)} of {report.tensors} tensors"
        + (f" ({', '.join(extras)})" if extras else "")
        + f" into [bold]{report.out}[/bold]: {format_size(report.total_bytes)} in "
        f"{len(report.shards)} file(s), {report.seconds:.1f} s"
    )


COMMANDS = [merge_command]
