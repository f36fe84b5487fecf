"""SaLoRA: the fitted U against an SVD of the features, the fold, and fine-tuning with C in the forward."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.errors import SurgeryError
from surgery.methods.salora import (
    U_SUFFIX,
    apply_salora,
    fit_salora,
    load_module,
    salora_prepare,
    salora_targets,
    top_eigenvectors,
)
from tests.factories import make_adapter
from tests.methods.test_neurons import BENIGN, HARM, make_chat_model, write_pairs

os.environ.setdefault("SURGERY_PROGRESS", "0")
RANK = 3


def projector(U: torch.Tensor) -> torch.Tensor:
    return U.double() @ U.double().T


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("salora")
    model = make_chat_model(root / "model", seed=0)
    safety = write_pairs(root / "safety.jsonl", HARM, "sorry , i cannot help with that request .")
    module = root / "module.safetensors"
    fit_salora(model, safety, module, rank=RANK, targets=["q_proj", "v_proj"])
    return {"model": model, "safety": safety, "module": module,
            "task": write_pairs(root / "task.jsonl", BENIGN, "sure . to {v} the {o} , use a brush .")}


def features(model_dir: Path, data: Path, module_name: str) -> torch.Tensor:
    """Y = X W^T of one Linear at the response tokens, captured by hand, one sample at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.calib.data import load_pairs, tokenize_pairs

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lin = model.get_submodule(module_name)
    rows: list[torch.Tensor] = []
    h = lin.register_forward_hook(lambda m, a, o: rows.append(a[0][0].detach()))
    with torch.no_grad():
        for s in tokenize_pairs(tok, load_pairs(data), 256):
            model(input_ids=s.input_ids[None])
            rows[-1] = rows[-1][s.response_mask]
    h.remove()
    return torch.cat(rows).double() @ lin.weight.detach().double().T


