"""`surgery wanda MODEL --calib C.jsonl --sparsity S -o OUT`: Wanda pruning, streamed layer by layer."""

from __future__ import annotations

import json

import click
from rich.console import Console

from surgery.methods.wanda import DEFAULT_MAX_LENGTH, DEFAULT_NUM_SAMPLES, wanda


@click.command("wanda")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--calib", required=True, type=click.Path(path_type=str),
              help='Calibration JSONL, one {"prompt": ..., "response": ...} a line.')
@click.option("--sparsity", required=True, type=float, help="Share of each row's weights to zero, e.g. 0.5.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output model directory.")
@click.option("--targets", multiple=True, help="Modules to prune, comma-separated or repeated (q_proj,v_proj); default every decoder Linear.")
@click.option("--scope", type=click.Choice(["row", "tensor"]), default="row", show_default=True,
              help="Compare scores within each output row (Wanda) or over the whole matrix.")
@click.option("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES, show_default=True,
              help="Calibration samples read from the file (Wanda's nsamples).")
@click.option("--max-length", type=int, default=DEFAULT_MAX_LENGTH, show_default=True,
              help="Tokens per sample; longer prompts are an error, longer responses are cut.")
@click.option("--tokens", type=click.Choice(["all", "response"]), default="all", show_default=True,
              help="Which tokens count in the activation norms.")
@click.option("--no-chat-template", is_flag=True, help="Concatenate prompt and response instead of the chat template.")
@click.option("--device", default=None, help="Device for the layer passes (default cuda if present, else cpu).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def wanda_command(model: str, calib: str, sparsity: float, out: str, targets: tuple[str, ...], scope: str,
                  num_samples: int, max_length: int, tokens: str, no_chat_template: bool, device: str | None,
                  force: bool, as_json: bool) -> None:
    """Prune MODEL with Wanda: zero the lowest |W|·||X|| share of every row of each decoder Linear.

    Layers are calibrated and pruned in order, each on the outputs of the already pruned
    ones (as the reference), reading one decoder layer at a time from the checkpoint and
    streaming the output. Writes a model plus wanda_report.json.
    """
    report = wanda(model, calib, sparsity, out, targets=_split_targets(targets), scope=scope,
                   num_samples=num_samples, max_length=max_length, tokens=tokens,
                   chat_template=not no_chat_template, device=device, force=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    Console().print(
        f"pruned {report.changed:,} of {sum(t.numel for t in report.tensors):,} weights in "
        f"{len(report.tensors)} matrices ({report.samples} samples, {report.tokens:,} tokens) into "
        f"[bold]{report.out}[/bold] in {report.seconds.get('total', 0.0):.1f} s"
    )


def _split_targets(values: tuple[str, ...]) -> list[str] | None:
    """`--targets q_proj,v_proj` or repeated `--targets`: one list, None when not given."""
    out = [t for v in values for t in v.replace(",", " ").split()]
    return out or None


COMMANDS = [wanda_command]
