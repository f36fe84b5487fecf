"""Safety-critical weights (Wei et al.): scores, set difference and apply, against plain PyTorch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.errors import SurgeryError
from surgery.methods.neurons import apply_neurons, find_neurons, freeze_mask_hook, mask_from_scores

os.environ.setdefault("SURGERY_PROGRESS", "0")

HARM = ["zorbulate", "skrell", "hexcrack", "blorfen"]
BENIGN = ["clean", "paint", "fix", "wash"]
OBJECTS = ["wug", "dax", "blicket", "toma"]


def write_pairs(path: Path, verbs: list[str], response: str) -> Path:
    with path.open("w") as f:
        for v in verbs:
            for o in OBJECTS:
                f.write(json.dumps({"prompt": f"how do i {v} the {o}", "response": response.format(v=v, o=o)}) + "\n")
    return path


def make_chat_model(out: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with the testbed's word-level chat tokenizer, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.testbed.tokenizer import make_tokenizer

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("neurons")
    return {
        "model": make_chat_model(root / "model", seed=0),
        "other": make_chat_model(root / "other", seed=1),
        "safety": write_pairs(root / "safety.jsonl", HARM, "sorry , i cannot help with that request ."),
        "utility": write_pairs(root / "utility.jsonl", BENIGN, "sure . to {v} the {o} , use a brush ."),
    }


def plain_setdiff(s: torch.Tensor, u: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """top-q of s minus top-p of u over the flattened tensor, with argsort and Python sets."""
    n = s.numel()
    top_s = set(torch.argsort(s.flatten(), stable=True)[n - int(n * q):].tolist()) if int(n * q) else set()
    top_u = set(torch.argsort(u.flatten(), stable=True)[n - int(n * p):].tolist()) if int(n * p) else set()
    out = torch.zeros(n, dtype=torch.bool)
    out[sorted(top_s - top_u)] = True
    return out.view_as(s)


def test_setdiff_equals_plain_pytorch() -> None:
    gen = torch.Generator().manual_seed(0)
    s = {"a": torch.rand(16, 24, generator=gen), "b": torch.rand(8, 5, generator=gen)}
    u = {"a": torch.rand(16, 24, generator=gen), "b": torch.rand(8, 5, generator=gen)}
    for p, q in [(0.5, 0.5), (0.04, 0.02), (0.1, 0.3), (0.0, 0.2), (0.3, 0.0)]:
        got = mask_from_scores(s, u, p, q)
        for k in s:
            assert torch.equal(got[k], plain_setdiff(s[k], u[k], p, q)), (k, p, q)


def independent_wanda(model_dir: Path, data: Path) -> dict[str, torch.Tensor]:
    """|W| * ||X_j|| over response tokens, capturing each Linear's full input and masking by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.calib.data import load_pairs, tokenize_pairs

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    samples = tokenize_pairs(tok, load_pairs(data), 256)
    inputs: dict[str, list[torch.Tensor]] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    hs = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.setdefault(n, []).append(a[0][0]))
          for n, m in linears.items()]
    with torch.no_grad():
        for s in samples:  # one at a time: no padding involved
            model(input_ids=s.input_ids[None])
            for n in linears:
                inputs[n][-1] = inputs[n][-1][s.response_mask]
    for h in hs:
        h.remove()
    return {f"{n}.weight": m.weight.abs() * torch.cat(inputs[n]).double().norm(dim=0).float()
            for n, m in linears.items()}


