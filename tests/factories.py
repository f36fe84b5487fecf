"""Tiny models and adapters built in code, for tests across the project (never downloaded).

`make_base(dir, arch)` saves a 2-layer model of a real architecture with
`save_pretrained`; `make_adapter(base_dir, dir, **lora)` wraps it with peft,
gives every LoRA tensor random non-zero values (peft initialises lora_B to zero,
which would make every merge trivially exact) and saves the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "qwen2", "mistral", "gpt2", "gemma")

# The attention/MLP projections each architecture names, for target_modules.
TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def tiny_config(arch: str, vocab: int = 96) -> Any:
    """A 2-layer config of `arch` with hidden size 32."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**common, tie_word_embeddings=False)
    if arch == "gemma":
        return tf.GemmaConfig(**common, head_dim=8, tie_word_embeddings=True)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def build_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny causal LM in fp32 (deterministic in `seed`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    with torch.no_grad():  # non-trivial norms and biases so every tensor matters
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def make_base(
    out: str | Path,
    arch: str = "llama",
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    seed: int = 0,
) -> Path:
    """Save a tiny `arch` checkpoint (single file, or sharded with `max_shard_size`)."""
    out = Path(out)
    model = build_model(arch, seed).to(dtype)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    return out


def make_adapter(
    base: str | Path,
    out: str | Path,
    *,
    seed: int = 1,
    scale: float = 0.2,
    dtype: torch.dtype | None = None,
    **lora: Any,
) -> Path:
    """Train-free peft LoRA adapter over the checkpoint at `base`, with random weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                if "magnitude" in name:
                    p.mul_(1.0 + 0.3 * torch.rand(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
    if dtype is not None:
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
    peft_model.save_pretrained(out)
    return Path(out)


def peft_merged_state(base: str | Path, adapter: str | Path) -> dict[str, torch.Tensor]:
    """peft's own merge (`merge_and_unload`) in fp32, as a state dict: the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