def test_solvers_find_the_top_singular_subspace() -> None:
    gen = torch.Generator().manual_seed(0)
    # a smooth spectrum: the 5th and 6th eigenvalues of Y^T Y differ by only 5%
    Y = torch.randn(400, 40, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.1, 40, dtype=torch.float64)
    V = torch.linalg.svd(Y, full_matrices=False).Vh[:5].T  # top right singular vectors of Y [n, d]
    G = (Y.T @ Y).float()
    for solver in ("eigh", "randomized"):
        U, vals = top_eigenvectors(G, 5, solver, niter=30, seed=1)
        assert torch.allclose(U.T.double() @ U.double(), torch.eye(5, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(projector(U), projector(V), atol=1e-4), solver
        assert bool((vals[:-1] >= vals[1:]).all())
    with pytest.raises(SurgeryError):
        top_eigenvectors(G, 41)


def test_fit_matches_svd_of_features(setup) -> None:
    Us = load_module(setup["module"])
    assert sorted(Us) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    for name, U in Us.items():
        Y = features(setup["model"], setup["safety"], name)
        V = torch.linalg.svd(Y, full_matrices=False).Vh[:RANK].T
        assert U.shape == (Y.shape[1], RANK)
        assert torch.allclose(projector(U), projector(V), atol=1e-4), name
    assert salora_targets(setup["module"]) == ["q_proj", "v_proj"]


def test_apply_folds_and_removes_the_subspace(setup, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(setup["model"], tmp_path / "adapter", r=4, lora_alpha=8,
                           target_modules=["q_proj", "k_proj", "v_proj"])
    report = apply_salora(adapter, setup["module"], tmp_path / "out")
    assert len(report.metrics["folded"]) == 4 and len(report.metrics["unprotected"]) == 2
    Us = load_module(setup["module"])
    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for key, t in after.items():
        path = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
        if key.endswith("lora_B.weight") and path in Us:
            U = Us[path].double()
            C = torch.eye(U.shape[0], dtype=torch.float64) - U @ U.T
            torch.testing.assert_close(t.double(), C @ before[key].double(), atol=1e-6, rtol=1e-5)
            dW = t.double() @ after[key.replace("lora_B", "lora_A")].double()
            assert float((U.T @ dW).abs().max()) < 1e-6  # no output in the safety subspace
        else:
            assert torch.equal(t, before[key])
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"]), tmp_path / "out")


def test_finetune_hook_projects_forward_and_saves_plain_adapter(setup, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.calib.data import load_pairs
    from surgery.methods.finetune import encode_pairs, train_loop

    tok = AutoTokenizer.from_pretrained(setup["model"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(setup["model"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    hook = salora_prepare(setup["module"])
    samples = encode_pairs(tok, load_pairs(setup["task"]))
    losses = train_loop(model, samples, pad_id=tok.pad_token_id, epochs=4, lr=1e-2, batch_size=4,
                        device=torch.device("cpu"), prepare_model=hook, progress=False)
    assert losses[-1] < losses[0]
    assert len(hook.protected) == 4 and len(hook.unprotected) == 2
    Us = load_module(setup["module"])

    # the forward is W x + s C B A x: same logits as the un-hooked model with B replaced by C B
    ids = samples[0].input_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        hooked = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "ft")
    saved = load_file(str(tmp_path / "ft" / "adapter_model.safetensors"))
    for path, U in Us.items():
        layer = model.get_submodule("base_model.model." + path)
        B = layer.lora_B["default"].weight.detach().double()
        A = layer.lora_A["default"].weight.detach().double()
        assert float((U.double().T @ B).abs().max()) > 1e-3  # training moved B inside the subspace ...
        sB = saved[f"base_model.model.{path}.lora_B.weight"].double()
        C = torch.eye(U.shape[0], dtype=torch.float64) - projector(U)
        torch.testing.assert_close(sB, C @ B, atol=1e-6, rtol=1e-5)  # ... but what is saved is C B
        assert float((U.double().T @ sB @ A).abs().max()) < 1e-5
    hook.remove()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"]), tmp_path / "ft")
    with torch.no_grad():
        plain = reloaded(input_ids=x).logits
    torch.testing.assert_close(plain, hooked, atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "ft" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_hook_refuses_models_without_matching_lora(setup) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(setup["model"])
    with pytest.raises(SurgeryError):
        salora_prepare(setup["module"])(base)
    other = get_peft_model(base, LoraConfig(r=2, target_modules=["o_proj"]))
    with pytest.raises(SurgeryError):
        salora_prepare(setup["module"])(other)


def test_cli_fit_and_apply(setup, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from surgery.cli.main import cli

    runner = CliRunner()
    mod = tmp_path / "m.safetensors"
    res = runner.invoke(cli, ["salora", "fit", str(setup["model"]), "--safety", str(setup["safety"]), "--rank", "2",
                              "--targets", "v_proj", "--solver", "randomized", "-o", str(mod), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [m["module"] for m in rep["metrics"]["modules"]] == ["model.layers.0.self_attn.v_proj",
                                                     "model.layers.1.self_attn.v_proj"]
    assert all(0 < m["energy"] <= 1 for m in rep["metrics"]["modules"])
    assert set(load_file(str(mod))) == {m["module"] + U_SUFFIX for m in rep["metrics"]["modules"]}
    adapter = make_adapter(setup["model"], tmp_path / "a", target_modules=["v_proj"])
    res = runner.invoke(cli, ["salora", "apply", str(adapter), "--module", str(mod), "-o", str(tmp_path / "o"),
                              "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["metrics"]["folded"]) == 2
    res = runner.invoke(cli, ["salora", "apply", str(adapter), "--module", str(setup["safety"]),
                              "-o", str(tmp_path / "bad")])
    assert res.exit_code != 0 and not (tmp_path / "bad").exists()


def test_task_specific_init(setup, tmp_path: Path) -> None:
    """B0 = Vt Vt^T U2 sqrt(S2), A0 = sqrt(S2) V2^T, W_res = W - s C B0 A0: same output at step 0; after
    training, the saved rank-2r adapter over the original W reproduces the fine-tuned model exactly."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.calib.data import load_pairs
    from surgery.methods.finetune import encode_pairs, train_loop
    from surgery.methods.salora import load_task_subspaces

    module = tmp_path / "task.safetensors"
    fit_salora(setup["model"], setup["safety"], module, rank=RANK, targets=["q_proj", "v_proj"],
               task=setup["task"], task_rank=4)
    Vts = load_task_subspaces(module)
    assert sorted(Vts) == sorted(load_module(module)) and all(v.shape[1] == 4 for v in Vts.values())
    tok = AutoTokenizer.from_pretrained(setup["model"])
    original = AutoModelForCausalLM.from_pretrained(setup["model"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(setup["model"]),
                           LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    samples = encode_pairs(tok, load_pairs(setup["task"]))
    x = torch.tensor([samples[0].input_ids])
    hook = salora_prepare(module, task_init=True)
    hook(model)
    path = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule("base_model.model." + path)
    W = original.get_submodule(path).weight.detach().double()
    Uw, Sw, Vhw = torch.linalg.svd(W)
    Vt = Vts[path].double()
    B0 = Vt @ Vt.T @ Uw[:, :2] @ torch.diag(Sw[:2].sqrt())
    torch.testing.assert_close(layer.lora_B["default"].weight.double(), B0, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, original(input_ids=x).logits, atol=1e-4, rtol=1e-4)
    train_loop(model, samples, pad_id=tok.pad_token_id, epochs=2, lr=1e-2, batch_size=4,
               device=torch.device("cpu"), progress=False)
    with torch.no_grad():
        tuned = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "ft")
    cfg = json.loads((tmp_path / "ft" / "adapter_config.json").read_text())
    assert set(cfg["rank_pattern"].values()) == {4} and len(cfg["rank_pattern"]) == 4
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"]), tmp_path / "ft")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, tuned, atol=1e-4, rtol=1e-4)
    merged = reloaded.merge_and_unload()
    U = load_module(module)[path].double()
    dW = merged.get_submodule(path).weight.detach().double() - W
    assert float(dW.abs().max()) > 1e-4 and float((U.T @ dW).abs().max()) < 1e-5


def test_reports_are_stored_and_config_errors_name_fields(setup, tmp_path: Path) -> None:
    from safetensors import safe_open

    from surgery.methods.config import ConfigError
    from surgery.methods.salora import SaloraFitConfig
    from surgery.report import REPORT_FILE, Report

    with pytest.raises(ConfigError, match=r"salora-fit: rank must lie in \[1, inf\)"):
        SaloraFitConfig(rank=0)
    with pytest.raises(ConfigError, match="salora-fit: solver must be one of"):
        SaloraFitConfig(rank=2, solver="svd")  # type: ignore[arg-type]
    with safe_open(str(setup["module"]), "pt") as f:
        stored = json.loads(f.metadata()["surgery.report"])
    assert stored["config"]["rank"] == RANK and len(stored["metrics"]["modules"]) == 4
    Us = load_module(setup["module"])
    assert {m["module"] for m in stored["metrics"]["modules"]} == set(Us)
    adapter = make_adapter(setup["model"], tmp_path / "a", target_modules=["q_proj", "k_proj"])
    report = apply_salora(adapter, setup["module"], tmp_path / "o")
    on_disk = Report.load(tmp_path / "o" / REPORT_FILE)
    assert on_disk.metrics["folded"] == report.metrics["folded"] == sorted(p for p in Us if "q_proj" in p)
    assert len(on_disk.metrics["unprotected"]) == 2
    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "o" / "adapter_model.safetensors"))
    assert on_disk.changed == sum(int((after[t.name] != before[t.name]).sum()) for t in on_disk.tensors) > 0
