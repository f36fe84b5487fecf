"""Header-only summaries behind `surgery inspect`."""

from __future__ import annotations

import pytest
import torch

from surgery.errors import SurgeryError
from surgery.io.summary import format_size, layer_index, module_type, parse_size, summarize
from tests.factories import TARGETS


def test_checkpoint_summary_sharded_bf16(built):
    base = built("base", "mistral-bf16-sharded", arch="mistral", dtype=torch.bfloat16, max_shard_size="20KB")
    s = summarize(base)
    assert s["kind"] == "checkpoint" and s["sharded"] and len(s["files"]) > 1
    assert s["architecture"] == "MistralForCausalLM" and s["layers"] == 2
    assert list(s["dtypes"]) == ["BF16"] and s["dtypes"]["BF16"]["bytes"] == 2 * s["parameters"]
    # vocab 96 x hidden 32 embedding and head, 2 layers of q/k/v/o, gate/up/down and 2 norms, final norm
    layer = 32 * 32 * 2 + 16 * 32 * 2 + 48 * 32 * 3 + 32 * 2
    assert s["parameters"] == 2 * 96 * 32 + 2 * layer + 32
    assert s["module_types"]["mlp.down_proj.weight"]["shape"] == [32, 48]
    assert s["largest_tensor"]["bytes"] == 96 * 32 * 2


def test_adapter_summary_with_patterns(built):
    base = built("base", "llama", arch="llama")
    adapter = built("adapter", "summary", base=base, target_modules=TARGETS["llama"], r=4, lora_alpha=8,
                    rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 2}, use_rslora=True)
    s = summarize(adapter)
    assert s["kind"] == "adapter" and s["modules"] == 14 and s["layers"] == 2 and s["use_rslora"]
    assert s["ranks"] == {2: 2, 4: 12}
    assert s["targets"]["q_proj"]["r"] == [2] and s["targets"]["down_proj"]["alpha"] == [2.0]
    assert s["scalings"] == sorted({round(8 / 2**0.5, 6), round(8 / 2, 6), round(2 / 2, 6)})
    in_out = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
              "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
    rank = {t: 2 if t == "q_proj" else 4 for t in in_out}
    assert s["parameters"] == 2 * sum(rank[t] * (i + o) for t, (i, o) in in_out.items())  # 2 layers of A and B


@pytest.mark.parametrize(
    "name,layer,kind",
    [
        ("model.layers.12.self_attn.q_proj.weight", 12, "self_attn.q_proj.weight"),
        ("transformer.h.3.attn.c_attn.bias", 3, "attn.c_attn.bias"),
        ("model.embed_tokens.weight", None, "model.embed_tokens.weight"),
    ],
)
def test_layer_and_module_type(name, layer, kind):
    assert layer_index(name) == layer and module_type(name) == kind


@pytest.mark.parametrize("bad", ["", "GB", "5 XB", "-1GB", "0", "five"])
def test_bad_sizes(bad):
    with pytest.raises(SurgeryError):
        parse_size(bad)


def test_format_size():
    assert format_size(1_500_000_000) == "1.50 GB" and format_size(12) == "12 B"
