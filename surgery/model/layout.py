"""Architecture layout: where a causal LM keeps its layers, embeddings, head and residual writers.

Two views of the same facts:

- by tensor name (checkpoints, adapters, no model needed): `LAYER_RE` / `layer_index` find the
  decoder-layer index, `PEFT_PREFIX` / `strip_peft_prefix` turn a peft module path back into
  the checkpoint's, `FUSED_PROJECTIONS` says which projections hold several in one matrix;
- by module (a loaded or meta model): `residual_layout(model)` finds the decoder blocks and the
  projections that write into the residual stream, the embeddings, the final norm and the head.

Supported: the Llama family (Llama, Qwen2, Mistral, Gemma, ...) and GPT-2-style models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from surgery.errors import MismatchError
from surgery.io.adapter import PREFIX as ADAPTER_PREFIX
from surgery.io.names import LAYER_RE, layer_index

__all__ = [
    "ATTN_OUT", "EXPERT_RE", "FUSED_PROJECTIONS", "LAYER_RE", "Layout", "MLP_OUT", "PEFT_PREFIX", "expert_index",
    "layer_index", "module", "residual_layout", "strip_peft_prefix",
]

# The prefix peft puts before a wrapped model's own module paths (the adapter format's, defined in io).
PEFT_PREFIX = ADAPTER_PREFIX

# An MoE expert inside a layer: `mlp.experts.17.down_proj`. Group 1 is the expert index.
EXPERT_RE = re.compile(r"(?:^|\.)experts\.(\d+)\.")

# Projections that hold several in one matrix, split along the output dimension (in this order):
# Phi-3 `qkv_proj` and `gate_up_proj`, GPT-2 `c_attn` (a Conv1D, so its output dimension is the last).
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "c_attn": ("q_proj", "k_proj", "v_proj"),
}

# Module names (relative to a decoder block) of the projections that write into the residual stream.
ATTN_OUT = ("self_attn.o_proj", "attn.c_proj", "attn.out_proj", "self_attention.dense", "attention.dense")
MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.fc_out", "mlp.fc2", "mlp.dense_4h_to_h")
_FINAL_NORM = ("model.norm", "transformer.ln_f", "model.final_layernorm", "gpt_neox.final_layer_norm")


def expert_index(name: str) -> int | None:
    """The MoE expert index in a name (`...mlp.experts.17.down_proj.weight` -> 17), None for dense modules."""
    match = EXPERT_RE.search(name)
    return int(match.group(1)) if match else None


def strip_peft_prefix(name: str) -> str:
    """A peft model's module or parameter path as the base checkpoint names it (`base_model.model.` removed)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


@dataclass
class Layout:
    """Where a causal LM writes into its residual stream.

    `blocks` are the decoder block names; `attn_out` and `mlp_out` the qualified names of
    each block's output projections; `embeddings` the embedding modules outside the blocks
    (token and, for GPT-2, position embeddings); `transposed` names the projections whose
    weight is stored [d_in, d_out] (GPT-2 Conv1D) instead of torch's [d_out, d_in];
    `final_norm` and `head` the modules after the last block (None where the model has none).
    """

    blocks: list[str]
    attn_out: list[str]
    mlp_out: list[str]
    embeddings: list[str]
    transposed: set[str] = field(default_factory=set)
    final_norm: str | None = None
    head: str | None = None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def layers_path(self) -> str:
        """The module list that holds the blocks (`model.layers`, `transformer.h`)."""
        return self.blocks[0].rsplit(".", 1)[0]

    def parent(self, name: str) -> str:
        """The module that owns `name` (e.g. the MLP of a down projection)."""
        return name.rsplit(".", 1)[0]


def module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called `name`."""
    return model.get_submodule(name)


def residual_layout(model: torch.nn.Module) -> Layout:
    """Find the decoder blocks and residual-writing projections of a Hugging Face causal LM.

    Supports the Llama family (Llama, Qwen2, Mistral, Gemma, ...) and GPT-2-style models;
    anything else raises `MismatchError` naming what was not found.
    """
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    modules = dict(model.named_modules())
    lists = [(name, m) for name, m in modules.items() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not n or not lists:
        raise MismatchError("could not find the decoder blocks of this model: only Llama-family and GPT-2-style "
                            "causal LMs are supported")
    prefix = lists[0][0]
    blocks = [f"{prefix}.{i}" for i in range(n)]
    attn_out, mlp_out = [], []
    for b in blocks:
        a = next((f"{b}.{s}" for s in ATTN_OUT if f"{b}.{s}" in modules), None)
        m = next((f"{b}.{s}" for s in MLP_OUT if f"{b}.{s}" in modules), None)
        if a is None or m is None:
            raise MismatchError(f"block {b} has no recognised attention output or MLP down projection "
                                f"(looked for {', '.join(ATTN_OUT)} / {', '.join(MLP_OUT)})")
        attn_out.append(a)
        mlp_out.append(m)
    embeddings = [name for name, m in modules.items()
                  if isinstance(m, torch.nn.Embedding) and not name.startswith(prefix + ".")]
    transposed = {name for name in attn_out + mlp_out if type(modules[name]).__name__ == "Conv1D"}
    final_norm = next((name for name in _FINAL_NORM if name in modules), None)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    head = next((name for name, m in modules.items() if out_emb is not None and m is out_emb), None)
    return Layout(blocks, attn_out, mlp_out, embeddings, transposed, final_norm, head)
