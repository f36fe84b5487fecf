"""Layer-by-layer surgery: calibrate one decoder layer at a time and edit its Linears.

`surgery.calib.layerwise` runs the model one decoder layer at a time from the
checkpoint, collecting each Linear's input statistics; as soon as a layer's statistics
are complete, `edit(name, W, stats)` changes each target weight in fp32 in place, the
edited weight is cast back to the checkpoint's dtype and streamed into the writer, and
the next layer is calibrated on the edited layer's outputs (as Wanda's reference does).
Every other tensor is copied file to file. Memory: about one decoder layer plus the
activation cache. With `dry_run` nothing is written and the report says what would change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from surgery.calib.data import Sample
from surgery.calib.layerwise import LayerContext, calibrate_layerwise
from surgery.calib.stats import LinearStats
from surgery.errors import SurgeryError
from surgery.io.checkpoint import Checkpoint
from surgery.io.provenance import provenance
from surgery.io.writer import DEFAULT_SHARD_SIZE, CheckpointWriter, TensorSpec
from surgery.pipeline.rewrite import input_records
from surgery.progress import track
from surgery.report import REPORT_FILE, Report, TensorChange

__all__ = ["LayerEdit", "layer_surgery", "sync_device"]

# checkpoint name, weight in fp32 on the device (edit in place), its input statistics -> what changed
LayerEdit = Callable[[str, torch.Tensor, LinearStats], TensorChange]


def sync_device() -> None:
    """Wait for queued CUDA work, so wall times measure it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def layer_surgery(
    model: str | Path | Checkpoint,
    samples: Sequence[Sample],
    edit: LayerEdit,
    out: str | Path | None,
    report: Report,
    *,
    inputs: Mapping[str, Any] | None = None,
    targets: Sequence[str] | None = None,
    token_mask: str = "all",
    batch_size: int = 1,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    dry_run: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> Report:
    """Calibrate `model` layer by layer, `edit` each target Linear weight, stream the result to `out`.

    `report` arrives with the method name and config; this fills in the inputs, the
    per-tensor changes, sample and token counts and the time split, and writes it into
    `out` as `surgery_report.json`. The caller has checked `out` against its inputs.
    """
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint.open(model)
    if not dry_run and out is None:
        raise SurgeryError("give an output path (-o) or ask for a dry run")
    all_inputs = {"model": ckpt, **(inputs or {})}
    report.inputs = input_records(all_inputs)
    report.out = None if dry_run else str(out)
    report.dry_run = dry_run
    report.metrics["samples"] = len(samples)
    report.metrics["tokens"] = (sum(len(s) for s in samples) if token_mask == "all"
                                else sum(s.num_response_tokens for s in samples))
    timings: dict[str, float] = {}
    edit_seconds = {"edit": 0.0, "write": 0.0, "edit_cpu": 0.0, "write_cpu": 0.0}
    written: set[str] = set()
    writer: CheckpointWriter | None = None
    if not dry_run and out is not None:  # out is None only for a dry run (checked above)
        specs = [TensorSpec.like(name, ckpt.info(name)) for name in ckpt.names()]
        meta = provenance(report.method, report.config, all_inputs)
        writer = CheckpointWriter(out, specs, shard_size=shard_size, metadata=meta, force=force,
                                  copy_files_from=ckpt.companion_files(), inputs=all_inputs)

    def on_layer(ctx: LayerContext) -> None:
        for path, st in sorted(ctx.stats.items()):
            if path.endswith((".lora_A", ".lora_B")):
                continue
            name = path + ".weight"
            W = ctx.linear(path).weight.data
            sync_device()
            t0, c0 = time.perf_counter(), time.process_time()
            change = edit(name, W, st)
            sync_device()
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
    t0, c0 = start, time.process_time()
    if writer is not None:
        writer.__enter__()
    try:
        calibrate_layerwise(ckpt, samples, targets, token_mask=token_mask, batch_size=batch_size, device=device,
                            dtype=dtype, on_layer=on_layer, keep_stats=False, timings=timings,
                            description=report.method)
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
            report.seconds = _split(timings, edit_seconds, time.perf_counter() - t0, time.process_time() - c0, start)
            writer.extra_files[REPORT_FILE] = report.to_json()
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
