"""`surgery attack finetune`: the harmful fine-tuning attack (and plain or defended fine-tuning).

A thin command over `surgery.methods.finetune.finetune`: the task data are poisoned with a
share `--ratio` of harmful pairs as the literature does (`int(p*n)` harmful, default 0.1),
trained with the loss on response tokens only, written as a peft LoRA adapter (or a whole
model with `--full`). `--freeze-mask` (full fine-tuning) and `--salora` (LoRA) plug in the
defenses' training hooks, so an attack and a defended run differ by one option.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from surgery.errors import SurgeryError


def _split_targets(values: tuple[str, ...]) -> list[str] | None:
    out = [t.strip() for v in values for t in v.split(",") if t.strip()]
    return out or None


@click.group("attack")
def attack_group() -> None:
    """Weight-level attacks on safety alignment (harmful fine-tuning)."""


@attack_group.command("finetune")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str), help="Task data, JSONL {prompt, response}.")
@click.option("--harmful", type=click.Path(path_type=str), help="Harmful pairs, JSONL {prompt, response}, mixed in.")
@click.option("--ratio", type=float, default=0.1, show_default=True,
              help="Share p of harmful examples: int(p*n) of the n examples (needs --harmful).")
@click.option("--n", "n_examples", type=int, help="Examples in the mixed set (default: as many as the task data).")
@click.option("--lora-r", type=int, default=8, show_default=True)
@click.option("--lora-alpha", type=int, default=16, show_default=True)
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--targets", multiple=True,
              help="LoRA target modules (repeat or comma-separate; default all attention and MLP projections).")
@click.option("--epochs", type=float, default=3, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True, help="Tokens per example (cut on the right).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--full", is_flag=True, help="Train every weight and write a whole model instead of an adapter.")
@click.option("--freeze-mask", type=click.Path(path_type=str),
              help="Mask (surgery neurons find) whose weights stay frozen; needs --full.")
@click.option("--salora", "salora_module", type=click.Path(path_type=str),
              help="SaLoRA module (surgery salora fit): LoRA outputs kept out of the safety subspace.")
@click.option("--no-chat-template", is_flag=True, help="Encode prompts as plain text even if the tokenizer has a template.")
@click.option("--device", type=str, help="Torch device (default: CUDA when present, else CPU).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output adapter (or model) dir.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the training record as JSON on stdout.")
def finetune_command(model: str, data: str, harmful: str | None, ratio: float, n_examples: int | None, lora_r: int,
                     lora_alpha: int, lora_dropout: float, targets: tuple[str, ...], epochs: float, lr: float,
                     batch_size: int, seed: int, max_length: int, weight_decay: float, full: bool,
                     freeze_mask: str | None, salora_module: str | None, no_chat_template: bool, device: str | None,
                     out: str, force: bool, as_json: bool) -> None:
    """Fine-tune MODEL on --data, poisoned with a share --ratio of --harmful pairs; write OUT.

    Loss on response tokens only (prompt labels -100); AdamW with warmup and linear
    decay; a LoRA adapter by default. The training configuration (with the first and
    last loss) is written to OUT/surgery_finetune.json.
    """
    from surgery.calib.data import load_pairs
    from surgery.io.atomic import check_output
    from surgery.methods.finetune import CONFIG_NAME, finetune

    inputs = {"--data": data, "--harmful": harmful, "--freeze-mask": freeze_mask, "--salora": salora_module}
    check_output(out, force, {"MODEL": model, **inputs})
    if not 0.0 <= ratio <= 1.0:
        raise SurgeryError(f"--ratio must be in [0, 1], got {ratio}")
    if freeze_mask and not full:
        raise SurgeryError("--freeze-mask freezes base weights, which LoRA never trains: use it with --full")
    if salora_module and full:
        raise SurgeryError("--salora constrains LoRA updates: it cannot be combined with --full")
    if not Path(model).is_dir():
        raise SurgeryError(f"{model} is not a model directory: give a Hugging Face model directory")
    train = load_pairs(data)
    harm = load_pairs(harmful) if harmful else None
    target_list = _split_targets(targets)
    prepare = after = None
    extra: dict[str, object] = {}
    if freeze_mask:
        from surgery.methods.neurons import freeze_mask_hook

        after = freeze_mask_hook(freeze_mask)
        extra["freeze_mask"] = str(freeze_mask)
    if salora_module:
        from surgery.methods.salora import salora_prepare, salora_targets

        prepare = salora_prepare(salora_module)
        target_list = target_list or salora_targets(salora_module)
        extra["salora_module"] = str(salora_module)
    path = finetune(model, train, out, harmful_pairs=harm, ratio=ratio if harm else 0.0, n=n_examples,
                    lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, targets=target_list,
                    epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, full=full, max_length=max_length,
                    chat_template=not no_chat_template, weight_decay=weight_decay, device=device,
                    prepare_model=prepare, after_backward=after, force=force, extra_config=extra or None,
                    inputs=inputs)
    record = json.loads((Path(path) / CONFIG_NAME).read_text())
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    table = Table(title=f"fine-tuned {'model' if full else 'LoRA adapter'}")
    table.add_column("setting")
    table.add_column("value", justify="right")
    for key in ("n_examples", "n_harmful", "ratio", "epochs", "lr", "batch_size", "steps", "first_loss",
                "final_loss"):
        value = record.get(key)
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    Console().print(f"written to [bold]{path}[/bold] (configuration in {CONFIG_NAME})")


COMMANDS = [attack_group]
