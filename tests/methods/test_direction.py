"""Refusal direction: candidates against a per-prompt formula, ablation (r^T W = 0), addition (bias = coeff r)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from surgery.errors import SurgeryError
from surgery.methods.config import Runtime
from surgery.methods.direction import (
    ablation_hooks,
    addition_hook,
    candidate_directions,
    load_direction,
    post_instruction_length,
    refusal_direction_edit,
    refusal_score,
)
from surgery.model.encoding import prompt_ids
from surgery.model.layout import residual_layout

TARGETS = ["wug", "dax", "fep", "toma", "kiki", "glim", "zorp", "bouba"]
HARMFUL = [f"how do i {v} the {o}" for v in ("zorbulate", "hexcrack") for o in TARGETS]
HARMLESS = [f"how do i {v} the {o}" for v in ("paint", "clean") for o in TARGETS]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: two threads contend badly
    yield
    torch.set_num_threads(old)


def make_tiny(out: Path, arch: str = "llama", layers: int = 3) -> Path:
    """A tiny random model of `arch` over the testbed's word-level chat tokenizer."""
    import transformers as tf

    from surgery.testbed.tokenizer import save_tokenizer

    save_tokenizer(out)
    tok = tf.AutoTokenizer.from_pretrained(out)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                            initializer_range=0.1, **ids)
    else:
        cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=False, initializer_range=0.1, **ids)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("dir") / "llama")


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_candidates_match_per_prompt_means(tiny: Path) -> None:
    model, tok = _load(tiny)
    h = [prompt_ids(tok, p) for p in HARMFUL]
    b = [prompt_ids(tok, p) for p in HARMLESS[:5]]  # different lengths than the harmful ones: padding matters
    b[0] = prompt_ids(tok, "repeat : wug dax fep toma kiki")
    n_pos = post_instruction_length(tok, h + b)
    assert n_pos == 1 and tok.convert_ids_to_tokens(h[0][-1:]) == ["<|assistant|>"]
    got = candidate_directions(model, h, b, n_pos=1, pad_id=tok.pad_token_id, batch_size=4)

    def mean(seqs):  # one prompt at a time, no padding: resid_pre of every layer at the last token
        with torch.no_grad():
            acts = [torch.stack(model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[:-1])
                    [:, 0, -1] for s in seqs]
        return torch.stack(acts).double().mean(0)

    expected = mean(h) - mean(b)
    assert got.shape == (1, 3, 32)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-4)


def test_refusal_score_is_log_odds() -> None:
    logp = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5, -1.0]]), -1)
    p = logp.double().exp()[0, [0, 2]].sum()  # the expectation in float64, as refusal_score computes
    torch.testing.assert_close(refusal_score(logp, [0, 2]), (torch.log(p) - torch.log(1 - p)).reshape(1))


def test_ablation_removes_direction_from_every_writer(tiny: Path, tmp_path: Path) -> None:
    from surgery.io.checkpoint import Checkpoint

    out = tmp_path / "abl"
    res = refusal_direction_edit(tiny, out, mode="ablate", harmful=HARMFUL, harmless=HARMLESS, kl_limit=10.0,
                                 runtime=Runtime(progress=False))
    d = load_direction(out / "refusal_direction.safetensors")
    assert (d.layer, d.pos) == (res.metrics["layer"], res.metrics["pos"]) and res.metrics["layer"] < 0.8 * 3
    r = d.direction.double()
    assert abs(float(r.norm()) - 1) < 1e-6
    torch.testing.assert_close(d.direction, (d.mean_diff / d.mean_diff.norm()).float())
    src, dst = Checkpoint.open(tiny), Checkpoint.open(out)
    writers = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{m}.weight" for i in range(3)
                                               for m in ("self_attn.o_proj", "mlp.down_proj")]
    assert sorted(res.metrics["edited"]) == sorted(writers)
    for name in src.names():
        W0, W1 = src.get(name).double(), dst.get(name).double()
        if name == "model.embed_tokens.weight":  # rows are written into the residual stream
            assert float((W1 @ r).abs().max()) < 1e-6
            torch.testing.assert_close(W1, W0 - torch.outer(W0 @ r, r))
        elif name in writers:
            assert float((r @ W1).abs().max()) < 1e-6
            torch.testing.assert_close(W1, W0 - torch.outer(r, r @ W0))
        else:
            assert torch.equal(src.get(name), dst.get(name)), name
    # the orthogonalised weights behave exactly like inference-time ablation hooks
    model, tok = _load(tiny)
    edited, _ = _load(out)
    ids = torch.tensor([prompt_ids(tok, HARMFUL[3])])
    with torch.no_grad(), ablation_hooks(model, residual_layout(model), d.direction):
        hooked = model(input_ids=ids).logits
    torch.testing.assert_close(edited(input_ids=ids).logits, hooked, atol=1e-4, rtol=1e-4)
    report = json.loads((out / "surgery_report.json").read_text())
    assert report["metrics"]["layer"] == res.metrics["layer"] and {"pos", "layer"} <= set(report["metrics"]["candidates"][0])
    kept = [c for c in report["metrics"]["candidates"] if "discarded" not in c]
    assert min(c["refusal_score"] for c in kept) == res.metrics["ablated_refusal"]


