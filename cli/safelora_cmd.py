"""`surgery safelora ADAPTER --base BASE --aligned ALIGNED -o OUT`: Safe LoRA projection of an adapter."""

from __future__ import annotations

import click
from surgery.cli.options import allow_pickle_option, config_options, input_option, json_option, output_options
from surgery.cli.report_view import show_report

from surgery.methods.config import Runtime
from surgery.methods.safelora import SafeLoraConfig, run


@click.command("safelora")
@click.argument("adapter", type=click.Path(path_type=str))
@input_option("base", help="Unaligned base checkpoint.")
@input_option("aligned", help="Aligned checkpoint (the one the adapter was trained on).")
@config_options(SafeLoraConfig)
@output_options(what="Output adapter directory")
@allow_pickle_option
@json_option
def safelora_command(adapter: str, base: str, aligned: str, config: SafeLoraConfig, out: str, force: bool,
                     allow_pickle: bool, as_json: bool) -> None:
    """Project the LoRA ADAPTER's least-aligned modules onto the alignment subspace (Safe LoRA).

    V = W_aligned - W_base per module; lora_B <- P·lora_B with P = V V^T/||V||_F (as the
    reference code), for the K lowest cos(P·ΔW, ΔW) modules (default 10) or those below
    --threshold. Writes a peft adapter plus surgery_report.json.
    """
    report = run(config, {"adapter": adapter, "base": base, "aligned": aligned}, out,
                 Runtime(force=force, allow_pickle=allow_pickle))
    show_report(report, as_json, title=f"Safe LoRA ({config.mode}{', exact' if config.exact else ''})")


COMMANDS = [safelora_command]
