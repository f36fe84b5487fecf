"""Lazy reader for Hugging Face checkpoints: headers up front, tensors one at a time.

Accepts a model directory (`model.safetensors`, or shards listed by
`model.safetensors.index.json`), a directory holding one other `.safetensors` file
(an adapter, a mask), or a single `.safetensors` file. Names, dtypes, shapes and
bytes come from the headers alone; `get` reads one tensor (memory-mapped by
safetensors) so a pass over a checkpoint holds about one tensor at a time.

Pickle checkpoints (`pytorch_model.bin`) can run code when loaded: they are refused
unless `allow_pickle=True`, and then loaded with `torch.load(weights_only=True)`,
one shard at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import safe_open

from surgery.errors import CorruptFileError, InputNotFoundError, PickleRefusedError, UnsafePathError
from surgery.io.header import DTYPE_SIZES, SafetensorsHeader, TensorInfo, dtype_name, read_header
from surgery.io.paths import refuse_special_file
from surgery.io.pickled import load_pickle_weights
from surgery.io.staging import Staging, as_bytes, flat_bytes

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Non-weight files a model directory carries and every output should keep.
COMPANION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


log = logging.getLogger(__name__)

_STAGING = threading.local()  # read_cast's reused block per stored dtype, one set per thread
_STAGING_ELEMENTS = 1 << 20


def _check_shard_name(directory: Path, name: Any, index_path: Path) -> Path:
    """A shard named by an index must be a plain file name inside the directory."""
    if not isinstance(name, str) or not name:
        raise CorruptFileError(f"{index_path} names a shard that is not a file name: {name!r}")
    plain = (
        "/" not in name
        and "\\" not in name
        and name not in (".", "..")
        and not PurePosixPath(name).is_absolute()
        and not PureWindowsPath(name).is_absolute()
        and not PureWindowsPath(name).drive
        and "\x00" not in name
    )
    if not plain:
        raise UnsafePathError(
            f"{index_path} names shard {name!r}, which is not a plain file name inside {directory}; "
            "refusing to read outside the checkpoint directory"
        )
    return directory / name


def _load_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{index_path} is not valid JSON ({exc}); re-download or regenerate it") from None
    except OSError as exc:
        raise InputNotFoundError(f"{index_path} cannot be read ({exc.strerror})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptFileError(f"{index_path} has no weight_map; it is not a checkpoint index")
    return weight_map


def _open_pread(path: Path) -> Any:
    """safe_open reading each tensor with pread(2): a memory map would keep every page
    it touched resident, so a pass over the checkpoint would grow RSS to the file's size."""
    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors < 0.8 has no backend choice
        return safe_open(str(path), framework="pt", device="cpu")