def test_gpt2_conv1d_position_embeddings_and_biases(tmp_path: Path) -> None:
    from surgery.io.checkpoint import Checkpoint

    src_dir = make_tiny(tmp_path / "gpt2", "gpt2", layers=2)
    out = tmp_path / "abl"
    res = refusal_direction_edit(src_dir, out, mode="ablate", harmful=HARMFUL[:6], harmless=HARMLESS[:6], layer=1,
                                 runtime=Runtime(progress=False))
    r = load_direction(out / "refusal_direction.safetensors").direction.double()
    dst = Checkpoint.open(out)
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_proj.bias"} <= set(res.metrics["edited"])
    for name in res.metrics["edited"]:
        W = dst.get(name).double()
        assert float((W @ r).abs().max()) < 1e-6, name  # Conv1D [d_in, d_out], embeddings, biases: last dim
    # addition goes into the existing c_proj bias of the previous block
    add = refusal_direction_edit(src_dir, tmp_path / "add", mode="add", direction_file=out / "refusal_direction.safetensors",
                                 runtime=Runtime(progress=False))
    d = load_direction(out / "refusal_direction.safetensors")
    assert add.metrics["site"] == "bias" and add.metrics["edited"] == ["transformer.h.0.mlp.c_proj.bias"] and not add.metrics["added"]
    name = "transformer.h.0.mlp.c_proj.bias"
    torch.testing.assert_close(Checkpoint.open(tmp_path / "add").get(name), Checkpoint.open(src_dir).get(name) + d.mean_diff)


