"""Validated parsing of safetensors headers, without reading any tensor data.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
`{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}`, then the data.
Everything a planner needs (names, dtypes, shapes, bytes) comes from the header,
so a whole checkpoint can be described while holding no tensor in memory.
Malformed input of any kind raises `CorruptFileError`, never anything else.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.errors import CorruptFileError, InputNotFoundError

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces

DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}

_TORCH_BY_NAME: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _TORCH_BY_NAME[_name] = getattr(torch, _attr)
_NAME_BY_TORCH: dict[torch.dtype, str] = {v: k for k, v in _TORCH_BY_NAME.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (e.g. "BF16")."""
    try:
        return _TORCH_BY_NAME[name]
    except KeyError:
        raise CorruptFileError(f"safetensors dtype {name!r} is not supported by this torch") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype name of a torch dtype."""
    try:
        return _NAME_BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: enough to plan without loading it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: tensors in file order, metadata, and where the data starts."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    raw: bytes  # the 8-byte length and the JSON, for fingerprints

    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


def _corrupt(path: Path, what: str) -> CorruptFileError:
    return CorruptFileError(
        f"{path} is not a valid safetensors file ({what}); re-download or re-export it"
    )


def parse_header(raw_prefix: bytes, file_size: int, path: Path) -> SafetensorsHeader:
    """Parse and validate a header from the first bytes of a file of `file_size` bytes.

    `raw_prefix` must hold at least the 8-byte length and the JSON it announces.
    """
    if file_size < 8 or len(raw_prefix) < 8:
        raise _corrupt(path, "shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw_prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise _corrupt(path, f"header length {n} exceeds {MAX_HEADER_BYTES}")
    if 8 + n > file_size or len(raw_prefix) < 8 + n:
        raise _corrupt(path, f"header length {n} runs past the end of the file, which looks truncated")
    try:
        decoded = json.loads(raw_prefix[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _corrupt(path, f"header is not JSON: {type(exc).__name__}") from None
    if not isinstance(decoded, dict):
        raise _corrupt(path, "header is not a JSON object")

    metadata = decoded.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, "__metadata__ must map strings to strings")

    data_size = file_size - 8 - n
    tensors: list[TensorInfo] = []
    for name, entry in decoded.items():
        if not isinstance(entry, dict):
            raise _corrupt(path, f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        info = TensorInfo(name, dtype, tuple(shape), (offsets[0], offsets[1]), path)
        if offsets[1] - offsets[0] != info.nbytes:
            raise _corrupt(path, f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, its shape needs {info.nbytes}")
        if offsets[1] > data_size:
            raise _corrupt(path, f"tensor {name!r} ends past the end of the file, which looks truncated")
        tensors.append(info)

    tensors.sort(key=lambda t: t.data_offsets)
    position = 0
    for info in tensors:
        if info.data_offsets[0] != position:
            raise _corrupt(path, f"tensor {info.name!r} overlaps another or leaves a hole")
        position = info.data_offsets[1]

    return SafetensorsHeader(
        path=path,
        tensors={t.name: t for t in tensors},
        metadata=dict(metadata),
        data_start=8 + n,
        raw=bytes(raw_prefix[: 8 + n]),
    )


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file (no tensor data is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) == 8:
                (n,) = struct.unpack("<Q", prefix)
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    prefix += handle.read(n)
    except FileNotFoundError:
        raise InputNotFoundError(f"{path} does not exist; check the path") from None
    except IsADirectoryError:
        raise InputNotFoundError(f"{path} is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise InputNotFoundError(f"{path} cannot be read (permission denied); fix its permissions") from None
    return parse_header(prefix, size, path)
