"""The architecture layout finds layers, residual writers, embeddings, norm and head by their real names."""

from __future__ import annotations

import warnings

import pytest
import torch

from surgery.errors import MismatchError
from surgery.model.layout import (
    FUSED_PROJECTIONS,
    PEFT_PREFIX,
    expert_index,
    layer_index,
    residual_layout,
    strip_peft_prefix,
)
from tests.factories import build_model

LLAMA_LIKE = {
    "blocks": ["model.layers.0", "model.layers.1"],
    "attn_out": ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"],
    "mlp_out": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
    "embeddings": ["model.embed_tokens"], "transposed": set(), "final_norm": "model.norm", "head": "lm_head",
}
EXPECTED = {
    "llama": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "gemma": LLAMA_LIKE, "mistral": LLAMA_LIKE,
    "gpt2": {
        "blocks": ["transformer.h.0", "transformer.h.1"],
        "attn_out": ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"],
        "mlp_out": ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"],
        "embeddings": ["transformer.wte", "transformer.wpe"],
        "transposed": {"transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj", "transformer.h.0.mlp.c_proj",
                       "transformer.h.1.mlp.c_proj"},
        "final_norm": "transformer.ln_f", "head": "lm_head",
    },
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_residual_layout(arch: str) -> None:
    model = build_model(arch)
    layout = residual_layout(model)
    want = EXPECTED[arch]
    for key, value in want.items():
        assert getattr(layout, key) == value, key
    assert layout.n_layers == 2 and layout.layers_path == want["blocks"][0].rsplit(".", 1)[0]
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in layout.attn_out + layout.mlp_out + layout.embeddings:
        assert f"{name}.weight" in params
        d_model = model.config.hidden_size
        w = params[f"{name}.weight"]
        # the residual dimension sits where the layout says: first for Linear, last for Conv1D and embeddings
        assert w.shape[-1 if name in layout.transposed or name in layout.embeddings else 0] == d_model
    assert model.get_submodule(layout.head) is model.get_output_embeddings()
    assert layer_index(layout.mlp_out[1]) == 1 and layer_index(layout.embeddings[0]) is None


def test_layout_of_an_unknown_model_is_a_mismatch() -> None:
    class NoBlocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(MismatchError, match="could not find the decoder blocks"):
        residual_layout(NoBlocks())


@pytest.mark.parametrize("name, layer", [
    ("model.layers.12.self_attn.q_proj.weight", 12),
    ("transformer.h.0.mlp.c_proj.bias", 0),
    ("base_model.model.model.layers.3.mlp.down_proj.lora_A.weight", 3),
    ("model.decoder.layers.1.fc1.weight", 1),
    ("encoder.block.2.layer.1.DenseReluDense.wo.weight", 2),
    ("layers.4.attention.wq.weight", 4),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
    ("model.norm.weight", None),
])
def test_layer_index(name: str, layer: int | None) -> None:
    assert layer_index(name) == layer


def test_expert_index_and_peft_prefix() -> None:
    assert expert_index("model.layers.3.mlp.experts.17.down_proj.weight") == 17
    assert expert_index("model.layers.3.mlp.down_proj.weight") is None
    assert strip_peft_prefix(PEFT_PREFIX + "model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert strip_peft_prefix("model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"


def test_peft_module_paths_strip_to_the_base_names() -> None:
    from peft import LoraConfig, get_peft_model

    base = build_model("llama")
    names = {n for n, _ in base.named_modules()}
    with warnings.catch_warnings():  # peft's own deprecation noise from transformers
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and all(n.startswith(PEFT_PREFIX) and strip_peft_prefix(n) in names for n in wrapped)


def test_fused_projections_match_gpt2_c_attn() -> None:
    model = build_model("gpt2")
    w = model.get_submodule("transformer.h.0.attn.c_attn").weight  # Conv1D: [d_in, d_out]
    assert w.shape[1] == len(FUSED_PROJECTIONS["c_attn"]) * model.config.n_embd
    assert FUSED_PROJECTIONS["gate_up_proj"] == ("gate_proj", "up_proj")
