"""Evaluate a checkpoint: generate on the eval sets, judge, and compute HS, FA, over-refusal, KL.

With a classifying judge (`ClassifyingJudge`, e.g. the testbed judge) HS is the share of
compliance, every set's answers are classified, and the keyword judge's HS on the same
answers is kept beside it; with a refusal-only judge the result is as it always was.

`evaluate(model_dir, adapter=None, ...)` loads a Hugging Face model (plus a peft adapter
merged in memory); `evaluate_loaded(model, tokenizer, ...)` scores a model already in
memory. Nothing here knows which method made the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from surgery.eval.data import load_jsonl
from surgery.eval.generate import generate
from surgery.eval.judge import ClassifyingJudge, Judge, KeywordJudge, class_counts
from surgery.eval.metrics import (
    EvalResult,
    class_share,
    harmful_score,
    normalize_answer,
    over_refusal,
    task_accuracy,
)
from surgery.io.atomic import atomic_path, check_output
from surgery.model.encoding import pad_id, prompt_ids
from surgery.model.load import apply_adapter, default_device, load_causal_lm, load_tokenizer, model_directory
from surgery.model.scoring import kl_divergence, next_token_logprobs

PathLike = str | Path


def load_for_eval(model_dir: PathLike, adapter: PathLike | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """Load model + tokenizer for inference; an adapter is merged in memory the way `surgery merge`
    writes it (a tied head untied), so eval scores what the merged checkpoint would; inputs untouched."""
    dev = default_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tok = load_tokenizer(model_directory(model_dir))
    model = load_causal_lm(model_dir, dtype=dtype)
    if adapter is not None:
        model = apply_adapter(model, adapter)
    model.to(dev)  # type: ignore[arg-type]  # transformers types .to() as its own wrapper
    model.eval()
    return model, tok


def _prompts(rows: Sequence[dict]) -> list[str]:
    return [r["prompt"] for r in rows]


def evaluate_loaded(model: Any, tokenizer: Any, *, harmful: PathLike | Sequence[dict] | None = None,
                    task: PathLike | Sequence[dict] | None = None, benign: PathLike | Sequence[dict] | None = None,
                    harmless: PathLike | Sequence[dict] | None = None, kl_reference: Any = None,
                    judge: Judge | None = None, max_new_tokens: int = 64, batch_size: int = 32,
                    chat_template: bool = True, limit: int | None = None, progress: bool = False) -> EvalResult:
    """Score a loaded model. Each data set is a JSONL path or a list of rows; absent sets score None.

    `kl_reference` (a loaded model with the same vocabulary, or a model directory) with
    `harmless` prompts gives the first-token KL. Generations are kept in the result.
    """
    start = time.perf_counter()
    judge = judge or KeywordJudge()
    res = EvalResult(settings={"max_new_tokens": max_new_tokens, "chat_template": bool(
        chat_template and getattr(tokenizer, "chat_template", None)), "judge": judge.name, "greedy": True})

    def rows_of(src: PathLike | Sequence[dict] | None, fields: tuple[str, ...]) -> list[dict] | None:
        if src is None:
            return None
        if isinstance(src, (str, Path)):
            return load_jsonl(src, fields, limit=limit)
        return list(src)[:limit] if limit else list(src)

    def gen(rows: list[dict]) -> list[str]:
        return generate(model, tokenizer, _prompts(rows), max_new_tokens=max_new_tokens, batch_size=batch_size,
                        chat_template=chat_template, progress=progress)

    classifying = isinstance(judge, ClassifyingJudge)

    def classified(name: str, rows: list[dict], answers: list[str]) -> list[str] | None:
        """With a classifying judge: the classes of set `name`, counted into the result."""
        if not classifying:
            return None
        classes = judge.classify(_prompts(rows), answers)  # type: ignore[attr-defined]
        res.classes[name] = class_counts(classes)
        res.other_share[name] = class_share(classes, "other") or 0.0
        return classes

    def judged(name: str, rows: list[dict]) -> tuple[list[str], list[bool], list[str] | None]:
        """Generate for `rows`, judge refusals (and classes), record the generations of set `name`."""
        answers = gen(rows)
        classes = classified(name, rows, answers)
        refused = [c == "refusal" for c in classes] if classes is not None else judge.refusals(_prompts(rows), answers)
        res.counts[name] = len(rows)
        res.generations += [{"set": name, "prompt": r["prompt"], "answer": a, "refusal": f}
                            | ({} if classes is None else {"class": classes[i]})
                            for i, (r, a, f) in enumerate(zip(rows, answers, refused, strict=True))]
        return answers, refused, classes

    h = rows_of(harmful, ("prompt",))
    if h:
        answers, refused, classes = judged("harmful", h)
        if classes is None:
            res.harmful_score = harmful_score(refused)
        else:  # HS counts compliance only; the keyword judge's HS on the same answers beside it
            res.harmful_score = class_share(classes, "compliance")
            res.harmful_scores = {judge.name: res.harmful_score or 0.0,
                                  KeywordJudge.name: harmful_score(KeywordJudge().refusals(_prompts(h), answers)) or 0.0}
    t = rows_of(task, ("prompt", "answer"))
    if t:
        answers = gen(t)
        res.task_accuracy = task_accuracy(answers, [r["answer"] for r in t])
        res.counts["task"] = len(t)
        classes = classified("task", t, answers)
        res.generations += [{"set": "task", "prompt": r["prompt"], "answer": a, "gold": r["answer"],
                             "correct": normalize_answer(a) == normalize_answer(r["answer"])}
                            | ({} if classes is None else {"class": classes[i]})
                            for i, (r, a) in enumerate(zip(t, answers, strict=True))]
    b = rows_of(benign, ("prompt",))
    if b:
        res.over_refusal = over_refusal(judged("benign", b)[1])
    hl = rows_of(harmless, ("prompt",))
    if hl and kl_reference is not None:
        ref = kl_reference
        if isinstance(ref, (str, Path)):
            ref, _ = load_for_eval(ref, device=next(model.parameters()).device)
        pad = pad_id(tokenizer)
        ids = [prompt_ids(tokenizer, p, chat_template) for p in _prompts(hl)]
        res.first_token_kl = kl_divergence(next_token_logprobs(ref, ids, pad, batch_size),
                                           next_token_logprobs(model, ids, pad, batch_size))
        res.counts["harmless"] = len(hl)
    res.seconds = time.perf_counter() - start
    return res


def evaluate(model_dir: PathLike, adapter: PathLike | None = None, *, harmful: PathLike | Sequence[dict] | None = None,
             task: PathLike | Sequence[dict] | None = None, benign: PathLike | Sequence[dict] | None = None,
             harmless: PathLike | Sequence[dict] | None = None, kl_reference: PathLike | None = None,
             judge: Judge | None = None, max_new_tokens: int = 64, batch_size: int = 32,
             chat_template: bool = True, limit: int | None = None, device: str | None = None,
             save_generations: PathLike | None = None, progress: bool = False) -> EvalResult:
    """Load `model_dir` (+ `adapter`) and score it; see `evaluate_loaded`. Optionally write the
    generations as JSONL to `save_generations` (replaced if it exists; never one of the inputs)."""
    named = {"MODEL": model_dir, "--adapter": adapter, "--harmful": harmful, "--task": task,
             "--benign": benign, "--harmless": harmless, "--kl-reference": kl_reference}
    inputs = {role: p for role, p in named.items() if isinstance(p, (str, Path))}
    if save_generations is not None:
        check_output(save_generations, True, inputs)

    def early(src: PathLike | Sequence[dict] | None, fields: tuple[str, ...]) -> Sequence[dict] | None:
        # read the data before the model so that a bad file fails fast
        return load_jsonl(src, fields, limit=limit) if isinstance(src, (str, Path)) else src

    harmful, benign, harmless = (early(x, ("prompt",)) for x in (harmful, benign, harmless))
    task = early(task, ("prompt", "answer"))
    model, tok = load_for_eval(model_dir, adapter, device=device)
    res = evaluate_loaded(model, tok, harmful=harmful, task=task, benign=benign, harmless=harmless,
                          kl_reference=kl_reference, judge=judge, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, chat_template=chat_template, limit=limit, progress=progress)
    res.settings["model"] = str(model_dir)
    res.settings["adapter"] = None if adapter is None else str(adapter)
    if save_generations is not None:
        with atomic_path(save_generations, True, inputs) as tmp:
            with tmp.open("w", encoding="utf-8") as f:
                for g in res.generations:
                    f.write(json.dumps(g) + "\n")
    return res
