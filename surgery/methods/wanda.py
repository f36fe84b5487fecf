"""Wanda pruning (Sun et al. 2023) and the streamed layer-surgery driver it shares with Antidote.

Wanda scores each weight of a decoder-layer Linear by S_ij = |W_ij| · ||X_j||_2 (X_j:
input channel j over the calibration tokens) and zeroes the `int(d_in · sparsity)`
lowest scores of every output row (ties in `torch.sort(stable=True)` order). As in the
reference, statistics of all Linears of a layer come from the dense layer, the layer is
then pruned and re-run, and the next layer is calibrated on the pruned outputs.

`layer_surgery` is that flow as a reusable driver: `surgery.calib.layerwise` runs one
decoder layer at a time from the checkpoint; an `edit` function changes each target
weight in fp32 in place; edited weights are cast back to the checkpoint's dtype (exact:
an edit only zeroes entries or writes values read from a checkpoint of that dtype) and
streamed into a `CheckpointWriter` as soon as their layer is done; every other tensor is
written exactly as read, with no fp32 round trip. Memory is about one decoder layer plus
the activation cache. On CPU the masks come from the sort-free `surgery.kernels` path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.calib.data import Sample, calibration_samples
from surgery.calib.layerwise import LayerContext, calibrate_layerwise
from surgery.calib.stats import LinearStats
from surgery.errors import SurgeryError
from surgery.io.atomic import check_output
from surgery.io.checkpoint import Checkpoint
from surgery.io.provenance import provenance
from surgery.io.writer import DEFAULT_SHARD_SIZE, CheckpointWriter, TensorSpec
from surgery.kernels import wanda_prune_count_
from surgery.model.load import default_device
from surgery.progress import track

__all__ = ["TensorChange", "SurgeryReport", "layer_surgery", "wanda", "wanda_edit"]

DEFAULT_NUM_SAMPLES = 128  # Wanda's nsamples
DEFAULT_MAX_LENGTH = 2048


@dataclass
class TensorChange:
    """How one tensor was changed: entries selected by the rule, and entries whose value changed."""

    name: str
    shape: list[int]
    selected: int
    changed: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class SurgeryReport:
    """What a streamed surgery did, per tensor, with the time split and where it wrote."""

    method: str
    params: dict[str, Any]
    tensors: list[TensorChange] = field(default_factory=list)
    out: str | None = None
    dry_run: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0

    @property
    def selected(self) -> int:
        return sum(t.selected for t in self.tensors)

    @property
    def changed(self) -> int:
        return sum(t.changed for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the report file written beside the weights)."""
        numel = sum(t.numel for t in self.tensors)
        return {
            "method": self.method,
            "params": self.params,
            "out": self.out,
            "dry_run": self.dry_run,
            "samples": self.samples,
            "tokens": self.tokens,
            "totals": {"tensors": len(self.tensors), "entries": numel, "selected": self.selected,
                       "changed": self.changed},
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "tensors": [asdict(t) for t in self.tensors],
        }


Edit = Callable[[str, torch.Tensor, LinearStats], TensorChange]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def layer_surgery(
    model: str | Path,
    samples: Sequence[Sample],
    edit: Edit,
    out: str | Path | None,
    *,
    method: str,
    params: dict[str, Any],
    inputs: dict[str, Any] | None = None,
    targets: Sequence[str] | None = None,
    token_mask: str = "all",
    batch_size: int = 1,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    dry_run: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    report_name: str | None = None,
) -> SurgeryReport:
    """Calibrate `model` layer by layer, `edit` each target Linear weight, stream the result to `out`.

    `edit(name, W, stats)` gets the weight's checkpoint name, the weight in fp32 on the
    device (modify it in place) and its input statistics, and returns a `TensorChange`.
    With `dry_run` nothing is written. The report is written as `report_name` inside `out`.
    """
    ckpt = Checkpoint.open(model)
    if not dry_run:
        if out is None:
            raise SurgeryError("give an output path (-o) or ask for a dry run")
        check_output(out, force, {"MODEL": model, **(inputs or {})})
    dev = default_device(device)
    report = SurgeryReport(method, dict(params), out=None if dry_run else str(out), dry_run=dry_run,
                           samples=len(samples))
    report.tokens = sum(len(s) for s in samples) if token_mask == "all" else sum(s.num_response_tokens for s in samples)
    timings: dict[str, float] = {}
    edit_seconds = {"edit": 0.0, "write": 0.0, "edit_cpu": 0.0, "write_cpu": 0.0}
    written: set[str] = set()
    writer: CheckpointWriter | None = None
    if not dry_run and out is not None:  # out is None only for a dry run (checked above)
        specs = [TensorSpec.like(name, ckpt.info(name)) for name in ckpt.names()]
        meta = provenance(method, params, {"model": ckpt, **(inputs or {})})
        writer = CheckpointWriter(out, specs, shard_size=shard_size, metadata=meta, force=force,
                                  copy_files_from=ckpt.companion_files(), inputs={"MODEL": model, **(inputs or {})})

    def on_layer(ctx: LayerContext) -> None:
        for path, st in sorted(ctx.stats.items()):
            if path.endswith((".lora_A", ".lora_B")):
                continue
            name = path + ".weight"
            W = ctx.linear(path).weight.data
            _sync()
            t0, c0 = time.perf_counter(), time.process_time()
            change = edit(name, W, st)
            _sync()
            t1, c1 = time.perf_counter(), time.process_time()
            report.tensors.append(change)
            if writer is not None:
                writer.write_cast(name, W)  # cast back to the stored dtype a block at a time
                written.add(name)
            edit_seconds["edit"] += t1 - t0
            edit_seconds["write"] += time.perf_counter() - t1
            edit_seconds["edit_cpu"] += c1 - c0
            edit_seconds["write_cpu"] += time.process_time() - c1

    start = time.perf_counter()
    if writer is not None:
        writer.__enter__()
    try:
        calibrate_layerwise(ckpt, samples, targets, token_mask=token_mask, batch_size=batch_size, device=dev,
                            dtype=dtype, on_layer=on_layer, keep_stats=False, timings=timings,
                            description=method)
        if not report.tensors:
            raise SurgeryError(f"no Linear weight of a decoder layer matches the targets {list(targets or [])}; "
                               "check --targets")
        t0, c0 = time.perf_counter(), time.process_time()
        if writer is not None:
            rest = [n for n in ckpt.names() if n not in written]
            for name in track(rest, total=len(rest), description="copying"):
                where = ckpt.raw_location(name)
                if where is not None:  # untouched: file to file, never through Python
                    writer.copy_raw(name, *where)
                else:
                    writer.write(name, ckpt.get(name))
            if report_name:
                report.seconds = _split(timings, edit_seconds, time.perf_counter() - t0,
                                        time.process_time() - c0, start)
                writer.extra_files[report_name] = json.dumps(report.to_dict(), indent=2) + "\n"
    except BaseException as exc:
        if writer is not None:
            writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if writer is not None:
        writer.__exit__(None, None, None)
    report.seconds = _split(timings, edit_seconds, time.perf_counter() - t0, time.process_time() - c0, start)
    return report


