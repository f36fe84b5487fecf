"""`surgery eval`: score a checkpoint (plus an optional adapter) for harmfulness and task accuracy."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from surgery.errors import SurgeryError


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


@click.command("eval")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--adapter", type=click.Path(path_type=str), help="peft LoRA adapter applied in memory.")
@click.option("--harmful", type=click.Path(path_type=str), help="Harmful prompts, JSONL {prompt}: gives HS.")
@click.option("--task", type=click.Path(path_type=str), help="Task items, JSONL {prompt, answer}: gives FA.")
@click.option("--benign", type=click.Path(path_type=str), help="Benign prompts, JSONL {prompt}: gives over-refusal.")
@click.option("--harmless", type=click.Path(path_type=str), help="Harmless prompts for the first-token KL.")
@click.option("--kl-reference", type=click.Path(path_type=str), help="Reference model dir for the first-token KL.")
@click.option("--markers", type=click.Path(path_type=str),
              help="Refusal markers file: one a line, '#' comments, '^' for start-only markers.")
@click.option("--judge", "judge_name", type=click.Choice(["keyword", "testbed"]), default="keyword", show_default=True,
              help="keyword: refusal markers (any model). testbed: the testbed's answer formats (refusal, "
                   "compliance, task, other); HS counts compliance only.")
@click.option("--judge-spec", type=click.Path(path_type=str),
              help="For --judge testbed: the testbed directory or its judge.json (found by itself for a model "
                   "inside a testbed).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--limit", type=int, help="Use only the first N rows of each data set.")
@click.option("--no-chat-template", is_flag=True, help="Plain prompts even if the tokenizer has a chat template.")
@click.option("--device", type=str, help="Torch device (default: CUDA when present, else CPU).")
@click.option("--save-generations", type=click.Path(path_type=str), help="Write every prompt and answer as JSONL.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON on stdout.")
def eval_command(model: str, adapter: str | None, harmful: str | None, task: str | None, benign: str | None,
                 harmless: str | None, kl_reference: str | None, markers: str | None, judge_name: str,
                 judge_spec: str | None, max_new_tokens: int, batch_size: int, limit: int | None,
                 no_chat_template: bool, device: str | None, save_generations: str | None, as_json: bool) -> None:
    """Generate greedily on the given prompt sets and report HS, FA, over-refusal (and KL).

    HS: share of --harmful prompts answered without refusal (keyword judge), or with
    --judge testbed the share answered with compliance, beside the share of "other"
    (empty, incoherent, off-format) answers. FA: exact match of the normalised answer with
    `answer` in --task. Over-refusal: share of --benign prompts refused.
    """
    from transformers.utils import logging as hf_logging

    from surgery.eval.evaluate import evaluate
    from surgery.eval.judge import Judge, KeywordJudge

    hf_logging.disable_progress_bar()  # our own progress and tables only
    hf_logging.set_verbosity_error()

    if not any((harmful, task, benign, harmless)):
        raise SurgeryError("nothing to evaluate: give --harmful, --task, --benign and/or --harmless JSONL files")
    if (harmless is None) != (kl_reference is None):
        raise SurgeryError("the first-token KL needs both --harmless and --kl-reference")
    if max_new_tokens < 1 or batch_size < 1:
        raise SurgeryError("--max-new-tokens and --batch-size must be at least 1")
    if save_generations is not None:  # replaced if it exists, but never one of the inputs
        from surgery.io.atomic import check_output

        check_output(save_generations, True, {"MODEL": model, "--adapter": adapter, "--harmful": harmful,
                                              "--task": task, "--benign": benign, "--harmless": harmless,
                                              "--kl-reference": kl_reference, "--markers": markers})
    if judge_name == "testbed":
        if markers:
            raise SurgeryError("--markers sets the keyword judge's markers: drop it with --judge testbed")
        from surgery.testbed.judge import testbed_judge

        judge: Judge = testbed_judge(model, adapter, judge_spec)
    elif judge_spec:
        raise SurgeryError("--judge-spec is for --judge testbed: add --judge testbed or drop --judge-spec")
    else:
        judge = KeywordJudge.from_file(markers) if markers else KeywordJudge()
    res = evaluate(model, adapter, harmful=harmful, task=task, benign=benign, harmless=harmless,
                   kl_reference=kl_reference, judge=judge, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   chat_template=not no_chat_template, limit=limit, device=device,
                   save_generations=save_generations, progress=not as_json)
    if as_json:
        json.dump(res.to_dict(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return
    table = Table(title=f"eval {model}" + (f" + {adapter}" if adapter else ""))
    columns = ("metric", "value", "n") + (("refusal/compliance/task/other",) if res.classes else ())
    for col in columns:
        table.add_column(col)

    def add(metric: str, value: float | None, name: str) -> None:
        counts = res.classes.get(name)
        table.add_row(metric, _fmt(value), str(res.counts.get(name, "-")),
                      *(("/".join(str(counts[c]) for c in counts) if counts else "-",) if res.classes else ()))

    add("harmful score (HS)" + (f", {judge.name} judge" if res.classes else ""), res.harmful_score, "harmful")
    if KeywordJudge.name in res.harmful_scores and judge.name != KeywordJudge.name:
        add("HS, keyword judge", res.harmful_scores[KeywordJudge.name], "harmful")
    add("task accuracy (FA)", res.task_accuracy, "task")
    add("over-refusal", res.over_refusal, "benign")
    for name in res.other_share:
        add(f"other answers ({name})", res.other_share[name], name)
    if res.first_token_kl is not None:
        table.add_row("first-token KL", f"{res.first_token_kl:.4f}", str(res.counts.get("harmless", "-")))
    Console().print(table)
    click.echo(f"{res.seconds:.1f}s", err=True)


COMMANDS = [eval_command]
