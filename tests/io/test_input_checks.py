"""Input checks of the readers: JSONL encoding and special files, unnamed shards, pickle refusals, the adapter schema."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from surgery.errors import CorruptFileError, DataError, InputNotFoundError
from surgery.io.adapter import LoraAdapter
from surgery.io.adapter_schema import SCHEMA, validate_adapter_config
from surgery.io.checkpoint import Checkpoint
from surgery.io.jsonl import read_jsonl
from surgery.io.pickled import blocked_global, load_pickle_weights


# ----------------------------------------------------------------------------- JSONL
def test_jsonl_with_a_utf8_bom_is_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "caf\u00e9"}\n{"prompt": "b"}\n'.encode())
    assert read_jsonl(path) == [{"prompt": "caf\u00e9"}, {"prompt": "b"}]


def test_invalid_utf8_names_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "b\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not UTF-8 text \(invalid start byte at byte 13 of the line\)"):
        read_jsonl(path)


def test_a_fifo_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)  # opening it would block: the check must come first
    with pytest.raises(DataError, match=r"is not a regular file \(it is a FIFO \(named pipe\)\)"):
        read_jsonl(fifo)
    with pytest.raises(InputNotFoundError, match="is not a regular file"):
        Checkpoint.open(fifo)
    adapter = tmp_path / "ad"
    adapter.mkdir()
    os.mkfifo(adapter / "adapter_config.json")
    with pytest.raises(InputNotFoundError, match="adapter_config.json is not a regular file"):
        LoraAdapter.open(adapter)


# ----------------------------------------------------------------------------- checkpoints
def test_a_shard_the_index_does_not_name_is_warned_about(tmp_path, caplog):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00001.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "stray.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    with caplog.at_level(logging.WARNING, logger="surgery.io.checkpoint"):
        ckpt = Checkpoint.open(tmp_path)
    assert ckpt.names() == ["a"]
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: model.safetensors.index.json does not name stray.safetensors in {tmp_path}; it is ignored "
        "(a leftover, or an incomplete index?)"
    ]


def test_index_and_config_with_bom_are_read(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s.safetensors")
    index = json.dumps({"weight_map": {"a": "s.safetensors"}}).encode()
    (tmp_path / "model.safetensors.index.json").write_bytes(b"\xef\xbb\xbf" + index)
    (tmp_path / "config.json").write_bytes(b"\xef\xbb\xbf" + b'{"model_type": "llama"}')
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.names() == ["a"] and ckpt.config() == {"model_type": "llama"}


@pytest.mark.parametrize("text,name", [
    ("Weights only load failed...\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.",
     "posix.system"),
    ("WeightsUnpickler error: Unsupported global: GLOBAL builtins.eval was not an allowed global by default.",
     "builtins.eval"),
    ("Unsupported operand 149", None),
])
def test_blocked_global_is_read_from_torch_text(text, name):
    assert blocked_global(text) == name


def test_legacy_pickle_loads_without_mmap(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert torch.equal(load_pickle_weights(tmp_path / "pytorch_model.bin")["w"], state["w"])
    ckpt = Checkpoint.open(tmp_path, allow_pickle=True)
    assert ckpt.names() == ["w"] and torch.equal(ckpt.get("w"), state["w"])


def test_damaged_pickle_is_one_line(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CorruptFileError) as info:
        Checkpoint.open(tmp_path, allow_pickle=True)
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)


# ----------------------------------------------------------------------------- adapter schema
@pytest.mark.parametrize("options", [
    {}, {"use_rslora": True, "use_dora": True}, {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 4}},
    {"target_modules": "all-linear", "lora_dropout": 0.05, "bias": "lora_only"},
    {"layers_to_transform": [0, 1], "fan_in_fan_out": True, "modules_to_save": ["lm_head"]},
])
def test_every_config_peft_writes_passes_with_its_own_values(tmp_path, options):
    from peft import LoraConfig

    LoraConfig(**{"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **options}).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    values = validate_adapter_config(config, tmp_path / "adapter_config.json")
    for field in SCHEMA:
        if field.name in config and config[field.name] is not None and not isinstance(config[field.name], float):
            assert values[field.name] == config[field.name], field.name
    assert values["r"] == 4 and values["lora_alpha"] == 16.0
    assert values["use_rslora"] is bool(options.get("use_rslora", False))


def test_missing_lora_alpha_takes_peft_default_with_a_warning(tmp_path, caplog):
    from peft import LoraConfig

    with caplog.at_level(logging.WARNING, logger="surgery.io.adapter_schema"):
        values = validate_adapter_config({"r": 4}, tmp_path / "adapter_config.json")
    assert values["lora_alpha"] == LoraConfig().lora_alpha == 8
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {tmp_path / 'adapter_config.json'} has no lora_alpha; using peft's default 8"
    ]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 65505.0])
def test_lora_alpha_out_of_range(tmp_path, value):
    with pytest.raises(CorruptFileError, match="invalid value for lora_alpha"):
        validate_adapter_config({"lora_alpha": value}, tmp_path / "adapter_config.json")
    assert validate_adapter_config({"lora_alpha": -65504}, tmp_path)["lora_alpha"] == -65504.0