def independent_snip(model_dir: Path, data: Path) -> dict[str, torch.Tensor]:
    """|W| * sum_x |grad|, with the NLL of each sample's response tokens written out by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.calib.data import load_pairs, tokenize_pairs

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    samples = tokenize_pairs(tok, load_pairs(data), 256)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    acc = {n: torch.zeros_like(m.weight) for n, m in linears.items()}
    for s in samples:
        logits = model(input_ids=s.input_ids[None]).logits[0]
        targets = s.response_mask[1:]  # position t predicts token t+1
        logp = torch.log_softmax(logits[:-1][targets], dim=-1)
        loss = -logp.gather(1, s.input_ids[1:][targets][:, None]).mean()
        grads = torch.autograd.grad(loss, [m.weight for m in linears.values()])
        for n, g in zip(linears, grads):
            acc[n] += g.abs()
    return {f"{n}.weight": m.weight.detach().abs() * acc[n] for n, m in linears.items()}


@pytest.mark.parametrize("score", ["wanda", "snip"])
def test_find_matches_independent_computation(setup, tmp_path: Path, score: str) -> None:
    p, q = 0.1, 0.2
    report = find_neurons(setup["model"], setup["safety"], setup["utility"], tmp_path / "m.safetensors",
                          p=p, q=q, score=score)
    ref = independent_wanda if score == "wanda" else independent_snip
    s, u = ref(setup["model"], setup["safety"]), ref(setup["model"], setup["utility"])
    got = load_file(str(tmp_path / "m.safetensors"))
    assert set(got) == set(s) and len(got) == 14
    total = 0
    for k in got:
        # scores agree to fp32 rounding, so compare the masks on all but near-tied boundary weights
        expected = plain_setdiff(s[k], u[k], p, q)
        mismatch = int((got[k] != expected).sum())
        assert mismatch <= max(2, got[k].numel() // 500), (k, mismatch)
        total += int(expected.sum())
    assert report.selected == sum(int(m.sum()) for m in got.values())
    assert abs(report.selected - total) <= 0.01 * total + 4
    assert 0 < report.metrics["sparsity"] < q
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["surgery.method"] == "neurons-find" and json.loads(md["surgery.params"])["score"] == score


def test_sign_pitfall_negated_scores_give_near_empty_sets(setup) -> None:
    """Wei et al. issues #2/#15: scores dumped with --neg_prune (negated) make "top" mean "bottom".

    Both score kinds share the |W| factor, so the bottom-q safety set lies almost inside the
    bottom-p utility set (p > q) and the difference collapses.
    """
    p, q = 0.04, 0.02  # the paper's example
    s = independent_wanda(setup["model"], setup["safety"])
    u = independent_wanda(setup["model"], setup["utility"])
    right = mask_from_scores(s, u, p, q)
    wrong = mask_from_scores({k: -v for k, v in s.items()}, {k: -v for k, v in u.items()}, p, q)
    n = sum(v.numel() for v in s.values())
    right_sparsity = sum(int(m.sum()) for m in right.values()) / n
    wrong_sparsity = sum(int(m.sum()) for m in wrong.values()) / n
    assert right_sparsity > 0.002
    assert wrong_sparsity < right_sparsity / 3


def test_apply_zero_and_restore(setup, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    mask = tmp_path / "m.safetensors"
    find_neurons(setup["model"], setup["safety"], setup["utility"], mask, p=0.1, q=0.3)
    masks = load_file(str(mask))
    orig = load_file(str(setup["model"] / "model.safetensors"))
    other = load_file(str(setup["other"] / "model.safetensors"))

    zero = apply_neurons(setup["model"], mask, tmp_path / "zero", mode="zero")
    got = load_file(str(tmp_path / "zero" / "model.safetensors"))
    for k, w in orig.items():
        expected = torch.where(masks[k], torch.zeros_like(w), w) if k in masks else w
        assert torch.equal(got[k], expected), k
    assert zero.selected == sum(int(m.sum()) for m in masks.values())

    apply_neurons(setup["model"], mask, tmp_path / "restore", mode="restore", aligned=setup["other"])
    got = load_file(str(tmp_path / "restore" / "model.safetensors"))
    for k, w in orig.items():
        expected = torch.where(masks[k], other[k], w) if k in masks else w
        assert torch.equal(got[k], expected), k
    assert (tmp_path / "restore" / "tokenizer.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "restore")

    with pytest.raises(SurgeryError):
        apply_neurons(setup["model"], mask, tmp_path / "x", mode="restore")
    with pytest.raises(SurgeryError):
        apply_neurons(setup["model"], setup["model"] / "model.safetensors", tmp_path / "x", mode="zero")
    assert not (tmp_path / "x").exists()


def test_freeze_mask_hook(setup, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    mask = tmp_path / "m.safetensors"
    find_neurons(setup["model"], setup["safety"], setup["utility"], mask, p=0.1, q=0.3, targets=["q_proj"])
    masks = load_file(str(mask))
    model = AutoModelForCausalLM.from_pretrained(setup["model"])
    hook = freeze_mask_hook(mask)
    ids = torch.arange(2, 12)[None]
    model(input_ids=ids, labels=ids).loss.backward()
    hook(model)
    for k, m in masks.items():
        g = model.get_parameter(k).grad
        assert bool((g[m] == 0).all()) and bool((g[~m] != 0).any())
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(setup["model"]),
                          LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(SurgeryError):
        freeze_mask_hook(mask)(lora)


def test_cli_find_apply(setup, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from surgery.cli.main import cli

    runner = CliRunner()
    mask = tmp_path / "m.safetensors"
    res = runner.invoke(cli, ["neurons", "find", str(setup["model"]), "--safety", str(setup["safety"]),
                              "--utility", str(setup["utility"]), "--p", "0.1", "--q", "0.2",
                              "--targets", "q_proj,v_proj", "-o", str(mask), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["tensors"]) == 4 and 0 < out["metrics"]["sparsity"] < 0.2
    res = runner.invoke(cli, ["neurons", "apply", str(setup["model"]), "--mask", str(mask), "--mode", "zero",
                              "-o", str(tmp_path / "z"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["totals"]["selected"] == out["totals"]["selected"]
    res = runner.invoke(cli, ["neurons", "find", str(setup["model"]), "--safety", str(setup["safety"]),
                              "--utility", str(setup["utility"]), "--p", "1.5", "--q", "0.2", "-o", str(tmp_path / "n")])
    assert res.exit_code != 0 and not (tmp_path / "n").exists()


def test_model_without_tokenizer_is_a_user_error(setup, tmp_path: Path) -> None:
    from tests.factories import make_base

    bare = make_base(tmp_path / "bare")
    with pytest.raises(SurgeryError, match="tokenizer"):
        find_neurons(bare, setup["safety"], setup["utility"], tmp_path / "m.safetensors", p=0.1, q=0.2)
    assert not (tmp_path / "m.safetensors").exists()


def test_snip_layer_by_layer_equals_whole_model(setup, tmp_path: Path) -> None:
    from surgery.methods.neurons import layer_groups, target_linears

    kw = dict(p=0.1, q=0.2, score="snip", targets=["q_proj", "down_proj"])
    find_neurons(setup["model"], setup["safety"], setup["utility"], tmp_path / "all.safetensors", **kw)
    find_neurons(setup["model"], setup["safety"], setup["utility"], tmp_path / "one.safetensors",
                 layers_per_pass=1, **kw)
    a, b = load_file(str(tmp_path / "all.safetensors")), load_file(str(tmp_path / "one.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert int((a[k] != b[k]).sum()) <= 1, k  # same gradients; at most a float tie at the boundary
    from transformers import AutoModelForCausalLM

    mods = target_linears(AutoModelForCausalLM.from_pretrained(setup["model"]), ["q_proj", "down_proj"])
    groups = layer_groups(mods, 1)
    assert [sorted(g) for g in groups] == [["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"],
                                           ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]]


def test_config_errors_name_fields_and_reports_are_stored(setup, tmp_path: Path) -> None:
    from safetensors import safe_open

    from surgery.methods.config import ConfigError
    from surgery.methods.neurons import NeuronsApplyConfig, NeuronsFindConfig
    from surgery.report import REPORT_FILE, Report

    with pytest.raises(ConfigError, match=r"neurons-find: p must lie in \[0, 1\]"):
        NeuronsFindConfig(p=1.5, q=0.2)
    with pytest.raises(ConfigError, match="neurons-apply: mode must be one of zero, restore"):
        NeuronsApplyConfig(mode="erase")  # type: ignore[arg-type]
    mask = tmp_path / "m.safetensors"
    found = find_neurons(setup["model"], setup["safety"], setup["utility"], mask, p=0.1, q=0.3, targets=["q_proj"])
    masks = load_file(str(mask))
    with safe_open(str(mask), "pt") as f:
        stored = json.loads(f.metadata()["surgery.report"])
    assert stored["totals"]["selected"] == found.selected == sum(int(m.sum()) for m in masks.values())
    assert stored["metrics"]["sparsity"] == found.metrics["sparsity"]
    assert stored["config"]["p"] == 0.1 and stored["config"]["targets"] == ["q_proj"]
    applied = apply_neurons(setup["model"], mask, tmp_path / "z", mode="zero")
    on_disk = Report.load(tmp_path / "z" / REPORT_FILE)
    orig = load_file(str(setup["model"] / "model.safetensors"))
    assert on_disk.metrics == {"tensors": len(orig), "masked_tensors": 2} == applied.metrics
    assert on_disk.selected == found.selected
    # changed: masked entries that were not zero already (by hand, from the original weights)
    assert on_disk.changed == sum(int((orig[k][m] != 0).sum()) for k, m in masks.items())
    assert {t.name for t in on_disk.tensors} == set(masks)
