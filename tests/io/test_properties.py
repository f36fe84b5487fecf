"""Property tests: header and index parsing on random and malformed bytes.

Whatever the bytes, parsing either succeeds with a self-consistent result or
raises `CorruptFileError` (index problems may also be `UnsafePathError` or
`InputNotFoundError`); it never crashes with anything else.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from surgery.errors import CorruptFileError, InputNotFoundError, UnsafePathError
from surgery.io.checkpoint import Checkpoint
from surgery.io.header import parse_header, read_header

PATH = Path("fuzz.safetensors")
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I8", "BOOL", "X9"]) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 200), min_size=0, max_size=3) | json_values,
    },
)
headers = st.dictionaries(st.text(max_size=6), entry | json_values, max_size=4)


def _check(raw: bytes) -> None:
    try:
        header = parse_header(raw, len(raw), PATH)
    except CorruptFileError:
        return
    data = len(raw) - header.data_start
    for info in header.tensors.values():
        assert 0 <= info.data_offsets[0] <= info.data_offsets[1] <= data
        assert info.data_offsets[1] - info.data_offsets[0] == info.nbytes


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes(raw):
    _check(raw)


@given(headers, st.binary(max_size=64), st.integers(-3, 3))
@settings(max_examples=400, deadline=None)
def test_structured_headers(header, data, skew):
    text = json.dumps(header).encode()
    _check(struct.pack("<Q", max(0, len(text) + skew)) + text + data)


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_mutated_real_file(data):
    raw = bytearray(save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _check(bytes(raw[:cut]))


def test_truncated_file_on_disk(tmp_path):
    raw = save({"a": torch.zeros(16)})
    (tmp_path / "t.safetensors").write_bytes(raw[:-5])
    try:
        read_header(tmp_path / "t.safetensors")
    except CorruptFileError as exc:
        assert "truncated" in str(exc)
    else:
        raise AssertionError("a truncated file was accepted")


shard_names = st.sampled_from(
    ["model-00001-of-00001.safetensors", "../x.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "",
     "C:\\x.safetensors", "missing.safetensors", "model.safetensors"]
) | st.text(max_size=10) | json_values
indexes = st.fixed_dictionaries(
    {}, optional={"metadata": json_values, "weight_map": st.dictionaries(st.sampled_from(["a", "b", "c"]), shard_names, max_size=3) | json_values}
) | json_values


@given(indexes)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_indexes(index):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "model-00001-of-00001.safetensors").write_bytes(save({"a": torch.zeros(2)}))
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
        try:
            ckpt = Checkpoint.open(root)
        except (CorruptFileError, UnsafePathError, InputNotFoundError):
            return
        for name in ckpt.names():
            assert ckpt.info(name).file.parent == root


@given(st.binary(max_size=200))
@settings(max_examples=100, deadline=None)
def test_random_index_bytes(raw):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "model.safetensors.index.json").write_bytes(raw)
        try:
            Checkpoint.open(root)
        except (CorruptFileError, UnsafePathError, InputNotFoundError):
            pass
