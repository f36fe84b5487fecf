"""Streaming merge (and unmerge) of a LoRA adapter into a base checkpoint.

One tensor at a time: a tensor the adapter does not touch is copied file to file as
bytes; a plain-LoRA weight is streamed a block of rows at a time (read into reused
memory, `+= scaling * B[rows] @ A` in fp32, cast back to its own dtype, written at its
offset); the rest (DoRA, biases, modules_to_save, tied heads, pickle inputs) is computed
per tensor in fp32. Peak memory is about one tensor in fp32, never a shard or the model.
Everything is validated before the first byte is written, and the output appears
atomically or not at all.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.errors import MismatchError, NonFiniteError, SurgeryError
from surgery.io.adapter import LoraAdapter, LoraModule
from surgery.io.atomic import check_output
from surgery.io.checkpoint import Checkpoint
from surgery.io.provenance import provenance
from surgery.io.staging import Staging, as_bytes
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


_BLOCK_ELEMENTS = 1 << 19  # fp32 elements per step (2 MiB): fewer, larger steps cut per-block Python
# overhead with 2 threads; on the 2-core Xeon VM 1<<17: 1.1 s, 1<<19: 0.93 s, 1<<20: 0.85 s and 1<<21: 2.0 s (a cliff)
_WORKERS = 2  # tensors streamed at once: one's I/O overlaps another's arithmetic
_IN_FLIGHT = 4  # tensors queued ahead of the one being finished (bounds memory and progress lag)


def _merge_streamed(
    ckpt: Checkpoint,
    writer: CheckpointWriter,
    name: str,
    m: LoraModule,
    a: torch.Tensor,
    b: torch.Tensor,
    sign: float,
    buffers: Staging,
) -> bool:
    """Write `W ± ΔW` for a plain-LoRA 2-D float tensor a block of rows at a time: read the
    stored block into reused memory, add `left[rows] @ right` in fp32, cast back, write.
    One pass over the bytes, memory of a few blocks whatever the tensor's size.

    Returns whether the result holds NaN/Inf (checked per block, exactly). Safe to run on
    several tensors at once from threads: it touches only its own buffers and byte ranges.
    """
    info = ckpt.info(name)
    dtype = info.torch_dtype
    rows, cols = info.shape
    transposed = m.kind == "embedding" or m.fan_in_fan_out
    left, right = (a.T, b.T) if transposed else (b, a)  # W[rows] += left[rows] @ right
    step = max(1, _BLOCK_ELEMENTS // max(1, cols))
    row_bytes = cols * dtype.itemsize
    limit = torch.finfo(dtype).max
    nonfinite = False
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = (r1 - r0) * cols
        stored = buffers.get("in", dtype, n)
        ckpt.read_into(name, as_bytes(stored), r0 * row_bytes)
        block = buffers.get("fp32", torch.float32, n).view(r1 - r0, cols)
        block.copy_(stored.view(r1 - r0, cols))
        block.addmm_(left[r0:r1], right, alpha=sign * m.scaling)
        result = buffers.get("out", dtype, n)
        result.view(r1 - r0, cols).copy_(block)
        if not nonfinite and n:
            lo, hi = torch.aminmax(block)
            if not (-limit <= lo.item() <= limit and -limit <= hi.item() <= limit):  # NaN fails too
                nonfinite = not bool(torch.isfinite(result).all())
        writer.write_bytes(name, r0 * row_bytes, as_bytes(result))
    return nonfinite


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


def _nonfinite_message(mode: str, name: str, dtype: torch.dtype, in_base: bool) -> str:
    """Blame the right input: the base tensor when it already holds NaN/Inf, else the adapter's delta."""
    if in_base:
        return (
            f"the base tensor {name} already holds NaN or Inf, before the adapter; the base checkpoint is "
            "damaged (re-download or re-export it), or pass --allow-nonfinite to write it anyway"
        )
    return (
        f"{mode} gives NaN or Inf in {name}, which the base holds finite; the adapter looks broken or too "
        f"large for {str(dtype).removeprefix('torch.')} (pass --allow-nonfinite to write it anyway)"
    )