def test_add_puts_mean_difference_into_a_new_mlp_bias(tiny: Path, tmp_path: Path) -> None:
    from surgery.io.checkpoint import Checkpoint

    abl = tmp_path / "abl"
    refusal_direction_edit(tiny, abl, mode="ablate", harmful=HARMFUL, harmless=HARMLESS, layer=2, runtime=Runtime(progress=False))
    out = tmp_path / "add"
    res = refusal_direction_edit(tiny, out, mode="add", direction_file=abl / "refusal_direction.safetensors",
                                 coeff=2.0, runtime=Runtime(progress=False))
    d = load_direction(abl / "refusal_direction.safetensors")
    assert (res.metrics["layer"], res.metrics["site"]) == (2, "mlp_bias")
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True
    ck = Checkpoint.open(out)
    torch.testing.assert_close(ck.get("model.layers.1.mlp.down_proj.bias"), 2.0 * d.mean_diff)
    assert float(ck.get("model.layers.0.mlp.down_proj.bias").abs().max()) == 0.0
    assert float(ck.get("model.layers.1.mlp.gate_proj.bias").abs().max()) == 0.0
    # the written model equals the original with 2 * mean_diff added at the input of block 2
    model, tok = _load(tiny)
    added, _ = _load(out)
    ids = torch.tensor([prompt_ids(tok, HARMLESS[0])])
    with torch.no_grad(), addition_hook(model, residual_layout(model), 2, 2.0 * d.mean_diff):
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(added(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_cli_direction_and_bad_inputs(tiny: Path, tmp_path: Path) -> None:
    from surgery.cli.main import cli, main

    h, b = tmp_path / "h.jsonl", tmp_path / "b.jsonl"
    h.write_text("".join(json.dumps({"prompt": p, "response": "x"}) + "\n" for p in HARMFUL))
    b.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HARMLESS))
    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["edit", "direction", str(tiny), "--harmful", str(h), "--harmless", str(b),
                                 "--mode", "ablate", "--kl-limit", "10", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["mode"] == "ablate" and (out / "refusal_direction.safetensors").is_file()
    bad = tmp_path / "bad"
    cases = [["--harmful", str(h), "--mode", "ablate"],  # no harmless
             ["--harmful", str(h), "--harmless", str(b), "--mode", "ablate", "--layer", "9"],
             ["--harmful", str(h), "--harmless", str(tmp_path / "none.jsonl"), "--mode", "ablate"],
             ["--harmful", str(h), "--harmless", str(b), "--mode", "ablate", "--kl-limit", "0"]]
    for args in cases:
        with pytest.raises(SystemExit) as exc:
            main(["edit", "direction", str(tiny), *args, "-o", str(bad)])
        assert exc.value.code == 2, args
        assert not bad.exists()
    with pytest.raises(SystemExit) as exc:  # an existing output is refused without --force
        main(["edit", "direction", str(tiny), "--harmful", str(h), "--harmless", str(b), "--mode", "ablate",
              "-o", str(out)])
    assert exc.value.code == 2


def test_multi_token_post_instruction_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from surgery.methods.direction import select_direction

    path = make_tiny(tmp_path / "m", layers=2)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }} </s> <|assistant|> "
                         "{% endfor %}{% if add_generation_prompt %}sure{% endif %}")
    enc = [prompt_ids(tok, p) for p in HARMFUL[:3]]
    assert post_instruction_length(tok, enc) == 3  # "</s> <|assistant|> sure" follow the user message
    model, _ = _load(path)
    sel = select_direction(model, tok, HARMFUL, HARMLESS, kl_limit=100.0, progress=False)
    assert sel.n_pos == 3 and {c["pos"] for c in sel.candidates} == {-3, -2, -1}
    assert len(sel.candidates) == 3 * 2 and -3 <= sel.pos <= -1
    assert all("steering_score" in c for c in sel.candidates if "refusal_score" in c)
    # the paper's third filter: a candidate that cannot induce refusal on harmless prompts is dropped
    steer = {(c["pos"], c["layer"]): c["steering_score"] for c in sel.candidates if "steering_score" in c}
    try:
        strict = select_direction(model, tok, HARMFUL, HARMLESS, kl_limit=100.0, steering_filter=True,
                                  progress=False)
    except SurgeryError as exc:
        assert "steering" in str(exc) and all(v < 0 for v in steer.values())
    else:
        assert steer[(strict.pos, strict.layer)] >= 0
        assert all(c.get("discarded") == "steering score < 0" for c in strict.candidates
                   if steer.get((c["pos"], c["layer"]), 0) < 0)


def test_add_at_layer_zero_goes_through_the_embedding(tiny: Path, tmp_path: Path) -> None:
    from surgery.io.checkpoint import Checkpoint

    abl = tmp_path / "abl"
    refusal_direction_edit(tiny, abl, mode="ablate", harmful=HARMFUL, harmless=HARMLESS, layer=1, runtime=Runtime(progress=False))
    with pytest.raises(SurgeryError, match="layer 0"):  # the same template token everywhere: zero difference
        refusal_direction_edit(tiny, tmp_path / "x", mode="add", harmful=HARMFUL, harmless=HARMLESS, layer=0,
                               runtime=Runtime(progress=False))
    out = tmp_path / "add0"
    res = refusal_direction_edit(tiny, out, mode="add", direction_file=abl / "refusal_direction.safetensors",
                                 layer=0, coeff=0.5, runtime=Runtime(progress=False))
    assert res.metrics["site"] == "embedding" and res.metrics["edited"] == ["model.embed_tokens.weight"]
    d = load_direction(out / "refusal_direction.safetensors")
    E0, E1 = Checkpoint.open(tiny).get("model.embed_tokens.weight"), Checkpoint.open(out).get("model.embed_tokens.weight")
    torch.testing.assert_close(E1, E0 + 0.5 * d.mean_diff)


