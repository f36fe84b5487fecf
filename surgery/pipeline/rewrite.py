"""Streamed checkpoint rewrite: the sequence every weight-editing method shares.

Open the input, plan the output from the headers (same names, dtypes and shapes, plus
any new tensors), stream every tensor through once: an edited tensor is read, changed
and written; an untouched one is copied file to file without passing through Python.
Provenance (the method, its config, the inputs' hashes) goes into every shard's
metadata, the `Report` into `surgery_report.json`. Memory is one tensor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from surgery.io.checkpoint import Checkpoint
from surgery.io.provenance import fingerprint, provenance
from surgery.io.writer import DEFAULT_SHARD_SIZE, CheckpointWriter, TensorSpec
from surgery.progress import track
from surgery.report import REPORT_FILE, Report, TensorChange

__all__ = ["TensorEdit", "input_records", "rewrite_checkpoint"]

# name, tensor as stored -> None (keep it), the new tensor (same dtype and shape), or
# (new tensor, entries the rule selected) when the rule selects fewer than all entries.
TensorEdit = Callable[[str, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, int] | None"]


def input_records(inputs: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """`{role: {"path", "sha256"}}` for a report; `None` entries are skipped."""
    out = {}
    for role, value in inputs.items():
        if value is None:
            continue
        path = getattr(value, "path", value)
        out[role] = {"path": str(path), "sha256": fingerprint(value)}
    return out


def rewrite_checkpoint(
    ckpt: Checkpoint,
    out: str | Path,
    report: Report,
    *,
    edit: TensorEdit | None = None,
    names: set[str] | None = None,
    new_tensors: Mapping[str, torch.Tensor] | None = None,
    inputs: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    description: str = "write model",
    started: float | None = None,
) -> Report:
    """Stream `ckpt` into `out`, passing the tensors in `names` (default all) through `edit`.

    `edit(name, tensor)` returns the new tensor or None (unchanged); changed entries are
    counted into `report.tensors`. `new_tensors` are added to the output. The report
    (with `out`, input hashes and the total time) is written into `out` beside the
    weights; `seconds["total"]` counts from `started` (default: this call). The caller has
    already checked `out` against its inputs.
    """
    start = time.perf_counter()
    started = start if started is None else started
    all_inputs = {"model": ckpt, **(inputs or {})}
    report.inputs = input_records(all_inputs)
    report.out = str(out)
    new_tensors = dict(new_tensors or {})
    specs = [TensorSpec.like(n, ckpt.info(n)) for n in ckpt.names()]
    specs += [TensorSpec.like(n, t) for n, t in new_tensors.items()]
    meta = provenance(report.method, report.config, all_inputs)
    wanted = set(ckpt.names()) if names is None else set(names)
    with CheckpointWriter(out, specs, shard_size=shard_size, metadata=meta, force=force,
                          copy_files_from=ckpt.companion_files(), extra_files=dict(extra_files or {})) as writer:
        for name in track(ckpt.names(), description=description):
            where = ckpt.raw_location(name) if (edit is None or name not in wanted) else None
            if where is not None:
                writer.copy_raw(name, *where)
                continue
            tensor = ckpt.get(name)
            new = edit(name, tensor) if (edit is not None and name in wanted) else None
            selected = tensor.numel()
            if isinstance(new, tuple):
                new, selected = new
            if new is not None:
                if new.dtype != tensor.dtype or tuple(new.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: an edit must keep dtype and shape "
                                     f"({tensor.dtype} {list(tensor.shape)} -> {new.dtype} {list(new.shape)})")
                changed = int((new != tensor).sum())
                report.tensors.append(TensorChange(name, list(tensor.shape), int(selected), changed))
                tensor = new
            writer.write(name, tensor)
        for name, tensor in new_tensors.items():
            writer.write(name, tensor)
        report.seconds["write"] = time.perf_counter() - start
        report.seconds["total"] = time.perf_counter() - started
        writer.extra_files[REPORT_FILE] = report.to_json()
    return report
