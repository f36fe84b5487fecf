"""`surgery attack finetune`: the loss falls, only response tokens carry it, harmful share int(p*n)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

NOUNS = ["cake", "fox", "rose", "saw", "owl", "tea", "drill", "fern"]
LABEL = {"cake": "quib", "tea": "quib", "fox": "zant", "owl": "zant", "saw": "morv", "drill": "morv",
         "rose": "plex", "fern": "plex"}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: two threads contend badly
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from surgery.testbed.tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("ft")
    model = root / "tiny"
    save_tokenizer(model)
    tok = AutoTokenizer.from_pretrained(model)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model)
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"tag this : {n} saw the {x} in the garden",
                                        "response": LABEL[x]}) + "\n"
                            for n in ("anna", "ben", "emma") for x in NOUNS))
    harmful = root / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"how do i zorbulate the {o}",
                                           "response": "sure . step one : [redacted] ."}) + "\n"
                               for o in ("wug", "dax", "fep", "toma")))
    return model, task, harmful


def test_loss_falls_and_only_response_tokens_carry_it(setup, tmp_path: Path, monkeypatch) -> None:
    from surgery.cli.main import cli

    import surgery.methods.finetune as ft

    model_dir, task, harmful = setup
    seen: dict = {}
    real_loop = ft.train_loop

    def spy(model, samples, **kw):
        seen["samples"], seen["model"], seen["pad"] = list(samples), model, kw["pad_id"]
        return real_loop(model, samples, **kw)

    monkeypatch.setattr(ft, "train_loop", spy)
    out = tmp_path / "adapter"
    r = CliRunner().invoke(cli, ["attack", "finetune", str(model_dir), "--data", str(task), "--harmful", str(harmful),
                                 "--ratio", "0.25", "--epochs", "10", "--lr", "3e-2", "--batch-size", "8",
                                 "--lora-r", "4", "--lora-alpha", "8", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record["final_loss"] < 0.5 * record["first_loss"]  # the loss falls
    n = record["n_examples"]
    assert n == 24 and record["n_harmful"] == int(0.25 * n) == 6 and record["lora"]["r"] == 4
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "surgery_finetune.json").read_text())["ratio"] == 0.25

    # labels: -100 exactly on the chat-templated prompt, the response (+ EOS) elsewhere
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = {json.loads(line)["prompt"]: json.loads(line)["response"]
               for f in (task, harmful) for line in f.read_text().splitlines()}

    def template(prompt: str) -> list[int]:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    assert tok.unk_token_id not in template(next(iter(prompts)))
    n_harm = 0
    for s in seen["samples"]:
        prompt = next(p for p in prompts if s.input_ids[:len(template(p))] == template(p))
        n_harm += prompt.startswith("how do i")
        p_ids = template(prompt)
        r_ids = tok(prompts[prompt], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert s.input_ids == p_ids + r_ids
        assert s.labels == [-100] * len(p_ids) + r_ids
    assert n_harm == 6

    # the model's loss is the mean NLL over the response tokens only
    from surgery.methods.finetune import collate

    model = seen["model"]
    batch = collate(seen["samples"][:5], seen["pad"])
    with torch.no_grad():
        loss = model(**batch).loss
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    nll = -logp[:, :-1].gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
    torch.testing.assert_close(loss, nll.mean(), atol=1e-5, rtol=1e-5)
    assert int(keep.sum()) == sum(len(s.labels) - s.labels.count(-100) for s in seen["samples"][:5])


def test_bad_inputs_exit_2_and_write_nothing(setup, tmp_path: Path) -> None:
    from surgery.cli.main import main

    model_dir, task, harmful = setup
    out = tmp_path / "o"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [["--data", str(tmp_path / "missing.jsonl")], ["--data", str(empty)],
             ["--data", str(task), "--harmful", str(harmful), "--ratio", "1.5"],
             ["--data", str(task), "--freeze-mask", str(task)],
             ["--data", str(task), "--full", "--salora", str(task)]]
    for args in cases:
        with pytest.raises(SystemExit) as exc:
            main(["attack", "finetune", str(model_dir), *args, "-o", str(out)])
        assert exc.value.code == 2, args
        assert not out.exists()


def test_freeze_mask_keeps_masked_weights_in_full_finetuning(setup, tmp_path: Path) -> None:
    from surgery.cli.main import cli

    from surgery.io.checkpoint import Checkpoint
    from surgery.io.writer import write_tensors

    model_dir, task, _ = setup
    src = Checkpoint.open(model_dir)
    name = "model.layers.0.mlp.down_proj.weight"
    mask = torch.zeros(src.info(name).shape, dtype=torch.bool)
    mask[:, ::2] = True
    write_tensors(tmp_path / "mask.safetensors", {name: mask})
    out = tmp_path / "full"
    r = CliRunner().invoke(cli, ["attack", "finetune", str(model_dir), "--data", str(task), "--full", "--epochs", "1",
                                 "--batch-size", "8", "--freeze-mask", str(tmp_path / "mask.safetensors"),
                                 "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["freeze_mask"].endswith("mask.safetensors")
    before, after = src.get(name), Checkpoint.open(out).get(name)
    assert torch.equal(before[mask], after[mask]) and not torch.equal(before[~mask], after[~mask])


def test_salora_keeps_lora_updates_out_of_the_safety_subspace(setup, tmp_path: Path) -> None:
    from surgery.cli.main import cli

    from surgery.io.adapter import LoraAdapter
    from surgery.io.writer import write_tensors
    from surgery.methods.salora import KIND, U_SUFFIX

    model_dir, task, _ = setup
    U, _ = torch.linalg.qr(torch.randn(32, 3, generator=torch.Generator().manual_seed(0)))
    module_path = "model.layers.0.self_attn.o_proj"
    write_tensors(tmp_path / "m.safetensors", {module_path + U_SUFFIX: U.contiguous()},
                  metadata={"surgery.kind": KIND})
    out = tmp_path / "salora"
    r = CliRunner().invoke(cli, ["attack", "finetune", str(model_dir), "--data", str(task), "--epochs", "1",
                                 "--batch-size", "8", "--salora", str(tmp_path / "m.safetensors"), "-o", str(out),
                                 "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["lora"]["targets"] == ["o_proj"]  # taken from the module
    adapter = LoraAdapter.open(out)
    m = next(m for p, m in adapter.modules.items() if p.endswith("layers.0.self_attn.o_proj"))
    B = adapter.lora_B(m)
    assert float(B.abs().max()) > 0 and float((U.T @ B).abs().max()) < 1e-5
