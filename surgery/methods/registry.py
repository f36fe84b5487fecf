"""Every method the toolkit offers: its kind, the inputs it needs, its config and its runner.

One `MethodSpec` per method. The entries are data with import paths, so listing them
(`surgery methods`, `--help`, the repair search choosing what applies) imports neither
torch nor the method; `spec.config_class()` and `spec.runner()` import on demand.
Adding a method is its module plus one entry here; a test checks that every entry has a
CLI command, a docs page and a demo row.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from surgery.errors import SurgeryError

if TYPE_CHECKING:
    from surgery.methods.config import MethodConfig

__all__ = ["ROLES", "KINDS", "MethodSpec", "REGISTRY", "get", "methods"]

Kind = Literal["repair", "attack", "analysis", "defense", "utility"]
KINDS: tuple[str, ...] = ("repair", "attack", "defense", "analysis", "utility")

# The input roles a method can ask for, with what a user gives for each.
ROLES: dict[str, str] = {
    "model": "the model to work on (a safetensors checkpoint directory or file)",
    "adapter": "a peft LoRA adapter directory trained on MODEL",
    "aligned": "the aligned model MODEL was fine-tuned from",
    "base": "the unaligned base model the aligned model came from",
    "calib": "calibration pairs, JSONL {prompt, response}",
    "harmful": "harmful prompts (JSONL {prompt}, responses optional)",
    "harmless": "harmless prompts, JSONL {prompt}",
    "safety": "safety pairs: harmful prompt + refusal, JSONL {prompt, response}",
    "utility": "utility pairs, JSONL {prompt, response}",
    "task": "task data, JSONL {prompt, answer} (or {prompt, response} for training)",
    "benign": "benign look-alike prompts for over-refusal, JSONL {prompt}",
    "mask": "a neuron mask written by `surgery neurons find`",
    "module": "a SaLoRA module written by `surgery salora fit`",
    "other": "a second model to compare with",
    "direction": "a refusal direction written by `surgery edit direction`",
    "corpus": "a text corpus, JSONL {text} or {prompt, response}",
}


@dataclass(frozen=True)
class MethodSpec:
    """One registered method."""

    name: str  # registry key, e.g. "antidote"
    kind: Kind
    summary: str  # one line
    command: str  # the CLI command, e.g. "surgery antidote"
    needs: tuple[str, ...]  # input roles that must be given
    optional: tuple[str, ...] = ()  # input roles it can use
    writes: str = "model"  # model | adapter | mask | module | direction | plot | report
    adapters: tuple[str, ...] = ()  # adapter kinds accepted ("lora", "dora"); () = takes no adapter
    config: str | None = None  # "module:Class" of its MethodConfig
    run: str | None = None  # "module:function" (config, inputs, out, ...) -> Report
    docs: str = ""  # docs page, relative to the repository root
    demo: str | None = None  # demo row group that shows it on the testbed; None for utilities
    reference: str = ""  # the paper or project it follows

    def config_class(self) -> type[MethodConfig]:
        """The method's config dataclass (imports its module)."""
        if self.config is None:
            raise SurgeryError(f"{self.name} has no typed config")
        return _resolve(self.config)

    def runner(self) -> Callable[..., Any]:
        """The method's `run` function (imports its module)."""
        if self.run is None:
            raise SurgeryError(f"{self.name} has no runner")
        return _resolve(self.run)

    def missing_inputs(self, given: set[str]) -> list[str]:
        """The needed roles absent from `given`."""
        return [role for role in self.needs if role not in given]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "summary": self.summary, "command": self.command,
                "needs": list(self.needs), "optional": list(self.optional), "writes": self.writes,
                "adapters": list(self.adapters), "docs": self.docs, "demo": self.demo,
                "reference": self.reference}


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


_M = "surgery.methods."

