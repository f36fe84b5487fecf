"""Hook statistics against activations computed by hand from the model's own submodules."""

from __future__ import annotations

import pytest
import torch

from surgery.calib.data import Sample
from surgery.calib.stats import collect_linear_stats, match_target
from tests.factories import build_model


def _samples(seed=0, lengths=(5, 9, 7)):
    g = torch.Generator().manual_seed(seed)
    return [Sample(torch.randint(0, 96, (n,), generator=g), torch.arange(n) >= n // 2) for n in lengths]


def test_match_target():
    name = "model.layers.3.self_attn.q_proj"
    assert match_target(name, None) and not match_target("lm_head", None)
    assert match_target(name, ["q_proj"]) and match_target(name, ["self_attn.q_proj"])
    assert not match_target(name, ["proj"]) and match_target(name, ["*.self_attn.*"])
    assert match_target(name, [r"re:.*layers\.3\..*"]) and not match_target(name, [r"re:.*layers\.4\..*"])


@pytest.mark.parametrize("token_mask", ["all", "response"])
def test_stats_equal_hand_computed(token_mask):
    model = build_model("llama")
    samples = _samples()
    stats = collect_linear_stats(model, samples, ["q_proj", "down_proj"], token_mask=token_mask,
                                 want=("sq_norms", "xtx", "yty"), batch_size=2)
    assert set(stats) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")}
    layer = model.model.layers[0]
    with torch.no_grad():
        xs = []
        for s in samples:
            x = layer.input_layernorm(model.model.embed_tokens(s.input_ids[None]))[0]
            xs.append(x[s.response_mask] if token_mask == "response" else x)
        X = torch.cat(xs)
    st = stats["model.layers.0.self_attn.q_proj"]
    assert st.tokens == X.shape[0] and st.samples == 3
    torch.testing.assert_close(st.sq_norms, (X * X).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.xtx, X.T @ X, rtol=1e-5, atol=1e-5)
    Y = X @ layer.self_attn.q_proj.weight.T
    torch.testing.assert_close(st.yty, Y.T @ Y, rtol=1e-4, atol=1e-4)


def test_lora_stats_are_inputs_of_a_and_b():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model("qwen2"), LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    samples = _samples(1, (6, 4))
    stats = collect_linear_stats(model, samples, ["v_proj"])
    assert set(stats) == {f"model.layers.{i}.self_attn.v_proj{s}" for i in (0, 1) for s in ("", ".lora_A", ".lora_B")}
    inner = model.base_model.model.model
    v = inner.layers[0].self_attn.v_proj
    with torch.no_grad():
        X = torch.cat([inner.layers[0].input_layernorm(inner.embed_tokens(s.input_ids[None]))[0] for s in samples])
        AX = X @ v.lora_A["default"].weight.T
    name = "model.layers.0.self_attn.v_proj"
    torch.testing.assert_close(stats[name + ".lora_A"].sq_norms, (X * X).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[name].sq_norms, (X * X).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[name + ".lora_B"].sq_norms, (AX * AX).sum(0), rtol=1e-5, atol=1e-5)
    assert stats[name + ".lora_B"].in_features == 4
