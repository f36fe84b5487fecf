"""Safe LoRA (Hsu et al., NeurIPS 2024): project a LoRA update onto the alignment subspace.

Per LoRA module, V = W_aligned - W_base (the "alignment matrix", [d_out, d_in]) is read
from the two checkpoints, one module at a time. The projector applied to lora_B is, as in
the reference code, P = V V^T / ||V||_F (Frobenius norm, not its square: P is not
idempotent, it rescales each direction u_i of V by sigma_i^2/||V||_F); `exact=True` uses
the true orthogonal projector onto V's column space instead. The similarity of a module
is the cosine between the flattened P B A and B A (the LoRA scaling cancels). Modules are
selected either by number (the K lowest cosines, default K=10, the reference's default
`select_layers_type="number"`, `num_proj_layers=10`) or by threshold (cosine <= tau,
default 0.5). Selected modules get lora_B <- P B; every other tensor is copied.

Low-rank arithmetic only (`surgery.kernels.safelora_project`): beyond V itself the
memory is O(d r). The output is a peft adapter with provenance and a report
(`surgery_report.json` beside the weights: per module its cosine, norm ratio and
whether it was projected, under `metrics`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.errors import MismatchError, SurgeryError
from surgery.io.adapter import LoraAdapter, rewrite_adapter
from surgery.io.atomic import check_output
from surgery.io.checkpoint import Checkpoint
from surgery.io.provenance import provenance
from surgery.kernels.safelora_project import safelora_project
from surgery.methods.config import ConfigError, MethodConfig, Runtime, option
from surgery.pipeline.rewrite import input_records
from surgery.progress import track
from surgery.report import REPORT_FILE, Report

__all__ = ["SafeLoraConfig", "ModuleResult", "run", "safelora", "select_modules", "projected_modules",
           "module_results", "DEFAULT_NUM_LAYERS", "DEFAULT_THRESHOLD"]

DEFAULT_NUM_LAYERS = 10
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True, kw_only=True)
class SafeLoraConfig(MethodConfig):
    """Safe LoRA's options: which modules to project (number or threshold) and which projector."""

    method = "safelora"
    num_layers: int | None = option(None, f"Project the K modules with the lowest cosine (default "
                                          f"{DEFAULT_NUM_LAYERS}).", low=0)
    threshold: float | None = option(None, "Instead project every module with cosine <= T (the reference's "
                                           f"default T is {DEFAULT_THRESHOLD:g}).")
    exact: bool = option(False, "Use the orthogonal projector onto V's column space instead of V V^T/||V||_F.")

    def validate(self) -> None:
        if self.num_layers is not None and self.threshold is not None:
            raise ConfigError("safelora: give either num_layers or threshold, not both")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"safelora: threshold must be a finite number, got {self.threshold}")

    @property
    def mode(self) -> str:
        """"threshold" when a threshold is given, else "number"."""
        return "threshold" if self.threshold is not None else "number"

    @property
    def k(self) -> int | None:
        """The number of modules to project in number mode (default 10), None in threshold mode."""
        if self.threshold is not None:
            return None
        return DEFAULT_NUM_LAYERS if self.num_layers is None else self.num_layers


@dataclass
class ModuleResult:
    """One LoRA module: its cosine(P·ΔW, ΔW) and whether lora_B was projected."""

    module: str
    weight: str
    cosine: float
    projected: bool = False
    norm_ratio: float = 1.0  # ||P·ΔW||_F / ||ΔW||_F: how much the (non-idempotent) P rescales the update


def module_results(report: Report) -> list[ModuleResult]:
    """The per-module results of a Safe LoRA report (`report.metrics["modules"]`)."""
    return [ModuleResult(**m) for m in report.metrics.get("modules", [])]


def projected_modules(report: Report) -> list[str]:
    """The modules whose lora_B a Safe LoRA report projected."""
    return [m.module for m in module_results(report) if m.projected]


def select_modules(cosines: list[float], num_layers: int | None = DEFAULT_NUM_LAYERS,
                   threshold: float | None = None) -> list[bool]:
    """Which modules to project.

    Threshold mode (`threshold` given): cosine <= threshold (the reference compares with
    `<=`). Number mode: the `num_layers` lowest cosines, ties broken by module order, so
    exactly min(K, n) modules (the reference projects every cosine <= the K-th smallest,
    which can exceed K on exact ties).
    """
    if threshold is not None:
        if num_layers is not None:
            raise ConfigError("safelora: give either num_layers or threshold, not both")
        return [c <= threshold for c in cosines]
    if num_layers is None or num_layers < 0:
        raise ConfigError(f"safelora: num_layers must be a non-negative integer, got {num_layers}")
    order = sorted(range(len(cosines)), key=lambda i: (cosines[i], i))
    chosen = set(order[:num_layers])
    return [i in chosen for i in range(len(cosines))]