REGISTRY: dict[str, MethodSpec] = {s.name: s for s in [
    MethodSpec("merge", "utility", "merge a LoRA adapter into its base, one tensor at a time",
               "surgery merge", needs=("model", "adapter"), adapters=("lora", "dora"),
               docs="docs/methods/merge.md", reference="peft merge_and_unload"),
    MethodSpec("wanda", "utility", "prune the lowest |W|·||X|| weights of every row",
               "surgery wanda", needs=("model", "calib"),
               config=_M + "wanda:WandaConfig", run=_M + "wanda:run",
               docs="docs/methods/wanda.md", demo="antidote", reference="Sun et al. 2023 (Wanda)"),
    MethodSpec("antidote", "repair", "prune the weights harmful data relies on most",
               "surgery antidote", needs=("model", "calib"), optional=("adapter", "aligned"), adapters=("lora",),
               docs="docs/methods/antidote.md", demo="antidote", reference="Huang et al. 2024 (Antidote)"),
    MethodSpec("safelora", "repair", "project LoRA updates onto the alignment subspace where they leave it",
               "surgery safelora", needs=("adapter", "base", "aligned"), adapters=("lora",), writes="adapter",
               config="surgery.methods.safelora:SafeLoraConfig", run="surgery.methods.safelora:run",
               docs="docs/methods/safelora.md", demo="subspace", reference="Hsu et al. 2024 (Safe LoRA)"),
    MethodSpec("salora-fit", "defense", "fit SaLoRA's fixed safety module from the aligned model",
               "surgery salora fit", needs=("model", "safety"), optional=("task",), writes="module",
               config=_M + "salora:SaloraFitConfig", run=_M + "salora:run_fit",
               docs="docs/methods/salora.md", demo="subspace", reference="Li et al. 2025 (SaLoRA)"),
    MethodSpec("salora-apply", "defense", "fold a SaLoRA safety module into a LoRA adapter",
               "surgery salora apply", needs=("adapter", "module"), adapters=("lora",), writes="adapter",
               config=_M + "salora:SaloraApplyConfig", run=_M + "salora:run_apply",
               docs="docs/methods/salora.md", demo="subspace", reference="Li et al. 2025 (SaLoRA)"),
    MethodSpec("neurons-find", "analysis", "find safety-critical neurons (safety minus utility importance)",
               "surgery neurons find", needs=("model", "safety", "utility"), writes="mask",
               config=_M + "neurons:NeuronsFindConfig", run=_M + "neurons:run_find",
               docs="docs/methods/neurons.md", demo="antidote", reference="Wei et al. 2024"),
    MethodSpec("neurons-apply", "repair", "zero or restore the masked neurons",
               "surgery neurons apply", needs=("model", "mask"), optional=("aligned",),
               config=_M + "neurons:NeuronsApplyConfig", run=_M + "neurons:run_apply",
               docs="docs/methods/neurons.md", demo="antidote", reference="Wei et al. 2024"),
    MethodSpec("finetune", "attack", "harmful (or poisoned) fine-tuning with a LoRA",
               "surgery attack finetune", needs=("model", "task"), optional=("harmful",), writes="adapter",
               docs="docs/methods/finetune.md", demo="attacks", reference="Qi et al. 2023"),
    MethodSpec("rome", "attack", "a rank-one edit of one MLP (ROME)",
               "surgery edit rome", needs=("model",), optional=("corpus",),
               config=_M + "rome:RomeConfig", run=_M + "rome:run",
               docs="docs/methods/rome.md", demo="attacks", reference="Meng et al. 2022 (ROME)"),
    MethodSpec("direction", "attack", "ablate (or add) the refusal direction in the weights",
               "surgery edit direction", needs=("model",), optional=("harmful", "harmless", "direction"),
               config=_M + "direction:DirectionConfig", run=_M + "direction:run",
               docs="docs/methods/direction.md", demo="attacks", reference="Arditi et al. 2024"),
    MethodSpec("diff", "analysis", "where two models differ: per tensor and per subspace",
               "surgery diff", needs=("model", "other"), optional=("base", "adapter"), writes="report",
               docs="docs/methods/diff.md", demo="subspace"),
    MethodSpec("landscape", "analysis", "harmful score along the line between two models",
               "surgery landscape", needs=("model", "other", "harmful"), optional=("task",), writes="plot",
               docs="docs/methods/landscape.md", demo="landscape", reference="Peng et al. 2024"),
]}


def get(name: str) -> MethodSpec:
    """The spec of `name`; an unknown name is a one-line error listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise SurgeryError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def methods(kind: str | None = None) -> list[MethodSpec]:
    """Every registered method (of one kind), in registry order."""
    return [s for s in REGISTRY.values() if kind is None or s.kind == kind]
