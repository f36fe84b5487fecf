"""`surgery antidote MODEL --calib HARMFUL.jsonl --ratio R -o OUT [--adapter A] [--aligned B]`."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from surgery.methods.antidote import DEFAULT_RATIO, antidote
from surgery.methods.wanda import DEFAULT_MAX_LENGTH


@click.command("antidote")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--calib", required=True, type=click.Path(path_type=str),
              help='Harmful calibration JSONL, one {"prompt": ..., "response": ...} a line.')
@click.option("--ratio", type=float, default=DEFAULT_RATIO, show_default=True,
              help="Share of each row to prune (the reference's scripts use 0.1, 0.05, 0.02, 0.01).")
@click.option("-o", "--output", "out", type=click.Path(path_type=str), default=None,
              help="Output directory (an adapter with --adapter, else a model).")
@click.option("--adapter", type=click.Path(path_type=str), default=None,
              help="The fine-tuning LoRA over MODEL: prune its A and B (the published algorithm).")
@click.option("--aligned", type=click.Path(path_type=str), default=None,
              help="Aligned model MODEL was fine-tuned from: score only W - W_aligned and reset to aligned values.")
@click.option("--scope", type=click.Choice(["row", "tensor"]), default="row", show_default=True,
              help="Select the top share in each output row (reference) or over the whole matrix.")
@click.option("--targets", multiple=True,
              help="Modules, comma-separated or repeated (q_proj,self_attn.v_proj, globs, re:REGEX); "
                   "default every LoRA module or every decoder Linear.")
@click.option("--dry-run", is_flag=True, help="Report per tensor what would change; write nothing.")
@click.option("--max-length", type=int, default=DEFAULT_MAX_LENGTH, show_default=True,
              help="Tokens per sample; longer prompts are an error, longer responses are cut.")
@click.option("--num-samples", type=int, default=None, help="Use the first N samples (default all).")
@click.option("--tokens", type=click.Choice(["all", "response"]), default="all", show_default=True,
              help="Tokens counted in the norms; the reference uses the whole sequence (all).")
@click.option("--no-chat-template", is_flag=True, help="Concatenate prompt and response instead of the chat template.")
@click.option("--device", default=None, help="Device for the layer passes (default cuda if present, else cpu).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def antidote_command(model: str, calib: str, ratio: float, out: str | None, adapter: str | None,
                     aligned: str | None, scope: str, targets: tuple[str, ...], dry_run: bool, max_length: int,
                     num_samples: int | None, tokens: str, no_chat_template: bool, device: str | None,
                     force: bool, as_json: bool) -> None:
    """Repair MODEL after harmful fine-tuning with Antidote: prune the weights harmful data relies on most.

    Wanda scores |W|·||X|| on the harmful calibration data; in every output row the
    highest RATIO share is zeroed (in the LoRA's A and B with --adapter; in the decoder
    Linears of a merged model otherwise; reset to the aligned values with --aligned).
    Writes the result plus antidote_report.json (per-tensor counts).
    """
    if out is None and not dry_run:
        raise click.UsageError("give -o/--output, or --dry-run to only report")
    report = antidote(model, calib, ratio, out, adapter=adapter, aligned=aligned, scope=scope,
                      targets=_split_targets(targets), dry_run=dry_run, max_length=max_length,
                      num_samples=num_samples, tokens=tokens, chat_template=not no_chat_template,
                      device=device, force=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    console = Console()
    table = Table(title=f"Antidote ({report.params['mode']}, ratio {ratio}, scope {scope})")
    table.add_column("tensor")
    table.add_column("shape", justify="right")
    table.add_column("selected", justify="right")
    table.add_column("changed", justify="right")
    for t in report.tensors:
        table.add_row(t.name, "x".join(map(str, t.shape)), f"{t.selected:,}", f"{t.changed:,}")
    console.print(table)
    where = "dry run: nothing written" if dry_run else f"written to [bold]{report.out}[/bold]"
    console.print(f"{report.changed:,} entries changed in {len(report.tensors)} tensors "
                  f"({report.samples} samples, {report.tokens:,} tokens); {where} "
                  f"in {report.seconds.get('total', 0.0):.1f} s")


def _split_targets(values: tuple[str, ...]) -> list[str] | None:
    """`--targets q_proj,v_proj` or repeated `--targets`: one list, None when not given."""
    out = [t for v in values for t in v.replace(",", " ").split()]
    return out or None


COMMANDS = [antidote_command]