class Checkpoint:
    """A read-only view of a checkpoint's tensors, loaded lazily one at a time."""

    def __init__(
        self,
        path: Path,
        infos: dict[str, TensorInfo],
        headers: list[SafetensorsHeader],
        directory: Path | None,
        index_path: Path | None,
    ) -> None:
        self.path = path
        self.directory = directory
        self.index_path = index_path
        self._infos = infos
        self._headers = headers
        self._handles: dict[Path, Any] = {}
        self._data_start = {h.path: h.data_start for h in headers}
        self._fds: dict[Path, int] = {}
        self._fds_lock = threading.Lock()  # read_into may run from several threads

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, allow_pickle: bool = False) -> Checkpoint:
        """Open a checkpoint directory or file; raises `SurgeryError` subclasses on bad input."""
        path = Path(path)
        if not path.exists():
            raise InputNotFoundError(f"{path} does not exist; give a model directory or a .safetensors file")
        refuse_special_file(path)
        if path.is_dir():
            for name in (SAFE_INDEX, SAFE_WEIGHTS, PICKLE_INDEX, PICKLE_WEIGHTS):
                refuse_special_file(path / name)
        if path.is_file():
            if path.suffix == ".safetensors":
                return cls._from_files(path, [path], None, None)
            if path.suffix in _PICKLE_SUFFIXES or path.name.endswith(".bin.index.json"):
                return _open_pickle(path, allow_pickle)
            raise InputNotFoundError(f"{path} is not a .safetensors file or a model directory")
        if (path / SAFE_INDEX).is_file():
            return cls._from_index(path, path / SAFE_INDEX)
        if (path / SAFE_WEIGHTS).is_file():
            return cls._from_files(path, [path / SAFE_WEIGHTS], path, None)
        others = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if len(others) == 1:
            return cls._from_files(path, others, path, None)
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return cls._from_index(path, indexes[0])
        if (path / PICKLE_INDEX).is_file() or (path / PICKLE_WEIGHTS).is_file():
            return _open_pickle(path, allow_pickle)
        if len(others) > 1:
            raise InputNotFoundError(
                f"{path} holds several .safetensors files but no index; pass one file or add "
                f"{SAFE_INDEX}"
            )
        raise InputNotFoundError(
            f"{path} holds no model weights ({SAFE_WEIGHTS} or {SAFE_INDEX}); check the path"
        )

    @classmethod
    def _from_files(
        cls, path: Path, files: list[Path], directory: Path | None, index_path: Path | None
    ) -> Checkpoint:
        headers = [read_header(f) for f in files]
        infos: dict[str, TensorInfo] = {}
        for header in headers:
            for name, info in header.tensors.items():
                if name in infos:
                    raise CorruptFileError(f"tensor {name!r} appears in two shards of {path}")
                infos[name] = info
        return cls(path, infos, headers, directory, index_path)

    @classmethod
    def _from_index(cls, directory: Path, index_path: Path) -> Checkpoint:
        weight_map = _load_index(index_path)
        shards: dict[str, Path] = {}
        for tensor, shard in weight_map.items():
            if not isinstance(tensor, str):
                raise CorruptFileError(f"{index_path} has a non-string tensor name")
            shards.setdefault(shard, _check_shard_name(directory, shard, index_path))
        headers: dict[str, SafetensorsHeader] = {}
        unnamed = sorted(
            p.name for p in directory.glob("*.safetensors") if p.name not in shards and p.is_file()
        )
        for shard, shard_path in shards.items():
            refuse_special_file(shard_path)
            if not shard_path.is_file():
                raise InputNotFoundError(
                    f"{index_path} names shard {shard!r}, which is missing from {directory}; "
                    "the download may be incomplete"
                )
            headers[shard] = read_header(shard_path)
        infos: dict[str, TensorInfo] = {}
        for tensor, shard in weight_map.items():
            info = headers[shard].tensors.get(tensor)
            if info is None:
                raise CorruptFileError(
                    f"{index_path} says {tensor!r} is in {shard}, but that shard has no such tensor"
                )
            infos[tensor] = info
        if unnamed:  # only once the index itself is valid: an error, when there is one, comes alone
            log.warning(
                "warning: %s does not name %s in %s; %s ignored (a leftover, or an incomplete index?)",
                index_path.name, ", ".join(unnamed), directory, "it is" if len(unnamed) == 1 else "they are",
            )
        ordered = dict(sorted(infos.items(), key=lambda kv: (str(kv[1].file), kv[1].data_offsets)))
        return cls(directory, ordered, list(headers.values()), directory, index_path)

    # ------------------------------------------------------------- inspection
    def names(self) -> list[str]:
        """Tensor names in storage order (sequential reads when streamed)."""
        return list(self._infos)

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.path}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    @property
    def files(self) -> list[Path]:
        return [h.path for h in self._headers]

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def metadata(self) -> dict[str, str]:
        """The `__metadata__` of the first file (shards of one checkpoint share it)."""
        return dict(self._headers[0].metadata) if self._headers else {}

    def fingerprint(self) -> str:
        """sha256 over the index (if any) and every header: identifies the checkpoint's layout."""
        digest = hashlib.sha256()
        if self.index_path is not None:
            digest.update(self.index_path.read_bytes())
        for header in sorted(self._headers, key=lambda h: h.path.name):
            digest.update(header.path.name.encode())
            digest.update(header.raw)
        return digest.hexdigest()

    def config(self) -> dict | None:
        """The model's config.json, if the checkpoint is a directory that has one."""
        if self.directory is None or not (self.directory / "config.json").is_file():
            return None
        try:
            return json.loads((self.directory / "config.json").read_text(encoding="utf-8-sig"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"{self.directory / 'config.json'} is not valid JSON ({exc})") from None

    def companion_files(self) -> list[Path]:
        """Config, generation config and tokenizer files to copy beside any output."""
        if self.directory is None:
            return []
        return [self.directory / n for n in COMPANION_FILES if (self.directory / n).is_file()]

    # ---------------------------------------------------------------- reading
    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor in its stored dtype."""
        info = self.info(name)
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = _open_pread(info.file)
            except Exception as exc:  # safetensors raises its own error types
                raise CorruptFileError(f"{info.file} cannot be opened by safetensors ({exc})") from None
            self._handles[info.file] = handle
        tensor = handle.get_tensor(name)
        return tensor.to(device) if str(device) != "cpu" else tensor

    def raw_location(self, name: str) -> tuple[Path, int] | None:
        """File and absolute byte offset of a tensor's little-endian data, for byte-level
        streaming (`read_into`, `CheckpointWriter.copy_raw`); None where the bytes are not
        the tensor as stored (pickle checkpoints, a big-endian host)."""
        info = self.info(name)
        start = self._data_start.get(info.file)
        if start is None or sys.byteorder != "little":
            return None
        return info.file, start + info.data_offsets[0]

    def read_into(self, name: str, buffer: memoryview, offset: int = 0) -> None:
        """Fill `buffer` with the tensor's stored bytes from byte `offset` on (pread(2), into
        memory the caller reuses: no allocation and no page faults per read)."""
        where = self.raw_location(name)
        if where is None:
            raise ValueError(f"{name}: raw reads need a safetensors file on a little-endian host")
        info = self.info(name)
        view = flat_bytes(buffer)
        size = len(view)
        if offset < 0 or offset + size > info.nbytes:
            raise ValueError(f"{name}: bytes {offset}..{offset + size} lie outside its {info.nbytes} bytes")
        with self._fds_lock:
            fd = self._fds.get(where[0])
            if fd is None:
                fd = self._fds[where[0]] = os.open(where[0], os.O_RDONLY)
        done = 0
        while done < size:
            got = os.preadv(fd, [view[done:]], where[1] + offset + done)
            if got == 0:
                raise CorruptFileError(f"{where[0]} ends inside tensor {name}; re-download or re-export it")
            done += got

    def read_cast(self, name: str, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor cast to `dtype` on the CPU, read a block at a time into reused per-thread
        staging memory (`read_into`): the stored-dtype copy `get` would allocate (and fault in)
        is never made. `out` (contiguous, this shape and dtype) receives it if given, so a
        caller can recycle memory. Where raw reads are impossible, `get` then a cast."""
        info = self.info(name)
        if out is None:
            out = torch.empty(info.shape, dtype=dtype)
        elif tuple(out.shape) != tuple(info.shape) or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"read_cast: out must be a contiguous {dtype} tensor of shape {list(info.shape)}")
        if self.raw_location(name) is None:
            return out.copy_(self.get(name))
        stored = info.torch_dtype
        flat = out.view(-1)
        staging = _STAGING.__dict__.setdefault("staging", Staging())
        for a in range(0, flat.numel(), _STAGING_ELEMENTS):
            part = staging.get("read", stored, min(_STAGING_ELEMENTS, flat.numel() - a))
            self.read_into(name, as_bytes(part), a * stored.itemsize)
            flat[a : a + part.numel()].copy_(part)
        return out

    def close(self) -> None:
        self._handles.clear()
        with self._fds_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path}, {len(self)} tensors, {self.total_bytes / 1e6:.1f} MB)"