def _norm_ratio(B_new: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """||B_new A||_F / ||B A||_F from r x r Gram matrices (never forms a d_out x d_in product)."""
    G = (A @ A.T).double()
    new = float(torch.sum((B_new.T @ B_new).double() * G))
    old = float(torch.sum((B.T @ B).double() * G))
    return math.sqrt(max(new, 0.0) / old) if old > 0 else 0.0


def _alignment_matrix(base: Checkpoint, aligned: Checkpoint, key: str, fan_in_fan_out: bool) -> torch.Tensor:
    """V = W_aligned - W_base in fp32, as [d_out, d_in] (transposed for Conv1D layouts)."""
    if key not in base:
        raise MismatchError(f"{key} is in the aligned checkpoint but not in the base; pass the matching base")
    a_info, b_info = aligned.info(key), base.info(key)
    if tuple(a_info.shape) != tuple(b_info.shape):
        raise MismatchError(
            f"{key}: aligned shape {list(a_info.shape)} differs from base {list(b_info.shape)}; "
            "base and aligned must be the same architecture"
        )
    v = aligned.get(key).to(torch.float32, copy=True)
    v.sub_(base.get(key).to(torch.float32))
    return v.T if fan_in_fan_out else v


def run(config: SafeLoraConfig, inputs: Mapping[str, Any], out: str | Path,
        runtime: Runtime = Runtime()) -> Report:
    """Apply Safe LoRA to `inputs["adapter"]` (with `base` and `aligned`) and write the projected adapter to `out`.

    Raises `MismatchError` when the adapter does not fit the checkpoints; nothing is
    written on any error. The report's `metrics` carry the selection rule and every
    module's cosine and norm ratio.
    """
    started = time.perf_counter()
    adapter, base, aligned = inputs["adapter"], inputs["base"], inputs["aligned"]
    out = Path(out)
    paths = {"ADAPTER": adapter, "--base": base, "--aligned": aligned}
    check_output(out, runtime.force, paths)
    lora = LoraAdapter.open(adapter, allow_pickle=runtime.allow_pickle)
    base_ckpt = Checkpoint.open(base, allow_pickle=runtime.allow_pickle)
    aligned_ckpt = Checkpoint.open(aligned, allow_pickle=runtime.allow_pickle)
    bound, _ = lora.match(aligned_ckpt)
    for m in bound.values():
        if m.kind != "linear":
            raise SurgeryError(f"{m.module_path} is an embedding LoRA; Safe LoRA projects linear modules only")
        if m.is_dora:
            raise SurgeryError(f"{m.module_path} is a DoRA module; Safe LoRA is defined for plain LoRA only")

    results: list[ModuleResult] = []
    new_b: dict[str, torch.Tensor] = {}
    for key, m in track(sorted(bound.items(), key=lambda kv: kv[1].module_path), description="safelora"):
        V = _alignment_matrix(base_ckpt, aligned_ckpt, key, m.fan_in_fan_out)
        B_stored = lora.get(m.b_key)
        B, A = lora.lora_B(m), lora.lora_A(m)
        b_new, cos = safelora_project(V, B, A, exact=config.exact)
        del V
        new_b[m.b_key] = b_new.to(B_stored.dtype)
        results.append(ModuleResult(module=m.module_path, weight=key, cosine=cos,
                                    norm_ratio=_norm_ratio(b_new.float(), B, A)))

    chosen = select_modules([r.cosine for r in results], config.k, config.threshold)
    for r, c in zip(results, chosen):
        r.projected = bool(c)
    replace = {lora.modules[r.module].b_key for r in results if r.projected}
    projected = sorted(r.module for r in results if r.projected)

    records = {"adapter": lora, "base": base_ckpt, "aligned": aligned_ckpt}
    report = Report("safelora", {**config.to_dict(), "mode": config.mode, "num_layers": config.k},
                    inputs=input_records(records), out=str(out))
    report.inputs["adapter"]["path"] = str(adapter)  # an adapter is named by its directory
    report.metrics.update({"mode": config.mode, "n_modules": len(results), "n_projected": len(projected),
                           "projected": projected, "modules": [asdict(r) for r in results]})
    meta = provenance("safelora", {**report.config, "projected": projected}, records)
    # the written report carries no wall time, so equal inputs give equal bytes
    rewrite_adapter(lora, out, {n: new_b[n] for n in replace}, meta, runtime.force,
                    extra_files={REPORT_FILE: report.to_json()}, inputs=paths)
    report.seconds = {"total": time.perf_counter() - started}
    return report


def safelora(adapter: str | Path, base: str | Path, aligned: str | Path, out: str | Path, *,
             runtime: Runtime = Runtime(), **options: Any) -> Report:
    """`run` with the config's fields as keyword arguments: `safelora(A, base, aligned, out, num_layers=3)`."""
    return run(SafeLoraConfig(**options), {"adapter": adapter, "base": base, "aligned": aligned}, out, runtime)
