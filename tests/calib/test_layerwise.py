"""Layer-by-layer statistics from a checkpoint equal the whole-model hook statistics."""

from __future__ import annotations

import pytest
import torch

from surgery.calib.data import Sample
from surgery.calib.layerwise import calibrate_layerwise
from surgery.calib.stats import collect_linear_stats
from tests.factories import make_adapter, make_base


def _samples():
    g = torch.Generator().manual_seed(0)
    return [Sample(torch.randint(0, 96, (n,), generator=g), torch.arange(n) >= n // 2) for n in (5, 9, 7)]


def _assert_same(whole, layerwise):
    assert whole.keys() == layerwise.keys()
    for k in whole:
        assert whole[k].tokens == layerwise[k].tokens
        for attr in ("sq_norms", "xtx"):
            a, b = getattr(whole[k], attr), getattr(layerwise[k], attr)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_layerwise_equals_whole_model(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    base = make_base(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for batch_size, mask in ((1, "all"), (2, "response")):
        whole = collect_linear_stats(model, _samples(), token_mask=mask, want=("sq_norms", "xtx"),
                                     batch_size=batch_size)
        assert len(whole) == 14
        lw = calibrate_layerwise(base, _samples(), token_mask=mask, want=("sq_norms", "xtx"), batch_size=batch_size)
        _assert_same(whole, lw)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_layerwise_with_adapter_equals_peft(tmp_path, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgery.io.adapter import LoraAdapter

    base = make_base(tmp_path / arch, arch)
    adapter = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "v_proj", "down_proj"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    targets = ["q_proj", "v_proj", "down_proj"]
    whole = collect_linear_stats(model, _samples(), targets)
    assert len(whole) == 2 * 3 * 3
    _assert_same(whole, calibrate_layerwise(base, _samples(), targets, adapter=LoraAdapter.open(adapter)))


def test_on_layer_modification_propagates(tmp_path):
    """Zeroing layer 0's down_proj in `on_layer` changes what layer 1 sees, as a modified model would."""
    from transformers import AutoModelForCausalLM

    base = make_base(tmp_path / "m", "llama")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    whole = collect_linear_stats(model, _samples())

    def zero(ctx):
        if ctx.index == 0:
            ctx.linear("model.layers.0.mlp.down_proj").weight.zero_()

    lw = calibrate_layerwise(base, _samples(), on_layer=zero)
    # layer 0's statistics come from the unmodified layer (Wanda's order), later ones from the modified outputs
    for k in whole:
        if k.startswith("model.layers.1."):
            torch.testing.assert_close(lw[k].sq_norms, whole[k].sq_norms, rtol=1e-6, atol=1e-6)
    assert lw["model.layers.0.mlp.down_proj"].sq_norms.sum() > 0


def test_bf16_checkpoint_computes_in_fp32(tmp_path):
    """A bf16 checkpoint is calibrated in fp32 (embedding table kept in bf16: the lookup is exact)."""
    from transformers import AutoModelForCausalLM

    base = make_base(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    _assert_same(collect_linear_stats(model, _samples()), calibrate_layerwise(base, _samples()))


def test_adapter_outside_decoder_layers_is_refused(tmp_path):
    from surgery.errors import SurgeryError
    from surgery.io.adapter import LoraAdapter

    base = make_base(tmp_path / "m", "llama")
    adapter = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "lm_head"])
    with pytest.raises(SurgeryError, match="lm_head.weight, outside the decoder layers"):
        calibrate_layerwise(base, _samples(), adapter=LoraAdapter.open(adapter))


def test_sliding_window_layers_get_their_own_mask(tmp_path):
    """Qwen2 with a sliding-window layer: each layer receives the mask the model gives it."""
    import transformers as tf

    from tests.factories import tiny_config

    cfg = tiny_config("qwen2")
    cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 4, 1
    cfg.layer_types = ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    model.save_pretrained(tmp_path / "sw")
    g = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(0, 96, (n,), generator=g), torch.ones(n, dtype=torch.bool)) for n in (12, 9)]
    _assert_same(collect_linear_stats(model, samples), calibrate_layerwise(tmp_path / "sw", samples))


def test_next_layer_is_read_into_the_previous_layers_memory(tmp_path):
    """Layer i + 1's fp32 weights reuse layer i's storage (no fresh memory), unless something still
    holds a view of a weight: that weight keeps its values and its memory is not taken."""
    base = make_base(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    seen: dict[int, dict[str, int]] = {}
    held: dict[str, torch.Tensor] = {}

    def on_layer(ctx):
        seen[ctx.index] = {p.split(".layers.")[1].split(".", 1)[1]: ctx.linear(p).weight.data_ptr() for p in ctx.stats}
        if ctx.index == 0:  # keep a view of one weight past the layer's end
            path = sorted(ctx.stats)[0]
            held["path"] = path.split(".layers.")[1].split(".", 1)[1]
            held["view"] = ctx.linear(path).weight.data[1:]
            held["copy"] = held["view"].clone()

    calibrate_layerwise(base, _samples(), on_layer=on_layer)
    assert len(seen) == 2
    first, second = seen[0], seen[1]
    held_ptr = first[held["path"]]
    # same-shape weights (q/o, k/v, gate/up) may trade places; the memory is what counts
    assert set(second.values()) & set(first.values()) == set(first.values()) - {held_ptr}
    assert held_ptr not in second.values()
    assert torch.equal(held["view"], held["copy"])  # the held view was not overwritten


def test_reused_memory_gives_the_same_statistics(tmp_path, monkeypatch):
    """Reading into a finished layer's memory changes no statistic (bf16 checkpoint, fp32 reads)."""
    from surgery.calib import layerwise

    base = make_base(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    reused = calibrate_layerwise(base, _samples(), want=("sq_norms", "xtx"))
    monkeypatch.setattr(layerwise.SpareTensors, "give", lambda self, module: None)
    fresh = calibrate_layerwise(base, _samples(), want=("sq_norms", "xtx"))
    assert fresh.keys() == reused.keys()
    for k in fresh:
        assert torch.equal(fresh[k].sq_norms, reused[k].sq_norms) and torch.equal(fresh[k].xtx, reused[k].xtx)
