"""The adapter reader: key mapping, scaling rules and deltas against peft's own layers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery.errors import CorruptFileError, InputNotFoundError, PickleRefusedError, SurgeryError
from surgery.io.adapter import LoraAdapter, base_key_candidates, pattern_key, write_adapter
from tests.factories import TARGETS


def _peft_model(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)


@pytest.mark.parametrize(
    "arch,lora",
    [
        ("llama", {"use_rslora": True, "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"o_proj": 5}}),
        ("gpt2", {"fan_in_fan_out": True}),
        ("llama", {"target_modules": ["q_proj", "embed_tokens"], "r": 3, "lora_alpha": 7}),
    ],
)
def test_delta_matches_peft_get_delta_weight(built, arch, lora):
    lora = dict(lora)
    targets = lora.pop("target_modules", TARGETS[arch])
    base = built("base", arch, arch=arch)
    key = f"{arch}-delta-{sorted(lora)}-{len(targets)}"
    adapter_dir = built("adapter", key, base=base, target_modules=targets, **lora)
    adapter = LoraAdapter.open(adapter_dir)
    peft_model = _peft_model(base, adapter_dir)
    assert adapter.modules
    for path, m in adapter.modules.items():
        layer = peft_model.base_model.model.get_submodule(path)
        assert m.scaling == pytest.approx(layer.scaling["default"])
        assert m.r == layer.r["default"]
        want = layer.get_delta_weight("default")
        got = adapter.delta(m)
        assert got.dtype == torch.float32 and tuple(got.shape) == adapter.delta_shape(m)
        assert torch.allclose(got, want, atol=1e-6), path
        assert tuple(got.shape) == tuple(layer.get_base_layer().weight.shape)


def test_module_fields(built):
    base = built("base", "llama", arch="llama")
    adapter_dir = built("adapter", "fields", base=base, target_modules=["q_proj", "embed_tokens"], use_dora=True,
                        use_rslora=True, r=4, lora_alpha=6)
    adapter = LoraAdapter.open(adapter_dir)
    q = adapter.modules["model.layers.1.self_attn.q_proj"]
    assert q.base_key == "model.layers.1.self_attn.q_proj.weight"
    assert q.a_key == "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    assert q.b_key == "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    assert q.magnitude_key == "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
    assert (q.kind, q.r, q.alpha, q.scaling) == ("linear", 4, 6.0, 6 / math.sqrt(4))
    emb = adapter.modules["model.embed_tokens"]
    assert emb.kind == "embedding" and emb.a_key.endswith("lora_embedding_A")
    # peft saves the embedding's base layer beside its LoRA: a full replacement tensor
    assert adapter.replacements == {
        "model.embed_tokens.weight": "base_model.model.model.embed_tokens.base_layer.weight"
    }
    assert adapter.targets() == ["embed_tokens", "q_proj"]
    assert len(adapter.fingerprint()) == 64


@given(
    name=st.sampled_from(["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "lm_head",
                          "transformer.h.3.attn.c_attn", "model.layers.1.self_attn.k_proj"]),
    patterns=st.lists(st.sampled_from(["q_proj", "proj", r"layers\.1\..*", "down_proj", "c_attn", "h.3.attn.c_attn",
                                       "layers.11.mlp.down_proj", "k", "lm_head"]), max_size=4, unique=True),
)
@settings(max_examples=200, deadline=None)
def test_pattern_rule_is_peft_rule(name, patterns):
    from peft.utils.other import get_pattern_key

    ours = pattern_key(patterns, name)
    theirs = get_pattern_key(patterns, name)
    assert (ours if ours is not None else name) == theirs


def test_base_key_candidates():
    names = ["model.layers.0.q.weight", "lm_head.weight"]
    assert base_key_candidates("model.layers.0.q.weight", names)[:2] == ["model.layers.0.q.weight", "layers.0.q.weight"]
    assert "model.layers.0.q.weight" in base_key_candidates("layers.0.q.weight", names)


def test_pickle_refused_then_loaded(built, tmp_path):
    from safetensors.torch import load_file

    base = built("base", "llama", arch="llama")
    src = built("adapter", "pickle-src", base=base, target_modules=["q_proj"])
    tensors = load_file(str(src / "adapter_model.safetensors"))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    torch.save(tensors, legacy / "adapter_model.bin")
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        LoraAdapter.open(legacy)
    adapter = LoraAdapter.open(legacy, allow_pickle=True)
    reference = LoraAdapter.open(src)
    for path, m in reference.modules.items():
        assert torch.equal(adapter.delta(adapter.modules[path]), reference.delta(m))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1}))
    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(CorruptFileError, match="weights_only"):
        LoraAdapter.open(tmp_path, allow_pickle=True)


@pytest.mark.parametrize(
    "files,error,message",
    [
        ({}, InputNotFoundError, "no adapter_config.json"),
        ({"adapter_config.json": "{not json"}, CorruptFileError, "not valid JSON"),
        ({"adapter_config.json": "[1, 2]"}, CorruptFileError, "not a JSON object"),
        ({"adapter_config.json": '{"peft_type": "IA3"}'}, SurgeryError, "only LoRA"),
        ({"adapter_config.json": '{"peft_type": "LORA"}'}, InputNotFoundError, "no adapter_model.safetensors"),
        ({"adapter_config.json": '{"peft_type": "LORA"}', "adapter_model.safetensors": b"\x10\x00"},
         CorruptFileError, "not a valid safetensors file"),
    ],
)
def test_bad_adapter_directories(tmp_path, files, error, message):
    for name, content in files.items():
        target = tmp_path / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    with pytest.raises(error, match=message):
        LoraAdapter.open(tmp_path)


def test_missing_adapter_path(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        LoraAdapter.open(tmp_path / "nope")


def test_rank_disagreeing_with_config_is_corrupt(tmp_path):
    tensors = {
        "base_model.model.layers.0.q.lora_A.weight": torch.zeros(4, 8),
        "base_model.model.layers.0.q.lora_B.weight": torch.zeros(8, 4),
    }
    write_adapter(tmp_path / "a", {"r": 8, "lora_alpha": 8, "target_modules": ["q"]}, tensors)
    with pytest.raises(CorruptFileError, match="rank 4 but adapter_config.json implies r=8"):
        LoraAdapter.open(tmp_path / "a")


def test_missing_lora_b_is_corrupt(tmp_path):
    write_adapter(tmp_path / "a", {"r": 4}, {"base_model.model.layers.0.q.lora_A.weight": torch.zeros(4, 8)})
    with pytest.raises(CorruptFileError, match="no lora_B"):
        LoraAdapter.open(tmp_path / "a")


def test_write_adapter_round_trip_loads_in_peft(built, tmp_path):
    from safetensors import safe_open

    base = built("base", "llama", arch="llama")
    src_dir = built("adapter", "roundtrip", base=base, target_modules=["q_proj", "v_proj"], use_rslora=True)
    src = LoraAdapter.open(src_dir)
    config = {k: src.config[k] for k in ("r", "lora_alpha", "use_rslora", "target_modules")}
    tensors = {k: src.get(k) for k in src.names()}
    out = write_adapter(tmp_path / "copy", config, tensors, metadata={"surgery.method": "test"})
    copy = LoraAdapter.open(out)
    for path, m in src.modules.items():
        assert torch.equal(copy.delta(copy.modules[path]), src.delta(m))
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        assert handle.metadata()["format"] == "pt"
    ours = _peft_model(base, out).merge_and_unload().state_dict()
    theirs = _peft_model(base, src_dir).merge_and_unload().state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with pytest.raises(Exception, match="already exists"):
        write_adapter(out, config, tensors)


@pytest.mark.parametrize("bad", [{"r": "four"}, {"r": 4, "rank_pattern": {"q[": 2}}, {"r": 4, "lora_alpha": [1]}])
def test_invalid_config_values_are_corrupt(tmp_path, bad):
    tensors = {
        "base_model.model.layers.0.q.lora_A.weight": torch.zeros(4, 8),
        "base_model.model.layers.0.q.lora_B.weight": torch.zeros(8, 4),
    }
    write_adapter(tmp_path / "a", {"target_modules": ["q"], **bad}, tensors)
    with pytest.raises(CorruptFileError, match="invalid value"):
        LoraAdapter.open(tmp_path / "a")
