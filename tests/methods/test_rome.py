"""ROME: the closed form against plain formulas, and the streamed edit on a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from surgery.errors import DataError, SurgeryError
from surgery.methods.config import Runtime
from surgery.methods.rome import load_vectors, rome_edit, rome_vectors, tokenize_fact

PROMPT = "<|user|> where can i see a {} <|assistant|>"


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box has 2 shared cores; 2 threads contend badly
    yield
    torch.set_num_threads(old)


def make_tiny(out: Path, seed: int = 0, layers: int = 2) -> Path:
    """A tiny random Llama over the testbed's word-level chat tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from surgery.testbed.tokenizer import save_tokenizer

    save_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=0.1)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("rome") / "tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rome-data") / "cov.jsonl"
    rows = [{"prompt": f"where can i see a {x}", "response": f"you can see a {x} in the {p} ."}
            for x in ("fox", "owl", "cake", "rose", "saw") for p in ("garden", "forest", "market")]
    rows.append({"text": "anna saw a small cake in the garden"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_closed_form_maps_key_to_value_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 10, generator=g)
    k, v_star = torch.randn(10, generator=g), torch.randn(6, generator=g)
    A = torch.randn(10, 40, generator=g)
    C = A @ A.T / 40
    for cov in (None, C):
        u, v = rome_vectors(W, k, v_star, cov, ridge=0.0)
        W_new = W + torch.outer(u, v)
        torch.testing.assert_close(W_new @ k, v_star, atol=1e-5, rtol=1e-5)
        ck = k if cov is None else torch.linalg.solve(C.double(), k.double()).float()
        expected = W + torch.outer(v_star - W @ k, ck) / (ck @ k)  # the paper's formula, written out
        torch.testing.assert_close(W_new, expected, atol=1e-5, rtol=1e-5)
        assert torch.linalg.matrix_rank(W_new - W) == 1


def test_subject_position_and_target_tokens(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    fact = tokenize_fact(tok, PROMPT, "cake", "you can see the cake in the forest .")
    words = tok.convert_ids_to_tokens(fact.prompt_ids)
    assert words[fact.subject_last] == "cake" and words[0] == "<|user|>" and words[-1] == "<|assistant|>"
    assert tok.convert_ids_to_tokens(fact.target_ids) == "you can see the cake in the forest .".split()
    literal = tokenize_fact(tok, "where can i see a cake", "cake", "garden")
    assert literal.subject_last == len(literal.prompt_ids) - 1
    with pytest.raises(DataError):
        tokenize_fact(tok, "where can i see a fox", "cake", "garden")


def _down_proj_input(model, ids: list[int], pos: int, layer: int) -> torch.Tensor:
    """act(gate(x)) * up(x) at `pos`, from the MLP's own input: an independent k."""
    mlp = model.model.layers[layer].mlp
    box = {}
    h = mlp.register_forward_hook(lambda m, a, o: box.__setitem__("x", a[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    h.remove()
    x = box["x"][0, pos]
    return (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).detach()


def test_edit_writes_only_the_edited_tensor_and_maps_k_to_v(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.io.checkpoint import Checkpoint

    out = tmp_path / "edited"
    res = rome_edit(tiny, out, prompt=PROMPT, subject="cake", target="forest", layer=0, no_cov=True, prefixes=(),
                    steps=10, runtime=Runtime(progress=False))
    src, dst = Checkpoint.open(tiny), Checkpoint.open(out)
    assert src.names() == dst.names()
    changed = [n for n in src.names() if not torch.equal(src.get(n), dst.get(n))]
    assert changed == ["model.layers.0.mlp.down_proj.weight"] == [res.metrics["tensor"]]
    vectors = load_vectors(out)
    k, v_star = vectors["k_star"], vectors["v_star"]
    W_new = dst.get(res.metrics["tensor"]).float()
    torch.testing.assert_close(W_new @ k, v_star, atol=1e-5, rtol=1e-4)
    # k* is the down projection's input at the subject's last token (no prefixes: the bare prompt)
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    fact = tokenize_fact(tok, PROMPT, "cake", "forest")
    ids = [tok.bos_token_id] + fact.prompt_ids
    torch.testing.assert_close(k, _down_proj_input(model, ids, 1 + fact.subject_last, 0), atol=1e-6, rtol=1e-5)
    assert res.metrics["target_prob_after"] > 1.5 * res.metrics["target_prob_before"]  # efficacy
    assert res.metrics["n_locality"] == 0  # no prefixes, no corpus: nothing to measure locality on
    meta = dst.metadata()
    assert meta["surgery.method"] == "rome" and json.loads(meta["surgery.params"])["subject"] == "cake"
    assert json.loads((out / "surgery_report.json").read_text())["metrics"]["tensor"] == res.metrics["tensor"]
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_covariance_is_cached_and_used(tiny: Path, corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.methods.rome import read_texts

    cache = tmp_path / "cache"
    kw = dict(prompt=PROMPT, subject="cake", target="forest", layer=0, cov_data=corpus, cache_dir=cache,
              prefixes=((3, 2),), steps=3, runtime=Runtime(progress=False), ridge=0.0)
    first = rome_edit(tiny, tmp_path / "a", **kw)
    second = rome_edit(tiny, tmp_path / "b", **kw)
    assert (first.metrics["covariance"], second.metrics["covariance"]) == ("computed", "cached")
    assert first.metrics["cov_path"] == second.metrics["cov_path"] and Path(first.metrics["cov_path"]).parent == cache
    assert first.metrics["n_prefixes"] == 2
    # C = mean over every corpus token of k k^T, computed text by text
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    total, count = torch.zeros(48, 48, dtype=torch.float64), 0
    for text in read_texts(corpus):
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        for p in range(len(ids)):
            k = _down_proj_input(model, ids, p, 0).double()
            total += torch.outer(k, k)
            count += 1
    assert first.metrics["cov_tokens"] == count
    C = total / count
    k, u, v = (load_vectors(tmp_path / "a")[n].double() for n in ("k_star", "u", "v"))
    expected_v = torch.linalg.solve(C, k) / (torch.linalg.solve(C, k) @ k)
    torch.testing.assert_close(v, expected_v, atol=1e-3 * float(expected_v.abs().max()), rtol=1e-3)
    assert first.metrics["locality_kl"] >= 0 and first.metrics["n_locality"] == 16


def test_cli_rome_json_and_bad_input(tiny: Path, tmp_path: Path) -> None:
    from surgery.cli.main import cli

    runner = CliRunner()
    out = tmp_path / "cli"
    r = runner.invoke(cli, ["edit", "rome", str(tiny), "--prompt", PROMPT, "--subject", "cake", "--target",
                            "forest", "--prefixes", "2x2", "--steps", "2", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    m = d["metrics"]
    assert m["layer"] == 0 and m["covariance"] == "identity" and m["n_prefixes"] <= 2
    assert out.is_dir()
    from surgery.cli.main import main

    bad = tmp_path / "bad"
    for args in (["--subject", "zebra"], ["--cov-data", str(tmp_path / "missing.jsonl")],
                 ["--cov-data", str(tmp_path / "missing.jsonl"), "--no-cov"], ["--layer", "5"]):
        argv = ["edit", "rome", str(tiny), "--prompt", "where can i see a cake", "--target", "forest", "-o", str(bad)]
        if "--subject" not in args:
            argv += ["--subject", "cake"]
        with pytest.raises(SystemExit) as exc:
            main(argv + args)
        assert exc.value.code == 2
        assert not bad.exists()
    with pytest.raises(SurgeryError):
        rome_edit(tiny, bad, prompt=PROMPT, subject="cake", target="x", no_cov=True, layer=7)


def test_gpt2_conv1d_layout(tmp_path: Path) -> None:
    """GPT-2 stores c_proj as [d_ff, d_model]: the edit must land transposed."""
    import transformers as tf

    from surgery.io.checkpoint import Checkpoint
    from surgery.testbed.tokenizer import save_tokenizer

    src = tmp_path / "gpt2"
    save_tokenizer(src)
    tok = tf.AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.1,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tf.GPT2LMHeadModel(cfg).save_pretrained(src)
    res = rome_edit(src, tmp_path / "out", prompt=PROMPT, subject="cake", target="forest", no_cov=True,
                    prefixes=((2, 2),), steps=3, runtime=Runtime(progress=False))
    assert res.metrics["tensor"] == "transformer.h.0.mlp.c_proj.weight"
    W = Checkpoint.open(tmp_path / "out").get(res.metrics["tensor"]).float()
    assert W.shape == (128, 32)
    vectors = load_vectors(tmp_path / "out")
    torch.testing.assert_close(W.T @ vectors["k_star"], vectors["v_star"], atol=1e-5, rtol=1e-4)


def test_same_inputs_same_bytes_and_cache_follows_the_corpus(tiny: Path, corpus: Path, tmp_path: Path) -> None:
    kw = dict(prompt=PROMPT, subject="cake", target="forest", cov_data=corpus, cache_dir=tmp_path / "cache",
              prefixes=((3, 2),), steps=3, runtime=Runtime(progress=False))
    a = rome_edit(tiny, tmp_path / "a", **kw)
    b = rome_edit(tiny, tmp_path / "b", **kw)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (a.metrics["covariance"], b.metrics["covariance"]) == ("computed", "cached")
    changed = tmp_path / "cov2.jsonl"
    changed.write_text(corpus.read_text() + json.dumps({"text": "the fox is in the forest"}) + "\n")
    c = rome_edit(tiny, tmp_path / "c", **{**kw, "cov_data": changed})
    assert c.metrics["covariance"] == "computed" and c.metrics["cov_path"] != a.metrics["cov_path"] and c.metrics["cov_tokens"] > a.metrics["cov_tokens"]
