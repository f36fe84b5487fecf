"""Streaming merge against peft's own `merge_and_unload`, across architectures and LoRA flavours."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from surgery.errors import MismatchError, NonFiniteError, SurgeryError
from surgery.io.adapter import LoraAdapter
from surgery.io.checkpoint import Checkpoint
from surgery.io.merge import merge_adapter
from surgery.io.writer import write_tensors
from tests.factories import TARGETS, peft_merged_state

CASES = {
    # name: (arch, lora kwargs)
    "llama": ("llama", {}),
    "llama-rslora-patterns": (
        "llama",
        {"use_rslora": True, "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
         "alpha_pattern": {"v_proj": 3, "up_proj": 32}},
    ),
    "llama-dora": ("llama", {"use_dora": True}),
    "qwen2": ("qwen2", {}),
    "mistral-dora-rslora": ("mistral", {"use_dora": True, "use_rslora": True, "r": 8}),
    "gpt2-conv1d": ("gpt2", {"fan_in_fan_out": True}),
    "gpt2-conv1d-dora": ("gpt2", {"fan_in_fan_out": True, "use_dora": True}),
    "gpt2-lora-bias": ("gpt2", {"fan_in_fan_out": True, "lora_bias": True}),
    "gemma-tied-lm-head": ("gemma", {"extra_targets": ["lm_head"]}),
    "gemma-tied-embedding": ("gemma", {"extra_targets": ["embed_tokens"]}),
    "llama-embedding": ("llama", {"extra_targets": ["embed_tokens"]}),
    "llama-embedding-dora": ("llama", {"extra_targets": ["embed_tokens"], "use_dora": True}),
    "llama-modules-to-save": ("llama", {"modules_to_save": ["lm_head"]}),
}


def _adapter(built, name: str):
    arch, lora = CASES[name]
    lora = dict(lora)
    targets = TARGETS[arch] + lora.pop("extra_targets", [])
    base = built("base", arch, arch=arch)
    adapter = built("adapter", name, base=base, target_modules=targets, **lora)
    return base, adapter


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_merge_equals_peft_merge_and_unload(built, tmp_path, name):
    base, adapter = _adapter(built, name)
    report = merge_adapter(base, adapter, tmp_path / "out")
    reference = peft_merged_state(base, adapter)
    merged = Checkpoint.open(tmp_path / "out")
    base_ckpt = Checkpoint.open(base)
    assert report.merged, "nothing was merged"
    if name.startswith("gemma-tied"):
        # peft merges into the one shared tensor, changing both the lookup and the head; surgery
        # unties them so each keeps what the adapter did (logits checked below)
        assert set(merged.names()) == set(base_ckpt.names()) | {"lm_head.weight"}
        assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
        emb, head = merged.get("model.embed_tokens.weight"), merged.get("lm_head.weight")
        if name.endswith("lm-head"):
            assert torch.equal(emb, base_ckpt.get("model.embed_tokens.weight"))
            assert _max_diff(head, reference["lm_head.weight"]) <= 1e-5
        else:
            assert torch.equal(head, base_ckpt.get("model.embed_tokens.weight"))
            assert _max_diff(emb, reference["model.embed_tokens.weight"]) <= 1e-5
    else:
        assert set(merged.names()) == set(base_ckpt.names())
    changed = 0
    for key in base_ckpt.names():
        if key != "model.embed_tokens.weight" or not name.startswith("gemma-tied"):
            assert _max_diff(merged.get(key), reference[key]) <= 1e-5, key
        changed += not torch.equal(merged.get(key), base_ckpt.get(key))
    assert changed >= len(report.merged) - name.startswith("gemma-tied")
    if CASES[name][1].get("use_dora"):
        assert report.dora


@pytest.mark.parametrize(
    "name", ["llama-dora", "gpt2-lora-bias", "gemma-tied-lm-head", "gemma-tied-embedding", "llama-embedding"]
)
def test_merged_output_loads_and_gives_peft_logits(built, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = _adapter(built, name)
    merge_adapter(base, adapter, tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).eval()
    with torch.no_grad():
        ours = merged(ids).logits
        theirs = peft_model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(ids).logits
    assert _max_diff(ours, theirs) <= 1e-4
    assert _max_diff(plain, theirs) > 1e-2  # the adapter does change the model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_equals_cast_of_fp32_merge(built, tmp_path, dtype):
    """A bf16/fp16 base merges in fp32 and is cast once: identical to casting the fp32 merge."""
    low = built("base", f"llama-{dtype}", arch="llama", dtype=dtype)
    adapter = built("adapter", f"llama-{dtype}", base=low, target_modules=TARGETS["llama"], use_dora=True)
    low_ckpt = Checkpoint.open(low)
    upcast = tmp_path / "upcast"
    write_tensors(upcast / "model.safetensors", {n: low_ckpt.get(n).float() for n in low_ckpt.names()})
    (upcast / "config.json").write_text((low / "config.json").read_text())
    merge_adapter(low, adapter, tmp_path / "low")
    merge_adapter(upcast, adapter, tmp_path / "fp32")
    got, want = Checkpoint.open(tmp_path / "low"), Checkpoint.open(tmp_path / "fp32")
    reference = peft_merged_state(upcast, adapter)
    for name in got.names():
        assert got.get(name).dtype == dtype
        assert torch.equal(got.get(name), want.get(name).to(dtype)), name
        assert _max_diff(want.get(name), reference[name]) <= 1e-5, name


def test_sharded_input_and_output(built, tmp_path):
    base = built("base", "qwen2-sharded", arch="qwen2", max_shard_size="20KB")
    assert (base / "model.safetensors.index.json").exists()
    adapter = built("adapter", "qwen2-sharded", base=base, target_modules=TARGETS["qwen2"])
    report = merge_adapter(base, adapter, tmp_path / "out", shard_size=30_000)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(report.shards) > 1 and set(index["weight_map"].values()) == set(report.shards)
    ckpt = Checkpoint.open(out)
    assert index["metadata"]["total_size"] == sum(ckpt.info(n).nbytes for n in ckpt.names())
    reference = peft_merged_state(base, adapter)
    for name in ckpt.names():
        assert _max_diff(ckpt.get(name), reference[name]) <= 1e-5
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    with safe_open(str(out / report.shards[0]), "pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "pt" and meta["surgery.method"] == "merge"
    inputs = json.loads(meta["surgery.inputs"])
    assert inputs == {"base": Checkpoint.open(base).fingerprint(), "adapter": LoraAdapter.open(adapter).fingerprint()}


@pytest.mark.parametrize("name", ["llama-rslora-patterns", "gpt2-lora-bias", "llama-embedding", "gemma-tied-lm-head"])
def test_merge_then_unmerge_restores_base(built, tmp_path, name):
    base, adapter = _adapter(built, name)
    merge_adapter(base, adapter, tmp_path / "merged")
    merge_adapter(tmp_path / "merged", adapter, tmp_path / "restored", unmerge=True)
    original, restored = Checkpoint.open(base), Checkpoint.open(tmp_path / "restored")
    for key in original.names():
        assert _max_diff(restored.get(key), original.get(key)) <= 1e-5, key


def test_dora_unmerge_is_refused(built, tmp_path):
    base, adapter = _adapter(built, "llama-dora")
    with pytest.raises(SurgeryError, match="DoRA"):
        merge_adapter(base, adapter, tmp_path / "x", unmerge=True)
    assert not (tmp_path / "x").exists()


def test_modules_to_save_unmerge_is_refused(built, tmp_path):
    base, adapter = _adapter(built, "llama-modules-to-save")
    with pytest.raises(SurgeryError, match="modules_to_save"):
        merge_adapter(base, adapter, tmp_path / "x", unmerge=True)


def test_bare_model_base_without_model_prefix(built, tmp_path):
    """An adapter trained on LlamaForCausalLM fits a base saved without the `model.` prefix."""
    base, adapter = _adapter(built, "llama")
    ckpt = Checkpoint.open(base)
    bare = tmp_path / "bare"
    bare.mkdir()
    write_tensors(bare / "model.safetensors", {n.removeprefix("model."): ckpt.get(n) for n in ckpt.names()})
    report = merge_adapter(bare, adapter, tmp_path / "out")
    assert report.merged and all(not k.startswith("model.") for k in report.merged)
    reference = peft_merged_state(base, adapter)
    out = Checkpoint.open(tmp_path / "out")
    for name in out.names():
        key = name if name == "lm_head.weight" else f"model.{name}"
        assert _max_diff(out.get(name), reference[key]) <= 1e-5


def test_mismatched_adapter_lists_offenders(built, tmp_path):
    _, adapter = _adapter(built, "llama")
    other = built("base", "gpt2", arch="gpt2")
    with pytest.raises(MismatchError, match="is not in the base") as info:
        merge_adapter(other, adapter, tmp_path / "x")
    assert "and 11 more" in str(info.value)
    assert not (tmp_path / "x").exists()


def test_shape_mismatch(built, tmp_path):
    base, adapter = _adapter(built, "llama")
    ckpt = Checkpoint.open(base)
    bad = tmp_path / "bad"
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 40)
    write_tensors(bad / "model.safetensors", tensors)
    with pytest.raises(MismatchError, match=r"q_proj.weight: base shape \[32, 40\]"):
        merge_adapter(bad, adapter, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_nonfinite_refused_then_allowed(built, tmp_path):
    base = built("base", "llama-fp16", arch="llama", dtype=torch.float16)
    adapter = built("adapter", "llama-huge", base=base, target_modules=["q_proj"], scale=300.0)
    with pytest.raises(NonFiniteError, match="q_proj"):
        merge_adapter(base, adapter, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    report = merge_adapter(base, adapter, tmp_path / "x", allow_nonfinite=True)
    assert report.nonfinite


def test_streaming_reads_one_tensor_at_a_time(built, tmp_path, monkeypatch):
    """The merge never holds a whole shard: each base tensor's bytes are read exactly once
    (whole, in blocks, or copied file to file)."""
    from surgery.io.writer import CheckpointWriter

    base, adapter = _adapter(built, "llama")
    order: list[str] = []
    bytes_read: dict[str, int] = {}

    def spy(cls, method, record):
        original = getattr(cls, method)

        def wrapped(self, name, *args, **kwargs):
            if name not in order:
                order.append(name)
            record(name, *args)
            return original(self, name, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapped)

    def whole(name, *args):
        bytes_read[name] = bytes_read.get(name, 0) + ckpt.info(name).nbytes

    def part(name, buffer, *args):
        bytes_read[name] = bytes_read.get(name, 0) + memoryview(buffer).nbytes

    ckpt = Checkpoint.open(base)
    spy(Checkpoint, "get", whole)
    spy(Checkpoint, "read_into", part)
    spy(CheckpointWriter, "copy_raw", whole)
    report = merge_adapter(base, adapter, tmp_path / "out")
    assert sorted(order) == sorted(ckpt.names())
    assert bytes_read == {name: ckpt.info(name).nbytes for name in ckpt.names()}
    assert report.merged  # the streamed path ran on the adapted weights


def test_nan_in_adapter_is_refused(built, tmp_path):
    from surgery.io.adapter import write_adapter

    base, adapter_dir = _adapter(built, "llama")
    src = LoraAdapter.open(adapter_dir)
    tensors = {k: src.get(k).clone() for k in src.names()}
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key][3, 1] = float("nan")
    write_adapter(tmp_path / "nan", src.config, tensors)
    with pytest.raises(NonFiniteError, match=r"model.layers.1.mlp.down_proj.weight"):
        merge_adapter(base, tmp_path / "nan", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_output_may_not_be_an_input(built, tmp_path):
    base, adapter = _adapter(built, "llama")
    for target in (base, adapter):
        with pytest.raises(SurgeryError, match="never modified"):
            merge_adapter(base, adapter, target, force=True)
    assert Checkpoint.open(base).names()
