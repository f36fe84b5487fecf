"""The lazy checkpoint reader: layouts, header-only facts, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from surgery.errors import CorruptFileError, InputNotFoundError, PickleRefusedError, UnsafePathError
from surgery.io.checkpoint import Checkpoint
from surgery.io.header import read_header


def _save_sharded(directory, shards: dict[str, dict[str, torch.Tensor]]):
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, directory / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_single_file_and_directory(tmp_path):
    tensors = {"x": torch.randn(3, 4), "y": torch.randn(5).to(torch.bfloat16)}
    (tmp_path / "m").mkdir()
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    for path in (tmp_path / "m", tmp_path / "m" / "model.safetensors"):
        ckpt = Checkpoint.open(path)
        assert sorted(ckpt.names()) == ["x", "y"]
        assert ckpt.info("x").shape == (3, 4) and ckpt.info("x").nbytes == 48
        assert ckpt.info("y").dtype == "BF16" and ckpt.info("y").torch_dtype == torch.bfloat16
        assert ckpt.total_bytes == 48 + 10
        assert torch.equal(ckpt.get("y"), tensors["y"])


def test_sharded_reads_every_tensor_and_fingerprint_tracks_headers(tmp_path):
    _save_sharded(tmp_path / "m", {"a.safetensors": {"p": torch.ones(2)}, "b.safetensors": {"q": torch.zeros(3)}})
    ckpt = Checkpoint.open(tmp_path / "m")
    assert set(ckpt.names()) == {"p", "q"}
    assert torch.equal(ckpt.get("q"), torch.zeros(3))
    before = ckpt.fingerprint()
    save_file({"q": torch.zeros(4)}, tmp_path / "m" / "b.safetensors")
    assert Checkpoint.open(tmp_path / "m").fingerprint() != before


@pytest.mark.parametrize("bad", ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "C:\\x.safetensors"])
def test_index_shard_names_must_stay_inside(tmp_path, bad):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": bad}}))
    with pytest.raises(UnsafePathError, match="plain file name"):
        Checkpoint.open(tmp_path / "m")


def test_index_naming_missing_shard(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(InputNotFoundError, match="missing"):
        Checkpoint.open(tmp_path / "m")


def test_truncated_file(tmp_path):
    save_file({"w": torch.randn(100)}, tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-10])
    with pytest.raises(CorruptFileError, match="truncated"):
        Checkpoint.open(tmp_path / "t.safetensors")
    (tmp_path / "h.safetensors").write_bytes(raw[:20])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_header(tmp_path / "h.safetensors")


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="no model weights"):
        Checkpoint.open(tmp_path / "empty")


def test_pickle_refused_then_loaded_weights_only(tmp_path):
    (tmp_path / "m").mkdir()
    torch.save({"w": torch.arange(4.0)}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        Checkpoint.open(tmp_path / "m")
    ckpt = Checkpoint.open(tmp_path / "m", allow_pickle=True)
    assert ckpt.names() == ["w"] and torch.equal(ckpt.get("w"), torch.arange(4.0))


def test_read_cast_equals_get_then_cast(tmp_path, monkeypatch):
    """The staged read of bf16/fp16 tensors into fp32 equals `get(name).float()`, also across many
    staging blocks ending in a partial one, into a given `out`, and for a pickle checkpoint
    (no raw reads: `get` then a cast)."""
    from surgery.io import checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 33, generator=g).to(torch.bfloat16), "b": torch.randn(301, generator=g).half(),
               "c": torch.randn(2, 3, generator=g)}
    (tmp_path / "m").mkdir()
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    monkeypatch.setattr(checkpoint, "_STAGING_ELEMENTS", 77)
    monkeypatch.setattr(checkpoint, "_STAGING", __import__("threading").local())
    ckpt = Checkpoint.open(tmp_path / "m")
    for name, t in tensors.items():
        got = ckpt.read_cast(name, torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, t.float()), name
        out = torch.full(t.shape, 7.0)
        assert ckpt.read_cast(name, torch.float32, out=out) is out and torch.equal(out, t.float())
    with pytest.raises(ValueError, match="contiguous"):
        ckpt.read_cast("a", torch.float32, out=torch.empty(33, 7).t())
    with pytest.raises(ValueError, match="shape"):
        ckpt.read_cast("a", torch.float32, out=torch.empty(7, 32))
    torch.save(tensors, tmp_path / "p.bin")
    pickled = Checkpoint.open(tmp_path / "p.bin", allow_pickle=True)
    assert torch.equal(pickled.read_cast("a", torch.float32), tensors["a"].float())