class PickleCheckpoint(Checkpoint):
    """A pickle checkpoint loaded with weights_only=True, one shard in memory at a time."""

    def __init__(self, path: Path, shard_of: dict[str, Path], directory: Path | None, index_path: Path | None):
        self._shard_of = shard_of
        self._cached: tuple[Path, dict[str, torch.Tensor]] | None = None
        infos: dict[str, TensorInfo] = {}
        for shard in dict.fromkeys(shard_of.values()):
            for name, tensor in self._load(shard).items():
                if shard_of.get(name) == shard:
                    infos[name] = TensorInfo(
                        name, dtype_name(tensor.dtype), tuple(tensor.shape),
                        (0, tensor.numel() * DTYPE_SIZES[dtype_name(tensor.dtype)]), shard,
                    )
        super().__init__(path, infos, [], directory, index_path)

    def _load(self, shard: Path) -> dict[str, torch.Tensor]:
        if self._cached is None or self._cached[0] != shard:
            self._cached = None
            state = load_pickle_weights(shard)
            if not isinstance(state, dict):
                raise CorruptFileError(f"{shard} does not hold a state dict")
            self._cached = (shard, state)
        return self._cached[1]

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        info = self.info(name)
        return self._load(info.file)[name].contiguous().to(device)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for info in self._infos.values():
            digest.update(f"{info.name}:{info.dtype}:{info.shape}".encode())
        return digest.hexdigest()


def _open_pickle(path: Path, allow_pickle: bool) -> Checkpoint:
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path} is a pickle checkpoint, which can run code when loaded; convert it to safetensors "
            "or pass --allow-pickle to load it with weights_only=True"
        )
    if path.is_file() and not path.name.endswith(".index.json"):
        state = load_pickle_weights(path)
        if not isinstance(state, dict):
            raise CorruptFileError(f"{path} does not hold a state dict")
        return PickleCheckpoint(path, {k: path for k in state}, path.parent, None)
    directory = path if path.is_dir() else path.parent
    index_path = path if path.is_file() else directory / PICKLE_INDEX
    if index_path.is_file():
        weight_map = _load_index(index_path)
        shard_of = {t: _check_shard_name(directory, s, index_path) for t, s in weight_map.items()}
        for shard in set(shard_of.values()):
            refuse_special_file(shard)
            if not shard.is_file():
                raise InputNotFoundError(f"{index_path} names {shard.name}, which is missing")
        return PickleCheckpoint(directory, shard_of, directory, index_path)
    single = directory / PICKLE_WEIGHTS
    state = load_pickle_weights(single)
    if not isinstance(state, dict):
        raise CorruptFileError(f"{single} does not hold a state dict")
    return PickleCheckpoint(directory, {k: single for k in state}, directory, None)