def _input_path(source: str | Path | Checkpoint | LoraAdapter) -> list[Path]:
    """The paths an already opened input (or a path) stands for."""
    if isinstance(source, Checkpoint):
        return [*source.files, *([source.directory] if source.directory else [])]
    if isinstance(source, LoraAdapter):
        return [source.directory]
    return [Path(source)]


def _base_nonfinite(ckpt: Checkpoint, name: str) -> bool:
    """Whether the base's own tensor `name` holds NaN or Inf (read only when a result does)."""
    if name not in ckpt:
        return False
    stored = ckpt.get(name)
    return stored.dtype.is_floating_point and not bool(torch.isfinite(stored).all())


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
    check_output(out, force, {"BASE": _input_path(base), "ADAPTER": _input_path(adapter)})
    ckpt = base if isinstance(base, Checkpoint) else Checkpoint.open(base, allow_pickle=allow_pickle)
    lora = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter.open(adapter, allow_pickle=allow_pickle)
    inputs = {"BASE": [*ckpt.files, *([ckpt.directory] if ckpt.directory else [])], "ADAPTER": lora.directory}

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

    mode = "unmerge" if unmerge else "merge"
    params = {"shard_size": shard_size, "allow_nonfinite": allow_nonfinite}
    metadata = provenance(mode, params, inputs={"base": ckpt, "adapter": lora})
    specs = [TensorSpec.like(name, ckpt.info(name)) for name in ckpt.names()]
    head_of, extra_files = _untie_plan(ckpt, lora, modules, replacements, unmerge)
    for emb, head in head_of.items():
        specs.append(TensorSpec(head, ckpt.info(emb).torch_dtype, tuple(ckpt.info(emb).shape)))
    report = MergeReport(out=str(out), mode=mode, tensors=len(specs))

    threads = torch.get_num_threads()
    # The merge is memory-bound on small blocks: one thread avoids OpenMP's fork/join and
    # spin-waits, which cost 2-15x on a loaded machine (benchmarks/pipeline_merge.py).
    torch.set_num_threads(1)
    try:
        with CheckpointWriter(out, specs, shard_size=shard_size, metadata=metadata, force=force,
                              copy_files_from=ckpt.companion_files(), extra_files=extra_files,
                              inputs=inputs) as writer:
            _MergeRun(ckpt, lora, writer, report, modules, replacements, head_of,
                      unmerge=unmerge, allow_nonfinite=allow_nonfinite).run()
            report.shards = list(writer.shards)
    finally:
        torch.set_num_threads(threads)
    report.total_bytes = sum(s.nbytes for s in specs)
    report.seconds = time.perf_counter() - started
    return report


