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
(`safelora_report.json` beside the weights).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.errors import MismatchError, SurgeryError
from surgery.io.adapter import LoraAdapter, rewrite_adapter
from surgery.io.atomic import check_output
from surgery.io.checkpoint import Checkpoint
from surgery.io.provenance import provenance
from surgery.kernels.safelora_project import safelora_project
from surgery.progress import track

DEFAULT_NUM_LAYERS = 10
DEFAULT_THRESHOLD = 0.5
REPORT_NAME = "safelora_report.json"


@dataclass
class ModuleResult:
    """One LoRA module: its cosine(P·ΔW, ΔW) and whether lora_B was projected."""

    module: str
    weight: str
    cosine: float
    projected: bool = False
    norm_ratio: float = 1.0  # ||P·ΔW||_F / ||ΔW||_F: how much the (non-idempotent) P rescales the update


@dataclass
class SafeLoraReport:
    """What `safelora` did: the selection rule and every module's cosine."""

    out: str
    mode: str  # "number" | "threshold"
    num_layers: int | None
    threshold: float | None
    exact: bool
    modules: list[ModuleResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def projected(self) -> list[str]:
        return [m.module for m in self.modules if m.projected]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_modules"] = len(self.modules)
        d["n_projected"] = len(self.projected)
        return d


def _report_json(d: dict[str, Any]) -> str:
    """The report as written beside the weights: without wall time or output path, so equal inputs give equal bytes."""
    return json.dumps({k: v for k, v in d.items() if k not in ("seconds", "out")}, indent=2, sort_keys=True) + "\n"


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
            raise SurgeryError("give either --num-layers or --threshold, not both")
        return [c <= threshold for c in cosines]
    if num_layers is None or num_layers < 0:
        raise SurgeryError(f"--num-layers must be a non-negative integer, got {num_layers}")
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
        raise MismatchError(f"{key} is in the aligned checkpoint but not in the base; pass the matching --base")
    a_info, b_info = aligned.info(key), base.info(key)
    if tuple(a_info.shape) != tuple(b_info.shape):
        raise MismatchError(
            f"{key}: aligned shape {list(a_info.shape)} differs from base {list(b_info.shape)}; "
            "base and aligned must be the same architecture"
        )
    v = aligned.get(key).to(torch.float32, copy=True)
    v.sub_(base.get(key).to(torch.float32))
    return v.T if fan_in_fan_out else v


def safelora(
    adapter: str | Path,
    base: str | Path,
    aligned: str | Path,
    out: str | Path,
    *,
    num_layers: int | None = None,
    threshold: float | None = None,
    exact: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
) -> SafeLoraReport:
    """Apply Safe LoRA to `adapter` and write the projected adapter to `out` atomically.

    `num_layers` (default 10 when neither is given) or `threshold` picks the projected
    modules; `exact` swaps the reference's V V^T/||V||_F for the orthogonal projector.
    Raises `MismatchError` when the adapter does not fit the checkpoints; nothing is
    written on any error.
    """
    started = time.perf_counter()
    out = Path(out)
    inputs = {"ADAPTER": adapter, "--base": base, "--aligned": aligned}
    check_output(out, force, inputs)
    if threshold is None and num_layers is None:
        num_layers = DEFAULT_NUM_LAYERS
    if threshold is not None and num_layers is not None:
        raise SurgeryError("give either --num-layers or --threshold, not both")
    if threshold is not None and not math.isfinite(threshold):
        raise SurgeryError(f"--threshold must be a finite number, got {threshold}")
    if num_layers is not None and num_layers < 0:
        raise SurgeryError(f"--num-layers must be >= 0, got {num_layers}")
    lora = LoraAdapter.open(adapter, allow_pickle=allow_pickle)
    base_ckpt = Checkpoint.open(base, allow_pickle=allow_pickle)
    aligned_ckpt = Checkpoint.open(aligned, allow_pickle=allow_pickle)
    bound, _ = lora.match(aligned_ckpt)
    for key, m in bound.items():
        if m.kind != "linear":
            raise SurgeryError(f"{m.module_path} is an embedding LoRA; Safe LoRA projects linear modules only")
        if m.is_dora:
            raise SurgeryError(f"{m.module_path} is a DoRA module; Safe LoRA is defined for plain LoRA only")
        _ = key

    results: list[ModuleResult] = []
    new_b: dict[str, torch.Tensor] = {}
    for key, m in track(sorted(bound.items(), key=lambda kv: kv[1].module_path), description="safelora"):
        V = _alignment_matrix(base_ckpt, aligned_ckpt, key, m.fan_in_fan_out)
        B_stored = lora.get(m.b_key)
        B, A = lora.lora_B(m), lora.lora_A(m)
        b_new, cos = safelora_project(V, B, A, exact=exact)
        del V
        new_b[m.b_key] = b_new.to(B_stored.dtype)
        results.append(ModuleResult(module=m.module_path, weight=key, cosine=cos,
                                    norm_ratio=_norm_ratio(b_new.float(), B, A)))

    chosen = select_modules([r.cosine for r in results], num_layers, threshold)
    for r, c in zip(results, chosen):
        r.projected = bool(c)
    replace = {lora.modules[r.module].b_key for r in results if r.projected}

    report = SafeLoraReport(out=str(out), mode="threshold" if threshold is not None else "number",
                            num_layers=num_layers, threshold=threshold, exact=exact, modules=results)
    params = {"mode": report.mode, "num_layers": num_layers, "threshold": threshold, "exact": exact,
              "projected": sorted(r.module for r in results if r.projected)}
    meta = provenance("safelora", params, {"adapter": lora, "base": base_ckpt, "aligned": aligned_ckpt})
    rewrite_adapter(lora, out, {n: new_b[n] for n in replace}, meta, force,
                    extra_files={REPORT_NAME: _report_json(report.to_dict())}, inputs=inputs)
    report.seconds = time.perf_counter() - started
    return report
