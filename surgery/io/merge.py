"""Streaming merge (and unmerge) of a LoRA adapter into a base checkpoint.

One tensor at a time: read a base tensor, and if the adapter touches it compute
`W + scaling * B @ A` in fp32 (in place, with `addmm_`, so no separate delta is held),
apply DoRA's magnitude, cast back to the tensor's own dtype and stream it into the
writer. Peak memory is about one tensor in fp32, never a shard or the model.
Everything is validated before the first byte is written, and the output appears
atomically or not at all.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.errors import MismatchError, NonFiniteError, SurgeryError
from surgery.io.adapter import LoraAdapter, LoraModule
from surgery.io.atomic import check_output
from surgery.io.checkpoint import Checkpoint
from surgery.io.provenance import provenance
from surgery.io.writer import DEFAULT_SHARD_SIZE, CheckpointWriter, TensorSpec
from surgery.progress import track


@dataclass
class MergeReport:
    """What a merge did, for the CLI's table and `--json`."""

    out: str
    mode: str  # "merge" | "unmerge"
    tensors: int
    merged: list[str] = field(default_factory=list)
    dora: list[str] = field(default_factory=list)
    biases: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    total_bytes: int = 0
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    nonfinite: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _addmm_delta(w: torch.Tensor, adapter: LoraAdapter, m: LoraModule, sign: float) -> None:
    """w += sign * scaling * ΔW in place (fp32), in w's layout, without materialising ΔW."""
    a = adapter.lora_A(m)
    b = adapter.lora_B(m)
    if m.kind == "embedding" or m.fan_in_fan_out:
        w.addmm_(a.T, b.T, alpha=sign * m.scaling)
    else:
        w.addmm_(b, a, alpha=sign * m.scaling)


def dora_norm_dim(m: LoraModule) -> int:
    """Axis the DoRA norm reduces over in the base layout: per output feature for Linear
    ([out, in] -> dim 1), per column for Conv1D ([in, out]) and embeddings ([V, D]) (dim 0),
    as peft's DoraLinearLayer / DoraEmbeddingLayer compute it."""
    return 0 if (m.kind == "embedding" or m.fan_in_fan_out) else 1


def merged_weight(
    adapter: LoraAdapter, m: LoraModule, weight: torch.Tensor, *, unmerge: bool = False
) -> torch.Tensor:
    """The merged (or unmerged) weight of one module as a new fp32 tensor.

    Merge: `W + ΔW`, or with DoRA `m / ||W + ΔW|| * (W + ΔW)` (norm as in peft).
    Unmerge: `W - ΔW`; DoRA cannot be unmerged from the merged weight alone (the
    per-row norm of `W + ΔW` is lost), so it is refused.
    """
    w = weight.to(torch.float32, copy=True)
    if unmerge:
        if m.is_dora:
            raise SurgeryError(
                f"{m.module_path} is a DoRA module; a DoRA merge cannot be undone from the merged weights "
                "(the norm of W+ΔW is lost); keep the original base instead"
            )
        _addmm_delta(w, adapter, m, -1.0)
        return w
    _addmm_delta(w, adapter, m, 1.0)
    magnitude = adapter.magnitude(m)
    if magnitude is not None:
        dim = dora_norm_dim(m)
        norm = torch.linalg.vector_norm(w, dim=dim, keepdim=True)
        w.mul_(magnitude.view_as(norm) / norm)
    return w


_BLOCK_BYTES = 1 << 21  # fp32 rows per step of the blocked merge: a block stays in cache


