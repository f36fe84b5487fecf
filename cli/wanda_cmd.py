"""`surgery wanda MODEL --calib C.jsonl --sparsity S -o OUT`: Wanda pruning, streamed layer by layer."""

from __future__ import annotations

import click
from surgery.cli.options import config_options, device_option, input_option, json_option, output_options
from surgery.cli.report_view import show_report

from surgery.methods.config import Runtime
from surgery.methods.wanda import WandaConfig, run


@click.command("wanda")
@click.argument("model", type=click.Path(path_type=str))
@input_option("calib")
@config_options(WandaConfig)
@output_options(what="Output model directory")
@device_option
@json_option
def wanda_command(model: str, calib: str, config: WandaConfig, out: str, force: bool, device: str | None,
                  as_json: bool) -> None:
    """Prune MODEL with Wanda: zero the lowest |W|·||X|| share of every row of each decoder Linear.

    Layers are calibrated and pruned in order, each on the outputs of the already pruned
    ones (as the reference), reading one decoder layer at a time from the checkpoint and
    streaming the output. Writes a model plus surgery_report.json.
    """
    report = run(config, {"model": model, "calib": calib}, out, Runtime(device=device, force=force))
    show_report(report, as_json, title=f"Wanda (sparsity {config.sparsity:g}, scope {config.scope})")


COMMANDS = [wanda_command]