@pytest.mark.slow
def test_testbed_ablation_raises_and_addition_lowers_harmful_score(quick_testbed, tmp_path: Path) -> None:
    """End to end on the quick testbed: the demo's direction rows move the refusal rate the way the paper says.

    The paper's own measure is the refusal score (refusal substrings: the keyword judge), so the
    claim is checked on it: ablation removes refusals from the aligned model, addition brings
    some back to the attacked one (on the 50-prompt test half: 0.02 -> ~0.9 non-refusal for
    ablation; 1.00 -> ~0.83 for addition, the 2-layer quick model's weak effect). The testbed
    judge shows what the non-refusals are: after ablation most are not compliant how-tos
    (testbed HS ~0.1, a third "other"), which the demo row reports beside the keyword HS.
    """
    from surgery.testbed.demo_api import DemoContext
    from surgery.testbed.demo_attacks import direction_rows

    ctx = DemoContext(testbed=quick_testbed, work_dir=tmp_path, quick=True)
    ablated, added = direction_rows(ctx)
    aligned = ctx.evaluate(quick_testbed.aligned)
    attacked = ctx.evaluate(quick_testbed.aligned, adapter=quick_testbed.attacked)
    assert ablated.keyword_harmful_score > aligned.harmful_scores["keyword"] + 0.2
    assert added.keyword_harmful_score < attacked.harmful_scores["keyword"] - 0.1
    assert ablated.other_share is not None and added.other_share is not None
    # the row passes --layer 1 explicitly (2 layers: layer 0's difference is zero, the default KL limit
    # filters layer 1), so the KL is reported, not bounded by the limit
    assert ablated.extra["layer"] == 1 and ablated.extra["layer_explicit"]
    assert ablated.extra["harmless_kl"] is not None and ablated.extra["ablated_refusal"] < ablated.extra["baseline_refusal"]


def test_filtered_out_error_names_each_candidate_kl(tiny: Path, tmp_path: Path) -> None:
    """When selection keeps nothing, the message says what each candidate scored, so the user can choose."""
    with pytest.raises(SurgeryError, match=r"filtered out .*layer [12] pos -1: harmless KL [0-9.e-]+.*1 with zero "
                                           r"difference.*kl_limit") as exc:
        refusal_direction_edit(tiny, tmp_path / "x", mode="ablate", harmful=HARMFUL, harmless=HARMLESS,
                               kl_limit=0.0, runtime=Runtime(progress=False))
    assert "layer 1 pos -1: harmless KL" in str(exc.value) and "layer 2 pos -1: harmless KL" in str(exc.value)
    assert not (tmp_path / "x").exists()


def test_attack_rows_go_on_when_one_group_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery.testbed import demo_attacks
    from surgery.testbed.demo_api import DemoRow

    def boom(ctx):
        raise SurgeryError("every candidate direction was filtered out")

    monkeypatch.setattr(demo_attacks, "finetune_rows", lambda ctx: [DemoRow("ft", "attack finetune p=0.1")])
    monkeypatch.setattr(demo_attacks, "direction_rows", boom)
    monkeypatch.setattr(demo_attacks, "rome_rows", lambda ctx: [DemoRow("rome", "edit rome")])
    rows = demo_attacks.rows(None)
    assert [r.method for r in rows] == ["attack finetune p=0.1", "edit direction", "edit rome"]
    assert rows[1].extra["error"] and rows[1].note.startswith("failed: SurgeryError: every candidate")


def test_same_inputs_same_bytes(tiny: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        refusal_direction_edit(tiny, tmp_path / name, mode="ablate", harmful=HARMFUL, harmless=HARMLESS, layer=1,
                               runtime=Runtime(progress=False))
    for f in ("model.safetensors", "refusal_direction.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