def _merge_blocked(
    adapter: LoraAdapter, m: LoraModule, stored: torch.Tensor, sign: float
) -> tuple[torch.Tensor, bool]:
    """`stored ± ΔW` (plain LoRA) computed in fp32 a block of rows at a time, each block
    cast straight into the output: one pass over memory, no full-size fp32 copy.

    Returns the result in `stored`'s dtype and whether it may hold NaN/Inf (decided
    per block by `aminmax` against the dtype's range; exact re-check by the caller).
    """
    a = adapter.lora_A(m)
    b = adapter.lora_B(m)
    transposed = m.kind == "embedding" or m.fan_in_fan_out
    left, right = (a.T, b.T) if transposed else (b, a)  # W[rows] += left[rows] @ right
    out = torch.empty_like(stored)
    rows = stored.shape[0]
    step = max(1, _BLOCK_BYTES // (4 * max(1, stored.shape[1])))
    limit = torch.finfo(stored.dtype).max if stored.dtype.is_floating_point else math.inf
    suspicious = False
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = stored[r0:r1].to(torch.float32)
        block.addmm_(left[r0:r1], right, alpha=sign * m.scaling)
        if not suspicious and block.numel():
            lo, hi = torch.aminmax(block)
            lo_f, hi_f = lo.item(), hi.item()
            suspicious = not (-limit <= lo_f <= limit and -limit <= hi_f <= limit)  # NaN fails too
        out[r0:r1].copy_(block)
    return out, suspicious


def _nonfinite(result: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `result` (fp32) holds NaN/Inf or overflows when cast to `dtype`.

    One `aminmax` pass (NaN propagates through it) decides the common case; only a
    suspicious tensor pays for the exact, much slower `isfinite` of the cast.
    """
    if not dtype.is_floating_point or result.numel() == 0:
        return False
    lo, hi = torch.aminmax(result)
    limit = torch.finfo(dtype).max
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)) and -limit <= lo.item() and hi.item() <= limit:
        return False
    return not bool(torch.isfinite(result.to(dtype)).all())


def _untie_plan(
    ckpt: Checkpoint,
    lora: LoraAdapter,
    modules: dict[str, LoraModule],
    replacements: dict[str, str],
    unmerge: bool,
) -> tuple[dict[str, str], dict[str, str]]:
    """Untie a tied embedding the adapter changes: `({embedding: head key}, {config.json: text})`.

    With tied weights, a LoRA on `lm_head` changes only the output projection and one on
    `embed_tokens` only the input lookup; merging either into the one shared tensor would
    change both (peft warns about this, huggingface/peft#2777). So the merge writes the
    head as its own tensor and sets `tie_word_embeddings: false`, which keeps the adapted
    model's outputs exactly.
    """
    config = ckpt.config()
    if unmerge or config is None:
        return {}, {}
    if not any("ForCausalLM" in a or "LMHead" in a for a in config.get("architectures") or []):
        return {}, {}
    emb = LoraAdapter.tied_embedding(ckpt)
    if emb is None or (emb not in modules and emb not in replacements):
        return {}, {}
    config = {**config, "tie_word_embeddings": False}
    return {emb: "lm_head.weight"}, {"config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}


def _nonfinite_message(mode: str, name: str, dtype: torch.dtype) -> str:
    return (
        f"{mode} gives NaN or Inf in {name}; the adapter looks broken or too large for "
        f"{str(dtype).removeprefix('torch.')} (pass --allow-nonfinite to write it anyway)"
    )


def merge_adapter(
    base: str | Path | Checkpoint,
    adapter: str | Path | LoraAdapter,
    out: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    unmerge: bool = False,
    allow_nonfinite: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
) -> MergeReport:
    """Merge `adapter` into `base` (or subtract it with `unmerge`) and write `out` atomically.

    Raises `MismatchError` (adapter does not fit the base), `NonFiniteError` (a result
    holds NaN/Inf and `allow_nonfinite` is off), `OutputExistsError`, and the readers'
    errors for bad inputs; nothing is written in any of these cases.
    """
    started = time.perf_counter()
    out = Path(out)
    check_output(out, force)
    ckpt = base if isinstance(base, Checkpoint) else Checkpoint.open(base, allow_pickle=allow_pickle)
    lora = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter.open(adapter, allow_pickle=allow_pickle)
    inputs = [*ckpt.files, lora.directory, *([ckpt.directory] if ckpt.directory else [])]
    if out.resolve() in {p.resolve() for p in inputs}:
        raise SurgeryError(f"output {out} is one of the inputs, which are never modified; choose another path")

    modules, replacements = lora.match(ckpt)
    if not modules and not replacements:
        raise MismatchError(f"adapter {lora.directory} has no LoRA tensors; nothing to merge")
    if unmerge:
        dora = [m.module_path for m in modules.values() if m.is_dora]
        if dora:
            raise SurgeryError(
                f"cannot unmerge DoRA module {dora[0]}: the norm of W+ΔW is lost in the merged weights, "
                "so the base is not recoverable exactly; keep the original base instead"
            )
        full = [k for k, a in replacements.items() if ".base_layer." not in a]
        if full:
            raise SurgeryError(
                f"cannot unmerge: the adapter replaces {full[0]} with a full tensor (modules_to_save), "
                "whose original value the merged checkpoint no longer holds"
            )
    bias_of = {m.base_bias_key: m for m in modules.values() if m.bias_key is not None}

    mode = "unmerge" if unmerge else "merge"
    params = {"shard_size": shard_size, "allow_nonfinite": allow_nonfinite}
    metadata = provenance(mode, params, inputs={"base": ckpt, "adapter": lora})
    specs = [TensorSpec.like(name, ckpt.info(name)) for name in ckpt.names()]
    head_of, extra_files = _untie_plan(ckpt, lora, modules, replacements, unmerge)
    for emb, head in head_of.items():
        specs.append(TensorSpec(head, ckpt.info(emb).torch_dtype, tuple(ckpt.info(emb).shape)))
    report = MergeReport(out=str(out), mode=mode, tensors=len(specs))
    sign = -1.0 if unmerge else 1.0

    threads = torch.get_num_threads()
    # The merge is memory-bound on small blocks: one thread avoids OpenMP's fork/join and
    # spin-waits, which cost 2-15x on a loaded machine (benchmarks/pipeline_merge.py).
    torch.set_num_threads(1)
    try:
        _stream(ckpt, lora, out, specs, modules, replacements, bias_of, report, sign, mode, metadata,
                shard_size=shard_size, force=force, unmerge=unmerge, allow_nonfinite=allow_nonfinite,
                head_of=head_of, extra_files=extra_files)
    finally:
        torch.set_num_threads(threads)
    report.total_bytes = sum(s.nbytes for s in specs)
    report.seconds = time.perf_counter() - started
    return report


def _stream(
    ckpt: Checkpoint,
    lora: LoraAdapter,
    out: Path,
    specs: list[TensorSpec],
    modules: dict[str, LoraModule],
    replacements: dict[str, str],
    bias_of: dict[str, LoraModule],
    report: MergeReport,
    sign: float,
    mode: str,
    metadata: dict[str, str],
    *,
    shard_size: int,
    force: bool,
    unmerge: bool,
    allow_nonfinite: bool,
    head_of: dict[str, str],
    extra_files: dict[str, str],
) -> None:
    """The write loop of `merge_adapter`: every base tensor once, in storage order."""

    def checked(name: str, result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        nonfinite = _nonfinite(result, dtype)
        result = result.to(dtype)
        if nonfinite:
            if not allow_nonfinite:
                raise NonFiniteError(_nonfinite_message(mode, name, dtype))
            report.nonfinite.append(name)
        return result

    with CheckpointWriter(
        out,
        specs,
        shard_size=shard_size,
        metadata=metadata,
        force=force,
        copy_files_from=ckpt.companion_files(),
        extra_files=extra_files,
    ) as writer:
        for name in track(ckpt.names(), total=len(ckpt.names()), description=mode):
            m = modules.get(name)
            bias_module = bias_of.get(name)
            rkey = replacements.get(name)
            if name in head_of:  # a tied embedding the adapter changes: write embedding and head apart
                stored = ckpt.get(name)
                dtype = stored.dtype
                under = lora.get(rkey) if rkey is not None else stored
                if rkey is not None:
                    report.replaced.append(name)
                for key, moved in ((name, m is not None and not m.tied_head), (head_of[name], m is not None and m.tied_head)):
                    value = merged_weight(lora, m, under) if moved else under.to(torch.float32)  # type: ignore[arg-type]
                    if moved:
                        report.merged.append(key)
                        if m.is_dora:  # type: ignore[union-attr]
                            report.dora.append(key)
                    writer.write(key, checked(key, value, dtype))
                continue
            if m is None and bias_module is None and rkey is None:
                writer.write(name, ckpt.get(name))
                continue
            stored = ckpt.get(name)
            dtype = stored.dtype
            if (
                m is not None and rkey is None and not m.is_dora and stored.ndim == 2
                and dtype.is_floating_point
            ):  # the common case, in one cache-friendly pass
                result, suspicious = _merge_blocked(lora, m, stored, sign)
                del stored
                report.merged.append(name)
                if suspicious and not bool(torch.isfinite(result).all()):
                    if not allow_nonfinite:
                        raise NonFiniteError(_nonfinite_message(mode, name, dtype))
                    report.nonfinite.append(name)
                writer.write(name, result)
                del result
                continue
            w = lora.get(rkey) if rkey is not None else stored
            del stored
            if rkey is not None:
                report.replaced.append(name)
            if m is not None:
                if rkey is not None and unmerge:
                    result = w.to(torch.float32)  # the saved base layer is what lay under the adapter
                else:
                    result = merged_weight(lora, m, w, unmerge=unmerge)
                report.merged.append(name)
                if m.is_dora:
                    report.dora.append(name)
            elif bias_module is not None:
                result = w.to(torch.float32, copy=True)
                result.add_(lora.bias(bias_module), alpha=sign)  # type: ignore[arg-type]
                report.biases.append(name)
            else:
                result = w
            del w
            result = checked(name, result, dtype)
            writer.write(name, result)
            del result
    report.shards = list(writer.shards)