class _MergeRun:
    """The write loop of `merge_adapter`: every base tensor once, in storage order.

    Untouched tensors (copied file to file) and plain-LoRA weights (streamed in blocks)
    go to a pool of `_WORKERS` threads, so one tensor's reads and writes overlap another's
    arithmetic; at most `_IN_FLIGHT` wait, which bounds memory and keeps the progress bar
    honest. Everything else (tied heads, DoRA, biases, replaced modules, pickle inputs)
    is computed whole in the calling thread.
    """

    def __init__(self, ckpt: Checkpoint, lora: LoraAdapter, writer: CheckpointWriter, report: MergeReport,
                 modules: dict[str, LoraModule], replacements: dict[str, str], head_of: dict[str, str],
                 *, unmerge: bool, allow_nonfinite: bool) -> None:
        self.ckpt, self.lora, self.writer, self.report = ckpt, lora, writer, report
        self.modules, self.replacements, self.head_of = modules, replacements, head_of
        self.bias_of = {m.base_bias_key: m for m in modules.values() if m.bias_key is not None}
        self.unmerge, self.allow_nonfinite = unmerge, allow_nonfinite
        self.sign = -1.0 if unmerge else 1.0
        self.mode = report.mode
        self._local = threading.local()
        self._pending: deque[tuple[str, Future]] = deque()

    def run(self) -> None:
        with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
            try:
                for name in track(self.ckpt.names(), total=len(self.ckpt), description=self.mode):
                    self._one(name, pool)
                self._settle(0)
            finally:
                for _, future in self._pending:
                    future.cancel()

    def _one(self, name: str, pool: ThreadPoolExecutor) -> None:
        m = self.modules.get(name)
        rkey = self.replacements.get(name)
        where = self.ckpt.raw_location(name)
        info = self.ckpt.info(name)
        if name in self.head_of:
            self._tied(name, m, rkey)
        elif m is None and rkey is None and name not in self.bias_of and where is not None:
            self._submit(name, pool.submit(self._copy, name, where))
        elif (
            m is not None and rkey is None and not m.is_dora and len(info.shape) == 2
            and info.torch_dtype.is_floating_point and where is not None
        ):
            self.report.merged.append(name)
            a, b = self.lora.lora_A(m), self.lora.lora_B(m)  # read here: the adapter is not shared
            self._submit(name, pool.submit(self._stream, name, m, a, b))
        else:
            self._whole(name, m, rkey)

    # ---------------------------------------------------------------- pooled work
    def _copy(self, name: str, where: tuple[Path, int]) -> bool:
        self.writer.copy_raw(name, *where)
        return False

    def _stream(self, name: str, m: LoraModule, a: torch.Tensor, b: torch.Tensor) -> bool:
        if not hasattr(self._local, "buffers"):
            self._local.buffers = Staging(_BLOCK_ELEMENTS)  # reused: fresh memory per tensor faults in
        return _merge_streamed(self.ckpt, self.writer, name, m, a, b, self.sign, self._local.buffers)

    def _submit(self, name: str, future: Future) -> None:
        self._pending.append((name, future))
        self._settle(_IN_FLIGHT)

    def _settle(self, limit: int) -> None:
        """Wait for the oldest pooled tensors until at most `limit` remain (errors surface here)."""
        while len(self._pending) > limit:
            name, future = self._pending.popleft()
            if future.result():  # True: the streamed result holds NaN/Inf
                self._nonfinite(name, self.ckpt.info(name).torch_dtype)

    # ---------------------------------------------------------------- whole tensors
    def _nonfinite(self, name: str, dtype: torch.dtype) -> None:
        if not self.allow_nonfinite:
            in_base = name not in self.replacements and _base_nonfinite(self.ckpt, name)
            raise NonFiniteError(_nonfinite_message(self.mode, name, dtype, in_base))
        self.report.nonfinite.append(name)

    def _checked(self, name: str, result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        nonfinite = _nonfinite(result, dtype)
        result = result.to(dtype)
        if nonfinite:
            self._nonfinite(name, dtype)
        return result

    def _tied(self, name: str, m: LoraModule | None, rkey: str | None) -> None:
        """A tied embedding the adapter changes: write the embedding and the head apart."""
        stored = self.ckpt.get(name)
        dtype = stored.dtype
        under = self.lora.get(rkey) if rkey is not None else stored
        if rkey is not None:
            self.report.replaced.append(name)
        for key, moved in ((name, m is not None and not m.tied_head), (self.head_of[name], m is not None and m.tied_head)):
            value = merged_weight(self.lora, m, under) if moved else under.to(torch.float32)  # type: ignore[arg-type]
            if moved:
                self.report.merged.append(key)
                if m.is_dora:  # type: ignore[union-attr]
                    self.report.dora.append(key)
            self.writer.write(key, self._checked(key, value, dtype))

    def _whole(self, name: str, m: LoraModule | None, rkey: str | None) -> None:
        """DoRA, biases, modules_to_save replacements, pickle inputs: one fp32 tensor at a time."""
        stored = self.ckpt.get(name)
        dtype = stored.dtype
        bias_module = self.bias_of.get(name)
        w = self.lora.get(rkey) if rkey is not None else stored
        del stored
        if rkey is not None:
            self.report.replaced.append(name)
        if m is not None:
            if rkey is not None and self.unmerge:
                result = w.to(torch.float32)  # the saved base layer is what lay under the adapter
            else:
                result = merged_weight(self.lora, m, w, unmerge=self.unmerge)
            self.report.merged.append(name)
            if m.is_dora:
                self.report.dora.append(name)
        elif bias_module is not None:
            result = w.to(torch.float32, copy=True)
            result.add_(self.lora.bias(bias_module), alpha=self.sign)  # type: ignore[arg-type]
            self.report.biases.append(name)
        else:
            result = w
        del w
        self.writer.write(name, self._checked(name, result, dtype))