def _split(timings: dict[str, float], edit: dict[str, float], copy: float, copy_cpu: float,
           start: float) -> dict[str, float]:
    """Wall seconds per phase, and process CPU seconds (`*_cpu`), which a shared machine distorts less."""
    return {
        "setup": timings.get("setup", 0.0),
        "calibration": timings.get("forward", 0.0),
        "edit": edit["edit"],
        "io": timings.get("read", 0.0) + edit["write"] + copy,
        "total": time.perf_counter() - start,
        "setup_cpu": timings.get("setup_cpu", 0.0),
        "calibration_cpu": timings.get("forward_cpu", 0.0),
        "edit_cpu": edit["edit_cpu"],
        "io_cpu": timings.get("read_cpu", 0.0) + edit["write_cpu"] + copy_cpu,
    }


def wanda_edit(sparsity: float, scope: str = "row") -> Edit:
    """Wanda's rule: zero the `int(n · sparsity)` lowest |W|·||X|| per row (or per tensor)."""

    def edit(name: str, W: torch.Tensor, st: LinearStats) -> TensorChange:
        assert st.sq_norms is not None  # calibration collects sq_norms by default
        s = st.sq_norms.to(W.device)
        changed = wanda_prune_count_(W, s, sparsity, largest=False, scope=scope)
        n = W.shape[1] if scope == "row" else W.numel()
        rows = W.shape[0] if scope == "row" else 1
        return TensorChange(name, list(W.shape), rows * int(n * sparsity), changed)

    return edit


def _check_ratio(value: float, what: str) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise SurgeryError(f"{what} must lie in [0, 1), got {value}")
    return value


def wanda(
    model: str | Path,
    calib: str | Path,
    sparsity: float,
    out: str | Path | None,
    *,
    targets: Sequence[str] | None = None,
    scope: str = "row",
    num_samples: int | None = DEFAULT_NUM_SAMPLES,
    max_length: int = DEFAULT_MAX_LENGTH,
    tokens: str = "all",
    chat_template: bool = True,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    force: bool = False,
    dry_run: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    samples: Sequence[Sample] | None = None,
) -> SurgeryReport:
    """Prune `model` with Wanda at `sparsity` (per output row), calibrated on the pairs in `calib`.

    Layers are pruned in order and later layers calibrated on the pruned outputs, as the
    reference does. Writes a checkpoint of the same names, dtypes and shapes to `out`.
    """
    sparsity = _check_ratio(sparsity, "--sparsity")
    if scope not in ("row", "tensor"):
        raise SurgeryError(f"--scope must be row or tensor, got {scope!r}")
    if not dry_run and out is not None:
        check_output(out, force, {"MODEL": model, "--calib": calib})
    if samples is None:
        samples = calibration_samples(model, calib, num_samples=num_samples, max_length=max_length,
                                      chat_template=chat_template)
    params = {"sparsity": sparsity, "scope": scope, "targets": list(targets) if targets else "decoder linears",
              "num_samples": len(samples), "max_length": max_length, "tokens": tokens,
              "chat_template": chat_template}
    return layer_surgery(model, samples, wanda_edit(sparsity, scope), out, method="wanda", params=params,
                         inputs={"calib": Path(calib)} if calib is not None else None, targets=targets,
                         token_mask=tokens, batch_size=batch_size, device=device, force=force, dry_run=dry_run,
                         shard_size=shard_size, report_name="wanda_report.json")
