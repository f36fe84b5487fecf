"""The streaming writer against safetensors' own reader and the HF sharding rules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from surgery.errors import OutputExistsError
from surgery.io.checkpoint import Checkpoint
from surgery.io.writer import CheckpointWriter, TensorSpec, plan_shards, shard_names, write_tensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(3, 11, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(13, generator=g).to(torch.float16),
        "d.scalar": torch.tensor(2.5),
        "e.empty": torch.zeros(0, 4),
        "f.ids": torch.arange(6, dtype=torch.int64),
        "g.mask": torch.tensor([True, False, True]),
    }


def _write(out, tensors, shard_size, order=None, **kw):
    specs = [TensorSpec.like(n, t) for n, t in tensors.items()]
    with CheckpointWriter(out, specs, shard_size=shard_size, metadata={"k": "v"}, **kw) as writer:
        for name in order or list(tensors):
            writer.write(name, tensors[name])
    return writer


def test_single_file_roundtrip_keeps_dtypes_and_metadata(tmp_path):
    tensors = _tensors()
    _write(tmp_path / "out", tensors, shard_size=10**9, order=list(reversed(tensors)))
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["model.safetensors"]
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype
        assert torch.equal(loaded[name], t)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


def test_sharding_follows_hf_rules(tmp_path):
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    tensors["big"] = torch.ones(100)  # 400 bytes: larger than the limit, a shard of its own
    _write(tmp_path / "out", tensors, shard_size=100)
    # greedy: [t0 t1] [t2 t3] [t4] [big] (t4+big would exceed 100)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 40 + 400
    names = shard_names("model.safetensors", 4)
    assert names[0] == "model-00001-of-00004.safetensors"
    assert index["weight_map"] == {
        "t0": names[0], "t1": names[0], "t2": names[1], "t3": names[1], "t4": names[2], "big": names[3],
    }
    ckpt = Checkpoint.open(tmp_path / "out")
    for name, t in tensors.items():
        assert torch.equal(ckpt.get(name), t)


def test_plan_shards_never_splits_and_keeps_order():
    specs = [TensorSpec(f"x{i}", torch.float32, (n,)) for i, n in enumerate([3, 30, 2, 2, 50])]
    plan = plan_shards(specs, 40)  # bytes 12, 120, 8, 8, 200
    assert [[s.name for s in shard] for shard in plan] == [["x0"], ["x1"], ["x2", "x3"], ["x4"]]


def test_existing_output_refused_then_forced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        _write(tmp_path / "out", _tensors(), shard_size=10**9)
    assert (tmp_path / "out" / "keep").exists()
    _write(tmp_path / "out", _tensors(), shard_size=10**9, force=True)
    assert not (tmp_path / "out" / "keep").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_error_mid_write_leaves_nothing(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec.like(n, t) for n, t in tensors.items()]
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "sub" / "out", specs) as writer:
            writer.write("a.weight", tensors["a.weight"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_missing_tensor_is_an_error_and_leaves_nothing(tmp_path):
    tensors = _tensors()
    with pytest.raises(RuntimeError, match="never written"):
        _write(tmp_path / "out", tensors, shard_size=10**9, order=["a.weight"])
    assert list(tmp_path.iterdir()) == []


def test_wrong_shape_rejected(tmp_path):
    specs = [TensorSpec("w", torch.float32, (2, 2))]
    with pytest.raises(ValueError, match="planned"):
        with CheckpointWriter(tmp_path / "out", specs) as writer:
            writer.write("w", torch.zeros(4))
    assert not (tmp_path / "out").exists()


def test_companion_and_extra_files_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    _write(tmp_path / "out", {"w": torch.ones(2)}, shard_size=10**9,
           copy_files_from=[src / "config.json"], extra_files={"report.json": "{}"})
    assert (tmp_path / "out" / "config.json").read_text() == '{"a": 1}'
    assert (tmp_path / "out" / "report.json").read_text() == "{}"


def test_write_tensors_single_file(tmp_path):
    tensors = {"m": torch.tensor([[True, False]]), "u": torch.randn(4, 2)}
    write_tensors(tmp_path / "mask.safetensors", tensors, metadata={"surgery.method": "x"})
    loaded = load_file(tmp_path / "mask.safetensors")
    assert torch.equal(loaded["m"], tensors["m"]) and torch.equal(loaded["u"], tensors["u"])
    with pytest.raises(OutputExistsError):
        write_tensors(tmp_path / "mask.safetensors", tensors)


def test_raw_copies_and_partial_writes_reproduce_the_source(tmp_path):
    """copy_raw (file to file) and write_bytes of blocks read with read_into reproduce every
    tensor exactly, in every dtype, across shard files (read back by safetensors)."""
    tensors = _tensors()
    src = _write(tmp_path / "src", tensors, 200).out  # sharded: raw offsets cross shard files
    ckpt = Checkpoint.open(src)
    specs = [TensorSpec.like(name, ckpt.info(name)) for name in ckpt.names()]
    with CheckpointWriter(tmp_path / "out", specs, shard_size=150) as writer:
        for i, name in enumerate(ckpt.names()):
            nbytes = ckpt.info(name).nbytes
            if i % 2:
                writer.copy_raw(name, *ckpt.raw_location(name))
                continue
            buffer = bytearray(3)  # an odd block size: blocks end mid-element
            for offset in range(0, nbytes, 3):
                view = memoryview(buffer)[: min(3, nbytes - offset)]
                ckpt.read_into(name, view, offset)
                writer.write_bytes(name, offset, view)
    out = Checkpoint.open(tmp_path / "out")
    for name, expected in tensors.items():
        got = out.get(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


def test_partial_writes_are_bounded_and_must_complete(tmp_path):
    spec = TensorSpec("w", torch.float32, (4,))
    with pytest.raises(RuntimeError, match="never written"):
        with CheckpointWriter(tmp_path / "out", [spec]) as writer:
            writer.write_bytes("w", 0, memoryview(bytes(8)))  # half of its 16 bytes
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="outside"):
        with CheckpointWriter(tmp_path / "out", [spec]) as writer:
            writer.write_bytes("w", 12, memoryview(bytes(8)))
    assert not (tmp_path / "out").exists()


def test_read_into_refuses_bytes_outside_the_tensor(tmp_path):
    src = _write(tmp_path / "src", _tensors(), 10_000).out
    ckpt = Checkpoint.open(src)
    with pytest.raises(ValueError, match="outside"):
        ckpt.read_into("a.weight", memoryview(bytearray(8)), 7 * 5 * 4 - 4)


def test_write_cast_equals_casting_the_whole_tensor(tmp_path):
    """write_cast (blocks cast into reused staging) writes exactly `tensor.to(planned dtype)`,
    including a last partial block, round-to-nearest-even ties and non-finite values."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 29, generator=g) * 100
    w[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1 + 2**-8])  # a bf16 tie
    specs = [TensorSpec("b", torch.bfloat16, (37, 29)), TensorSpec("h", torch.float16, (37, 29))]
    with CheckpointWriter(tmp_path / "out", specs) as writer:
        writer.write_cast("b", w, block=100)  # 1073 elements: 10 full blocks and a partial one
        writer.write_cast("h", w, block=100)
    out = Checkpoint.open(tmp_path / "out")
    for name, dtype in (("b", torch.bfloat16), ("h", torch.float16)):
        got, expected = out.get(name), w.to(dtype)
        assert got.dtype == dtype
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), name  # bitwise, NaN included
