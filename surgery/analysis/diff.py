"""Streaming diff of two checkpoints (or a checkpoint and a LoRA adapter over it).

`diff_checkpoints(a, b, base=None)` walks A's tensors in storage order, reads the
matching tensor of B (or the adapter's factors) and of BASE, hands them to the pure
metrics of `surgery.analysis.metrics`, and drops them before the next tensor: peak
memory is about two tensors (three with a base). An adapter's ΔW is kept in factored
form throughout. Missing keys, shape mismatches and adapter modules that do not fit
are reported per tensor, never raised. The report aggregates by layer and by module
type (`surgery.analysis.names`) and feeds the heatmap and the CLI table.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.analysis.metrics import DeltaMetrics, LowRank, delta_metrics, unchanged_metrics
from surgery.analysis.names import parse_name
from surgery.errors import MismatchError, SurgeryError
from surgery.io.adapter import CONFIG_NAME, LoraAdapter, LoraModule
from surgery.io.checkpoint import Checkpoint
from surgery.progress import track

# statuses of a tensor in the report
CHANGED, UNCHANGED = "changed", "unchanged"
MISSING_IN_A, MISSING_IN_B, SHAPE_MISMATCH = "missing_in_a", "missing_in_b", "shape_mismatch"
ADAPTER_MISMATCH = "adapter_mismatch"
GRID_METRICS = ("rel_change", "cosine_v", "energy_in_v")


@dataclass
class TensorDiff:
    """One tensor's row: where it sits, what happened to it, and its metrics (None if not comparable)."""

    name: str
    status: str
    shape: list[int] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    stack: str | None = None
    layer: int | None = None
    module_type: str = ""
    source: str = "dense"  # "dense" | "lora" (factored ΔW) | "lora-dense" (DoRA, bias, saved tensor)
    note: str = ""
    metrics: DeltaMetrics | None = None

    @property
    def rel_change(self) -> float:
        return self.metrics.rel_change if self.metrics is not None else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict: the fields plus every metric (None when not measured)."""
        out = {k: v for k, v in asdict(self).items() if k != "metrics"}
        metrics = asdict(self.metrics) if self.metrics is not None else dict.fromkeys(DeltaMetrics.__dataclass_fields__)
        out.update(metrics)
        return out


@dataclass
class Aggregate:
    """Totals over a group of tensors (a layer or a module type).

    rel_change = sqrt(Σ‖ΔW‖² / Σ‖W‖²); cosine_v = Σ⟨V, ΔW⟩ / sqrt(Σ‖V‖² Σ‖ΔW‖²);
    energy_in_v is the ‖ΔW‖²-weighted mean of the tensors' shares.
    """

    key: str
    tensors: int = 0
    changed: int = 0
    norm_w: float = 0.0
    norm_delta: float = 0.0
    rel_change: float = 0.0
    cosine_v: float | None = None
    energy_in_v: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _aggregate(key: str, rows: list[TensorDiff]) -> Aggregate:
    w2 = d2 = v2 = vd = vd2 = energy = energy_w = 0.0
    changed = 0
    for row in rows:
        m = row.metrics
        if m is None:
            continue
        w2 += m.norm_w**2
        d2 += m.norm_delta**2
        changed += row.status == CHANGED
        if m.norm_v is not None and m.cosine_v is not None:
            v2 += m.norm_v**2
            vd += m.cosine_v * m.norm_v * m.norm_delta
            vd2 += m.norm_delta**2
        if m.energy_in_v is not None:
            energy += m.energy_in_v * m.norm_delta**2
            energy_w += m.norm_delta**2
    rel = math.sqrt(d2 / w2) if w2 > 0 else (0.0 if d2 == 0 else math.inf)
    return Aggregate(
        key=key, tensors=len(rows), changed=changed, norm_w=math.sqrt(w2), norm_delta=math.sqrt(d2),
        rel_change=rel,
        cosine_v=vd / math.sqrt(v2 * vd2) if v2 > 0 and vd2 > 0 else None,
        energy_in_v=energy / energy_w if energy_w > 0 else None,
    )


@dataclass
class DiffReport:
    """The result of `diff_checkpoints`: per-tensor rows plus aggregates, JSON-ready via `to_dict`."""

    a: str
    b: str
    base: str | None
    mode: str  # "checkpoints" | "adapter"
    rank: int
    top: int
    tensors: list[TensorDiff] = field(default_factory=list)
    seconds: float = 0.0

    # ---------------------------------------------------------------- views
    def by_status(self, status: str) -> list[TensorDiff]:
        return [t for t in self.tensors if t.status == status]

    @property
    def changed(self) -> list[str]:
        """Names of the tensors that moved."""
        return [t.name for t in self.tensors if t.status == CHANGED]

    def sorted_by_movement(self) -> list[TensorDiff]:
        """Comparable tensors, most moved first (by ‖ΔW‖/‖W‖); problems last."""
        ok = [t for t in self.tensors if t.metrics is not None]
        bad = [t for t in self.tensors if t.metrics is None]
        return sorted(ok, key=lambda t: (-t.rel_change, t.name)) + bad

    def _layer_label(self, t: TensorDiff) -> str | None:
        if t.layer is None:
            return None
        stacks = {x.stack for x in self.tensors if x.layer is not None}
        return str(t.layer) if len(stacks) <= 1 else f"{t.stack}.{t.layer}"

    def by_layer(self) -> list[Aggregate]:
        """One aggregate per layer (in layer order), then one for tensors outside the layers."""
        groups: dict[str, list[TensorDiff]] = {}
        order: dict[str, tuple] = {}
        for t in self.tensors:
            label = self._layer_label(t) or "other"
            groups.setdefault(label, []).append(t)
            order[label] = (t.layer is None, t.stack or "", t.layer if t.layer is not None else 0)
        return [_aggregate(k, groups[k]) for k in sorted(groups, key=lambda k: order[k])]

    def by_type(self) -> list[Aggregate]:
        """One aggregate per module type (layer tensors first, in first-seen order)."""
        groups: dict[str, list[TensorDiff]] = {}
        for t in sorted(self.tensors, key=lambda t: t.layer is None):
            groups.setdefault(t.module_type, []).append(t)
        return [_aggregate(k, v) for k, v in groups.items()]

    def grid(self, metric: str = "rel_change") -> tuple[list[str], list[str], list[list[float | None]]]:
        """(layer labels, module types, one aggregate per cell) over the tensors inside layers.

        `metric` is an `Aggregate` field: "rel_change" (default), "cosine_v" or "energy_in_v"
        (the last two need a BASE). Cells without comparable tensors are None.
        """
        if metric not in GRID_METRICS:
            raise ValueError(f"unknown grid metric {metric!r}; choose one of {', '.join(GRID_METRICS)}")
        inside = [t for t in self.tensors if t.layer is not None]
        layers: list[str] = []
        types: list[str] = []
        cells: dict[tuple[str, str], list[TensorDiff]] = {}
        for t in sorted(inside, key=lambda t: (t.stack or "", t.layer)):
            label = self._layer_label(t) or ""
            if label not in layers:
                layers.append(label)
        for t in inside:
            if t.module_type not in types:
                types.append(t.module_type)
            cells.setdefault((self._layer_label(t) or "", t.module_type), []).append(t)
        values: list[list[float | None]] = []
        for layer in layers:
            row: list[float | None] = []
            for typ in types:
                group = cells.get((layer, typ))
                agg = _aggregate("", group) if group else None
                ok = agg is not None and group is not None and any(g.metrics for g in group)
                row.append(getattr(agg, metric) if ok else None)
            values.append(row)
        return layers, types, values

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready: inputs, per-tensor rows (most moved first), aggregates, problems."""
        layers, types, values = self.grid()
        return _finite({
            "a": self.a, "b": self.b, "base": self.base, "mode": self.mode, "rank": self.rank, "top": self.top,
            "seconds": self.seconds,
            "counts": {s: len(self.by_status(s)) for s in (CHANGED, UNCHANGED, MISSING_IN_A, MISSING_IN_B,
                                                         SHAPE_MISMATCH, ADAPTER_MISMATCH)},
            "changed": self.changed,
            "tensors": [t.to_dict() for t in self.sorted_by_movement()],
            "by_layer": [a.to_dict() for a in self.by_layer()],
            "by_type": [a.to_dict() for a in self.by_type()],
            "grid": {"layers": layers, "types": types, "rel_change": values},
        })


