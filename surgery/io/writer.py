"""Streaming, byte-bounded, atomic writer of safetensors checkpoints.

The header of every shard is planned from the tensors' names, dtypes and shapes
before any data exists; each tensor is then written straight to its offset in its
shard file as it is produced. Memory therefore stays at about one tensor whatever
the shard size (saving a dict per shard would hold a whole shard).

Sharding follows transformers/huggingface_hub: tensors fill shards greedily in plan
order up to `shard_size` bytes of tensor data; a tensor larger than the limit gets a
shard of its own; shards are named `model-00001-of-00003.safetensors`; an index
`model.safetensors.index.json` with `metadata.total_size` (the sum of tensor bytes)
and `weight_map` is written only when there is more than one shard.

Since the plan gives the output's exact size, the free space at the destination is
checked (statvfs) before the first byte is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import SurgeryError
from surgery.io.atomic import InputPaths, atomic_path
from surgery.io.header import DTYPE_SIZES, dtype_name
from surgery.io.staging import Staging, as_bytes, flat_bytes
from surgery.io.summary import format_size

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5_000_000_000


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: known before its data is."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[dtype_name(self.dtype)]

    @classmethod
    def like(cls, name: str, tensor_or_info: object) -> TensorSpec:
        """Spec with the dtype and shape of a tensor or a `TensorInfo`."""
        dtype = getattr(tensor_or_info, "torch_dtype", None) or tensor_or_info.dtype  # type: ignore[attr-defined]
        return cls(name, dtype, tuple(tensor_or_info.shape))  # type: ignore[attr-defined]


def plan_shards(specs: Sequence[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Greedy byte-bounded split, in order, as huggingface_hub does it."""
    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_bytes = 0
    for spec in specs:
        if current and current_bytes + spec.nbytes > shard_size:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += spec.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(weights_name: str, count: int) -> list[str]:
    """`model.safetensors` alone, else `model-00001-of-0000N.safetensors`."""
    if count == 1:
        return [weights_name]
    stem = weights_name.removesuffix(".safetensors")
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `directory`."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse a write of `needed` bytes into `directory` that cannot fit, before any byte is written
    (a full disk mid-write would cost the whole run). Unknown free space (no statvfs) passes."""
    try:
        free = free_bytes(directory)
    except (OSError, AttributeError):
        return
    if needed > free:
        raise SurgeryError(
            f"the output needs {format_size(needed)}, {format_size(free)} free at {directory}; "
            "free some space or choose another output directory"
        )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offsets: dict[str, int] = {}
    position = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": dtype_name(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [position, position + spec.nbytes],
        }
        offsets[spec.name] = position
        position += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data, as safetensors pads
    return len(raw).to_bytes(8, "little") + raw, offsets


class CheckpointWriter:
    """Write planned tensors one at a time into an atomically created checkpoint directory.

    Use as a context manager; call `write(name, tensor)` once per planned tensor in
    any order. On a clean exit every tensor must have been written; the index (if
    sharded), companion files and extra files are added and the directory renamed
    into place. On error nothing is left at `out`. `inputs` are the command's input
    paths: an `out` that overlaps one is refused (see `surgery.io.atomic.check_output`).
    """

    def __init__(
        self,
        out: str | Path,
        specs: Iterable[TensorSpec],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
        force: bool = False,
        copy_files_from: Iterable[Path] | Path | None = None,
        weights_name: str = "model.safetensors",
        extra_files: Mapping[str, str | bytes] | None = None,
        inputs: InputPaths = (),
    ) -> None:
        self.out = Path(out)
        self.inputs = inputs
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the write plan")
        self.metadata = {"format": "pt", **dict(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        self.shard_size = shard_size
        self.force = force
        self.weights_name = weights_name
        self.extra_files = dict(extra_files or {})
        if isinstance(copy_files_from, Path):
            copy_files_from = [copy_files_from]
        self.copy_files = list(copy_files_from or [])
        self._context: AbstractContextManager[Path] | None = None
        self._tmp: Path | None = None
        self._where: dict[str, tuple[Path, int, TensorSpec]] = {}
        self._filled: dict[str, int] = {}  # bytes written so far, per tensor
        self._fds: dict[Path, int] = {}
        self._fds_lock = threading.Lock()  # write_bytes/copy_raw may run from several threads
        self._staging = Staging()  # write_cast's reused block
        self.shards: list[str] = []

    def __enter__(self) -> CheckpointWriter:
        self._context = atomic_path(self.out, self.force, self.inputs)
        self._tmp = self._context.__enter__()
        try:
            planned = plan_shards(self.specs, self.shard_size)
            self.shards = shard_names(self.weights_name, len(planned))
            headers = [_header_bytes(shard, self.metadata) for shard in planned]
            check_free_space(self._tmp.parent, self._planned_bytes(headers))
            self._tmp.mkdir()
            for file_name, shard, (header, offsets) in zip(self.shards, planned, headers, strict=True):
                path = self._tmp / file_name
                with path.open("wb") as handle:
                    handle.write(header)
                    handle.truncate(len(header) + sum(s.nbytes for s in shard))
                for spec in shard:
                    self._where[spec.name] = (path, len(header) + offsets[spec.name], spec)
            log.debug("%s: %d tensors planned in %d shards", self.out, len(self.specs), len(self.shards))
        except BaseException as exc:
            self._context.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _planned_bytes(self, headers: Sequence[tuple[bytes, dict[str, int]]]) -> int:
        """Bytes the finished output takes: shard headers and data, the index, copied and extra files."""
        data = sum(s.nbytes for s in self.specs)
        index = 0 if len(headers) <= 1 else 200 + sum(len(s.name) + 40 for s in self.specs)
        copied = sum(_file_size(Path(p)) for p in self.copy_files)
        extra = sum(len(c.encode() if isinstance(c, str) else c) for c in self.extra_files.values())
        return data + sum(len(h) for h, _ in headers) + index + copied + extra

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (its dtype and shape must match the plan)."""
        spec = self._spec(name)
        if self._filled.get(name):
            raise ValueError(f"{name!r} was already written")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{name}: planned {spec.dtype} {spec.shape}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        self._pwrite(name, 0, as_bytes(tensor.detach().to("cpu").contiguous()))
        self._filled[name] = spec.nbytes

    def write_cast(self, name: str, tensor: torch.Tensor, block: int = 1 << 20) -> None:
        """Write a tensor of another dtype (or device) as the planned one, cast a block of
        `block` elements at a time into reused staging memory: no full-size cast copy, and
        no fresh pages to fault in per tensor."""
        spec = self._spec(name)
        if self._filled.get(name):
            raise ValueError(f"{name!r} was already written")
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: planned shape {spec.shape}, got {tuple(tensor.shape)}")
        flat = tensor.detach().reshape(-1)
        step = max(1, min(block, flat.numel()))
        for a in range(0, flat.numel(), step):
            part = self._staging.get("cast", spec.dtype, min(step, flat.numel() - a))
            part.copy_(flat[a : a + part.numel()])
            self.write_bytes(name, a * spec.dtype.itemsize, as_bytes(part))

    def write_bytes(self, name: str, offset: int, data: memoryview) -> None:
        """Write part of a planned tensor: its raw bytes from byte `offset` on, so a tensor can
        be produced a block at a time from buffers the caller reuses."""
        spec = self._spec(name)
        size = data.nbytes
        if offset < 0 or offset + size > spec.nbytes:
            raise ValueError(f"{name}: bytes {offset}..{offset + size} lie outside its {spec.nbytes} bytes")
        self._pwrite(name, offset, data)
        self._filled[name] = self._filled.get(name, 0) + size

    def copy_raw(self, name: str, source: Path, source_offset: int) -> None:
        """Copy a whole planned tensor's bytes from `source` at `source_offset` without
        passing them through Python (copy_file_range(2); a plain copy where it is missing)."""
        spec = self._spec(name)
        if self._filled.get(name):
            raise ValueError(f"{name!r} was already written")
        path, offset, _ = self._where[name]
        fd_out = self._fd(path)
        fd_in = os.open(source, os.O_RDONLY)
        try:
            done = 0
            while done < spec.nbytes:
                count = spec.nbytes - done
                if hasattr(os, "copy_file_range"):
                    try:
                        got = os.copy_file_range(fd_in, fd_out, count, source_offset + done, offset + done)
                    except OSError:  # cross-device on old kernels, unsupported file systems
                        got = os.pwrite(fd_out, os.pread(fd_in, min(count, 1 << 24), source_offset + done),
                                        offset + done)
                else:
                    got = os.pwrite(fd_out, os.pread(fd_in, min(count, 1 << 24), source_offset + done),
                                    offset + done)
                if got == 0:
                    raise OSError(f"{source} ends before the {spec.nbytes} bytes of {name}")
                done += got
        finally:
            os.close(fd_in)
        self._filled[name] = spec.nbytes

    def _spec(self, name: str) -> TensorSpec:
        if name not in self._where:
            raise KeyError(f"{name!r} is not in the write plan")
        return self._where[name][2]

    def _fd(self, path: Path) -> int:
        with self._fds_lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_WRONLY)
            return fd

    def _pwrite(self, name: str, offset: int, data: memoryview) -> None:
        path, start, _ = self._where[name]
        fd = self._fd(path)
        view = flat_bytes(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], start + offset + done)

    def _close_files(self) -> None:
        with self._fds_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._context is not None and self._tmp is not None
        self._close_files()
        if exc_type is None:
            try:
                missing = [s.name for s in self.specs if self._filled.get(s.name, 0) != s.nbytes]
                if missing:
                    raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]}")
                self._finish(self._tmp)
            except BaseException as inner:
                self._context.__exit__(type(inner), inner, inner.__traceback__)
                raise
        self._context.__exit__(exc_type, exc, tb)
        if exc_type is None:
            log.info("wrote %s (%d tensors, %d shards)", self.out, len(self.specs), len(self.shards))

    def _finish(self, tmp: Path) -> None:
        if len(self.shards) > 1:
            weight_map = {name: where[0].name for name, where in self._where.items()}
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.specs)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            index_name = self.weights_name.removesuffix(".safetensors") + ".safetensors.index.json"
            (tmp / index_name).write_text(json.dumps(index, indent=2) + "\n")
        for source in self.copy_files:
            source = Path(source)
            if source.is_file() and source.name not in self.extra_files:
                shutil.copy2(source, tmp / source.name)
        for name, content in self.extra_files.items():
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)


def write_tensors(
    out: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
    inputs: InputPaths = (),
) -> Path:
    """Write a small dict of tensors (a mask, a module, a direction) as one safetensors file, atomically;
    an `out` that overlaps one of `inputs` is refused."""
    out = Path(out)
    specs = [TensorSpec.like(name, t) for name, t in tensors.items()]
    header, offsets = _header_bytes(specs, {"format": "pt", **dict(metadata or {})})
    with atomic_path(out, force, inputs) as tmp:
        check_free_space(tmp.parent, len(header) + sum(s.nbytes for s in specs))
        with tmp.open("wb") as handle:
            handle.write(header)
            for spec in specs:
                t = tensors[spec.name]
                if spec.nbytes:
                    handle.write(as_bytes(t.detach().cpu().contiguous()))
    log.info("wrote %s (%d tensors)", out, len(specs))
    return out
