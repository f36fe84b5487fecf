"""`surgery antidote MODEL --calib HARMFUL.jsonl --ratio R -o OUT [--adapter A] [--aligned B]`."""

from __future__ import annotations

import click
from surgery.cli.options import (
    config_options,
    device_option,
    dry_run_option,
    input_option,
    json_option,
    output_options,
)
from surgery.cli.report_view import show_report

from surgery.methods.antidote import AntidoteConfig, run
from surgery.methods.config import Runtime


@click.command("antidote")
@click.argument("model", type=click.Path(path_type=str))
@input_option("calib", help='Harmful calibration JSONL, one {"prompt": ..., "response": ...} a line.')
@input_option("adapter", required=False,
              help="The fine-tuning LoRA over MODEL: prune its A and B (the published algorithm).")
@input_option("aligned", required=False,
              help="Aligned model MODEL was fine-tuned from: score only W - W_aligned and reset to aligned values.")
@config_options(AntidoteConfig)
@output_options(required=False, what="Output directory (an adapter with --adapter, else a model)")
@dry_run_option
@device_option
@json_option
def antidote_command(model: str, calib: str, adapter: str | None, aligned: str | None, config: AntidoteConfig,
                     out: str | None, force: bool, dry_run: bool, device: str | None, as_json: bool) -> None:
    """Repair MODEL after harmful fine-tuning with Antidote: prune the weights harmful data relies on most.

    Wanda scores |W|·||X|| on the harmful calibration data; in every output row the
    highest RATIO share is zeroed (in the LoRA's A and B with --adapter; in the decoder
    Linears of a merged model otherwise; reset to the aligned values with --aligned).
    Writes the result plus surgery_report.json (per-tensor counts).
    """
    if out is None and not dry_run:
        raise click.UsageError("give -o/--output, or --dry-run to only report")
    inputs = {k: v for k, v in {"model": model, "calib": calib, "adapter": adapter, "aligned": aligned}.items()
              if v is not None}
    report = run(config, inputs, out, Runtime(device=device, force=force, dry_run=dry_run))
    show_report(report, as_json, title=f"Antidote ({report.config['mode']}, ratio {config.ratio:g}, "
                                       f"scope {config.scope})")


COMMANDS = [antidote_command]