def _finite(obj: Any) -> Any:
    """Non-finite floats (‖ΔW‖/‖W‖ of an all-zero W) become None, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------ the driver
def is_adapter(path: str | Path | LoraAdapter) -> bool:
    """True for a LoraAdapter or a directory holding adapter_config.json."""
    return isinstance(path, LoraAdapter) or (Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file())


def _dtype(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def _match_leniently(lora: LoraAdapter, ckpt: Checkpoint) -> tuple[dict[str, LoraModule], dict[str, str], list[tuple[str, str]]]:
    """Bind module by module so that one bad module is reported instead of failing the diff."""
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    singles: list[tuple[str, dict, dict]] = [(m.base_key, {p: m}, {}) for p, m in lora.modules.items()]
    singles += [(k, {}, {k: a}) for k, a in lora.replacements.items()]
    for key, mods, reps in singles:
        view = copy.copy(lora)
        view.modules, view.replacements = mods, reps
        try:
            bound, rep = view.match(ckpt)
        except MismatchError as exc:
            problems.append((key, str(exc).split(": ", 1)[-1].split("; use the base")[0]))
            continue
        for target, m in bound.items():
            if target in modules:
                problems.append((key, f"changes {target}, which another module also changes"))
                continue
            modules[target] = m
        replacements.update(rep)
    return modules, replacements, problems


def _row(name: str, status: str, **kw: Any) -> TensorDiff:
    place = parse_name(name)
    return TensorDiff(name=name, status=status, stack=place.stack, layer=place.layer, module_type=place.type, **kw)


def _base_tensor(base: Checkpoint | None, name: str, shape: tuple[int, ...], row: TensorDiff) -> torch.Tensor | None:
    if base is None:
        return None
    if name not in base:
        row.note = (row.note + "; " if row.note else "") + "not in BASE"
        return None
    if tuple(base.info(name).shape) != shape:
        row.note = (row.note + "; " if row.note else "") + f"BASE shape {list(base.info(name).shape)}"
        return None
    return base.get(name)


def diff_checkpoints(
    a: str | Path | Checkpoint,
    b: str | Path | Checkpoint | LoraAdapter,
    base: str | Path | Checkpoint | None = None,
    *,
    rank: int = 8,
    top: int = 8,
    exact: bool | None = None,
    seed: int = 0,
    atol: float = 0.0,
    allow_pickle: bool = False,
    progress_label: str = "diff",
) -> DiffReport:
    """Diff checkpoint A against B (a checkpoint, or a LoRA adapter over A), optionally against BASE.

    ΔW = B − A per tensor (the adapter's scale·B_lora·A_lora, kept factored); with a
    BASE, V = A − BASE is the alignment update the metrics compare ΔW with. `rank`:
    subspace dimension for principal angles and energy share; `top`: singular values
    reported; `exact`: force (True) or forbid (False) exact SVDs (default: exact up to
    min(m, n) = 1024, randomized beyond, seeded by `seed`); `atol`: |ΔW| above which an
    entry counts as changed. Raises `SurgeryError` for unreadable inputs only.
    """
    if rank < 1 or top < 0:
        raise SurgeryError(f"rank must be >= 1 and top >= 0 (got rank={rank}, top={top})")
    started = time.perf_counter()
    ckpt_a = a if isinstance(a, Checkpoint) else Checkpoint.open(a, allow_pickle=allow_pickle)
    ckpt_base = None
    if base is not None:
        ckpt_base = base if isinstance(base, Checkpoint) else Checkpoint.open(base, allow_pickle=allow_pickle)
    adapter_mode = is_adapter(b) if not isinstance(b, Checkpoint) else False
    report = DiffReport(
        a=str(ckpt_a.path), b=str(b.directory if isinstance(b, LoraAdapter) else getattr(b, "path", b)),
        base=None if ckpt_base is None else str(ckpt_base.path),
        mode="adapter" if adapter_mode else "checkpoints", rank=rank, top=top,
    )
    kw = dict(rank=rank, top=top, exact=exact, seed=seed, atol=atol)
    if adapter_mode:
        lora = b if isinstance(b, LoraAdapter) else LoraAdapter.open(b, allow_pickle=allow_pickle)  # type: ignore[arg-type]  # not a Checkpoint in adapter mode
        _diff_adapter(ckpt_a, lora, ckpt_base, report, kw, progress_label)
    else:
        ckpt_b = b if isinstance(b, Checkpoint) else Checkpoint.open(b, allow_pickle=allow_pickle)  # type: ignore[arg-type]  # an adapter is adapter mode
        _diff_dense(ckpt_a, ckpt_b, ckpt_base, report, kw, progress_label)
    report.seconds = time.perf_counter() - started
    return report


def _finish(row: TensorDiff, m: DeltaMetrics) -> TensorDiff:
    row.metrics = m
    row.status = CHANGED if m.norm_delta > 0 else UNCHANGED
    return row


def _diff_dense(a: Checkpoint, b: Checkpoint, base: Checkpoint | None, report: DiffReport,
                kw: dict[str, Any], label: str) -> None:
    for name in track(a.names(), total=len(a), description=label):
        info = a.info(name)
        shape = tuple(info.shape)
        if name not in b:
            report.tensors.append(_row(name, MISSING_IN_B, shape=list(shape), dtype_a=info.dtype,
                                       note="only in A"))
            continue
        info_b = b.info(name)
        row = _row(name, CHANGED, shape=list(shape), dtype_a=info.dtype, dtype_b=info_b.dtype)
        if tuple(info_b.shape) != shape:
            row.status = SHAPE_MISMATCH
            row.note = f"A {list(shape)} vs B {list(info_b.shape)}"
            report.tensors.append(row)
            continue
        ta = a.get(name)
        tb = b.get(name)
        if not (ta.is_floating_point() and tb.is_floating_point()):
            same = torch.equal(ta, tb)
            row.status = UNCHANGED if same else CHANGED
            row.note = "not floating point: compared for equality only"
            report.tensors.append(row)
            continue
        wa = ta.to(torch.float32)
        del ta
        delta = torch.sub(tb.to(torch.float32), wa)
        del tb
        # an unchanged tensor has nothing to compare with V: BASE is read only for tensors that moved
        v_src = _base_tensor(base, name, shape, row) if bool(delta.any()) else None
        v = None if v_src is None else torch.sub(wa, v_src.to(torch.float32))
        del v_src
        report.tensors.append(_finish(row, delta_metrics(wa, delta, v, **kw)))
        del wa, delta, v
    for name in b.names():
        if name not in a:
            info = b.info(name)
            report.tensors.append(_row(name, MISSING_IN_A, shape=list(info.shape), dtype_b=info.dtype,
                                       note="only in B"))


def _diff_adapter(a: Checkpoint, lora: LoraAdapter, base: Checkpoint | None, report: DiffReport,
                  kw: dict[str, Any], label: str) -> None:
    from surgery.io.merge import merged_weight

    try:
        modules, replacements = lora.match(a)
        problems: list[tuple[str, str]] = []
    except MismatchError:
        modules, replacements, problems = _match_leniently(lora, a)
    for key, message in problems:
        report.tensors.append(_row(key, ADAPTER_MISMATCH, note=message))
    bias_of = {m.base_bias_key: m for m in modules.values() if m.bias_key is not None}
    for name in track(a.names(), total=len(a), description=label):
        info = a.info(name)
        shape = tuple(info.shape)
        row = _row(name, UNCHANGED, shape=list(shape), dtype_a=info.dtype, dtype_b=info.dtype)
        m = modules.get(name)
        bias_module = bias_of.get(name)
        rkey = replacements.get(name)
        ta = a.get(name)
        if not ta.is_floating_point():
            row.note = "not floating point"
            report.tensors.append(row)
            continue
        wa = ta.to(torch.float32)
        del ta
        if m is None and bias_module is None and rkey is None:
            # untouched: ΔW = 0 exactly; read A only for the norms the aggregates need
            report.tensors.append(_finish(row, unchanged_metrics(wa)))
            continue
        delta: torch.Tensor | LowRank
        if m is not None and rkey is None and not m.is_dora:
            row.source = "lora"
            transpose = m.kind == "embedding" or m.fan_in_fan_out
            delta = LowRank.from_lora(lora.lora_B(m), lora.lora_A(m), m.scaling, transpose=transpose)
        else:
            row.source = "lora-dense"
            if m is not None:
                start = lora.get(rkey) if rkey is not None else wa
                merged = merged_weight(lora, m, start)
                row.note = "DoRA: dense ΔW" if m.is_dora else "saved base layer + LoRA: dense ΔW"
            elif bias_module is not None:
                merged = wa + lora.bias(bias_module)  # type: ignore[operator]
                row.note = "lora_B.bias"
            else:
                merged = lora.get(rkey).to(torch.float32, copy=True)  # type: ignore[arg-type]
                row.note = "full tensor saved in the adapter"
            delta = merged.sub_(wa)  # merged is always a fresh tensor, never a read-only mapping
            del merged
        v_src = _base_tensor(base, name, shape, row)
        v = None if v_src is None else torch.sub(wa, v_src.to(torch.float32))
        del v_src
        report.tensors.append(_finish(row, delta_metrics(wa, delta, v, **kw)))
        del wa, delta, v
