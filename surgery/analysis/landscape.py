"""The one-dimensional safety landscape: HS and FA along (1 − α)·A + α·B.

Peng et al. (2024, "Navigating the Safety Landscape") probe how safety changes along a
straight line in weight space; between an aligned model A and a fine-tuned B the
harmful score usually stays flat and then rises sharply (the "safety basin"). B is a
checkpoint with A's tensors, or a LoRA adapter over A (then α scales the adapter's
ΔW: A + α·ΔW, with DoRA, biases and saved tensors moved along A → merged).

A is loaded into memory once; for each α only the tensors that differ are rewritten
in place, one at a time, from the lazily read checkpoints (A's originals are re-read,
never copied), and the model is scored with `surgery.eval.evaluate_loaded`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surgery.errors import MismatchError, SurgeryError
from surgery.io.adapter import LoraAdapter
from surgery.io.checkpoint import Checkpoint
from surgery.io.header import torch_dtype
from surgery.progress import track

if TYPE_CHECKING:  # pragma: no cover
    from surgery.eval.judge import Judge


@dataclass
class LandscapePoint:
    """Scores at one α (fractions in [0, 1]; None where the data set was not given)."""

    alpha: float
    harmful_score: float | None
    task_accuracy: float | None
    over_refusal: float | None = None
    seconds: float = 0.0
    keyword_harmful_score: float | None = None  # with a classifying judge: the keyword judge's HS beside it
    other_share: float | None = None  # with a classifying judge: share of "other" answers to harmful prompts


@dataclass
class LandscapeReport:
    """The curve from A (α = 0) to B (α = 1), JSON-ready via `to_dict`."""

    a: str
    b: str
    mode: str  # "checkpoints" | "adapter"
    moving_tensors: int
    points: list[LandscapePoint] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def alpha_grid(steps: int, start: float = 0.0, stop: float = 1.0) -> list[float]:
    """`steps` evenly spaced α from `start` to `stop` inclusive (0 and 1 are exact)."""
    if steps < 2:
        raise SurgeryError(f"--steps must be at least 2 (got {steps}); the path needs both ends")
    if not stop > start:
        raise SurgeryError(f"the α range must increase (got {start} to {stop})")
    return [start + (stop - start) * i / (steps - 1) for i in range(steps - 1)] + [stop]


Setter = Callable[[float], torch.Tensor]


def _plan_checkpoints(a: Checkpoint, b: Checkpoint) -> dict[str, Setter]:
    """name -> (α -> fp32 weight) for every tensor of A that B changes; refuses mismatched inputs."""
    missing = [n for n in a.names() if n not in b]
    extra = [n for n in b.names() if n not in a]
    shapes = [n for n in a.names() if n in b and tuple(a.info(n).shape) != tuple(b.info(n).shape)]
    if missing or extra or shapes:
        what = (f"{len(missing)} tensors only in A (e.g. {missing[:1]})" if missing else
                f"{len(extra)} tensors only in B (e.g. {extra[:1]})" if extra else
                f"{len(shapes)} shape mismatches (e.g. {shapes[:1]})")
        raise MismatchError(f"A and B must have the same tensors to interpolate: {what}; "
                            "run `surgery diff A B` to see them all")
    plan: dict[str, Setter] = {}
    for name in a.names():
        if not torch_dtype(a.info(name).dtype).is_floating_point or torch.equal(a.get(name), b.get(name)):
            continue  # equal tensors stay as loaded: only what differs is rewritten per α

        def setter(alpha: float, name: str = name) -> torch.Tensor:
            return torch.lerp(a.get(name).to(torch.float32), b.get(name).to(torch.float32), alpha)

        plan[name] = setter
    return plan


def _plan_adapter(a: Checkpoint, lora: LoraAdapter) -> dict[str, Setter]:
    """name -> (α -> fp32 weight) for every tensor of A the adapter touches."""
    from surgery.io.merge import merged_weight

    modules, replacements = lora.match(a)
    bias_of = {m.base_bias_key: m for m in modules.values() if m.bias_key is not None}
    plan: dict[str, Setter] = {}
    for name in a.names():
        m, rkey, bias_m = modules.get(name), replacements.get(name), bias_of.get(name)
        if m is not None and rkey is None and not m.is_dora:
            def setter(alpha: float, m: Any = m, name: str = name) -> torch.Tensor:
                w = a.get(name).to(torch.float32, copy=True)
                if m.kind == "embedding" or m.fan_in_fan_out:
                    return w.addmm_(lora.lora_A(m).T, lora.lora_B(m).T, alpha=alpha * m.scaling)
                return w.addmm_(lora.lora_B(m), lora.lora_A(m), alpha=alpha * m.scaling)
        elif m is not None or rkey is not None or bias_m is not None:
            def setter(alpha: float, m: Any = m, rkey: Any = rkey, bias_m: Any = bias_m,  # type: ignore[misc]
                       name: str = name) -> torch.Tensor:
                w = a.get(name).to(torch.float32)
                if m is not None:
                    end = merged_weight(lora, m, lora.get(rkey) if rkey is not None else w)
                elif bias_m is not None:
                    end = w + lora.bias(bias_m)  # type: ignore[operator]  # bias_m names a saved bias
                else:
                    end = lora.get(rkey).to(torch.float32)
                return torch.lerp(w, end, alpha)
        else:
            continue
        plan[name] = setter
    return plan


def path_setters(a: Checkpoint, b: Checkpoint | LoraAdapter) -> dict[str, Setter]:
    """For each tensor of A that moves on the path: a function α -> its fp32 value at α.

    Reads one tensor per call (A's original from disk, never a kept copy); α = 0 gives
    A exactly, α = 1 gives B (for an adapter: A merged with it, as `surgery merge`).
    """
    return _plan_adapter(a, b) if isinstance(b, LoraAdapter) else _plan_checkpoints(a, b)


def landscape(
    a: str | Path,
    b: str | Path,
    *,
    harmful: str | Path | Sequence[dict],
    task: str | Path | Sequence[dict] | None = None,
    benign: str | Path | Sequence[dict] | None = None,
    alphas: Sequence[float] | None = None,
    steps: int = 5,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    limit: int | None = None,
    device: str | None = None,
    progress: bool = True,
    judge: Judge | None = None,
) -> LandscapeReport:
    """Score the models on the straight path from A to B at each α (default: `steps` points in [0, 1]).
    `judge` is the eval judge (default: the keyword judge).

    `b` is a checkpoint with A's tensors or a peft LoRA adapter over A. Raises
    `MismatchError` when B does not fit A, and the eval loop's errors for bad data files.
    """
    from surgery.analysis.diff import is_adapter
    from surgery.eval.data import load_jsonl
    from surgery.eval.evaluate import evaluate_loaded, load_for_eval

    started = time.perf_counter()
    grid = list(alphas) if alphas is not None else alpha_grid(steps)
    if not grid:
        raise SurgeryError("no α values to evaluate")
    ckpt_a = Checkpoint.open(a)
    adapter_mode = is_adapter(b)
    plan = path_setters(ckpt_a, LoraAdapter.open(b) if adapter_mode else Checkpoint.open(b))

    def rows(src: Any, fields: tuple[str, ...]) -> list[dict] | None:
        if src is None:
            return None
        return load_jsonl(src, fields, limit=limit) if isinstance(src, (str, Path)) else list(src)[:limit]

    data = {"harmful": rows(harmful, ("prompt",)), "task": rows(task, ("prompt", "answer")),
            "benign": rows(benign, ("prompt",))}
    model, tok = load_for_eval(a, device=device)
    params = model.state_dict()
    unknown = [n for n in plan if n not in params]
    if unknown:
        raise MismatchError(f"{a}: tensor {unknown[0]} is not a parameter of the loaded model "
                            f"({len(unknown)} such); the checkpoint's names do not match its architecture")
    report = LandscapeReport(a=str(a), b=str(b), mode="adapter" if adapter_mode else "checkpoints",
                             moving_tensors=len(plan),
                             settings={"max_new_tokens": max_new_tokens, "batch_size": batch_size, "limit": limit})
    steps_iter = track(grid, total=len(grid), description="landscape") if progress else iter(grid)
    for alpha in steps_iter:
        t0 = time.perf_counter()
        with torch.no_grad():
            for name, setter in plan.items():
                params[name].copy_(setter(float(alpha)))
        res = evaluate_loaded(model, tok, harmful=data["harmful"], task=data["task"], benign=data["benign"],
                              max_new_tokens=max_new_tokens, batch_size=batch_size, judge=judge)
        report.points.append(LandscapePoint(float(alpha), res.harmful_score, res.task_accuracy, res.over_refusal,
                                            time.perf_counter() - t0, res.harmful_scores.get("keyword"),
                                            res.other_share.get("harmful")))
    report.seconds = time.perf_counter() - started
    return report
