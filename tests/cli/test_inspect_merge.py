"""`surgery inspect` and `surgery merge` end to end: outputs, exit codes, one-line errors, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from surgery.cli.main import main

from surgery.io.checkpoint import Checkpoint
from tests.factories import make_adapter, make_base

os.environ.setdefault("SURGERY_PROGRESS", "0")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-models")
    base = make_base(root / "base", "llama")
    adapter = make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"], use_dora=True)
    plain = make_adapter(base, root / "plain", target_modules=["q_proj", "v_proj", "down_proj"])
    gpt2 = make_base(root / "gpt2", "gpt2")
    fp16 = make_base(root / "fp16", "llama", dtype=torch.float16)
    huge = make_adapter(fp16, root / "huge", target_modules=["q_proj"], scale=300.0)
    return {"base": base, "adapter": adapter, "plain": plain, "gpt2": gpt2, "fp16": fp16, "huge": huge,
            "root": root}


def run(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def assert_refused(capsys, args, message: str, out_dir: Path) -> None:
    """Exit code 2, one line on stderr naming the problem, and nothing at or beside the output."""
    before = set(out_dir.parent.iterdir()) if out_dir.parent.exists() else set()
    code, out, err = run(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert not out_dir.exists()
    after = set(out_dir.parent.iterdir()) if out_dir.parent.exists() else set()
    assert after == before, "something was left beside the output"


def copy_base(models, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(models["base"], target)
    return target


def write_sharded(models, tmp_path: Path, shard_name_for_second: str) -> Path:
    """A two-shard copy of the base whose index names the second shard `shard_name_for_second`."""
    target = tmp_path / "sharded"
    target.mkdir()
    tensors = load_file(str(models["base"] / "model.safetensors"))
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({n: tensors[n] for n in first}, target / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({n: tensors[n] for n in second}, target / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: shard_name_for_second for n in second})
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(models["base"] / "config.json", target / "config.json")
    return target


# ----------------------------------------------------------------------------- happy paths
def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "merge" in out and "inspect" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "surgery" in out


def test_inspect_checkpoint_json(capsys, models):
    code, out, _ = run(capsys, "inspect", models["base"], "--json")
    assert code == 0
    summary = json.loads(out)
    ckpt = Checkpoint.open(models["base"])
    assert summary["kind"] == "checkpoint" and summary["architecture"] == "LlamaForCausalLM"
    assert summary["tensors"] == len(ckpt) == 21
    assert summary["parameters"] == sum(ckpt.info(n).numel for n in ckpt.names())
    assert summary["dtypes"]["F32"]["bytes"] == ckpt.total_bytes
    assert summary["layers"] == 2
    assert summary["module_types"]["self_attn.q_proj.weight"] == {
        "count": 2, "parameters": 2 * 32 * 32, "shape": [32, 32], "dtype": "F32"
    }


def test_inspect_adapter_json_and_table(capsys, models):
    code, out, _ = run(capsys, "inspect", models["adapter"], "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["kind"] == "adapter" and summary["modules"] == 4 and summary["use_dora"]
    assert summary["r"] == 4 and summary["lora_alpha"] == 8 and summary["scalings"] == [2.0]
    assert sorted(summary["targets"]) == ["q_proj", "v_proj"]
    assert summary["targets"]["q_proj"] == {"modules": 2, "kind": "linear", "r": [4], "alpha": [8.0]}
    code, out, _ = run(capsys, "inspect", models["adapter"])
    assert code == 0 and "q_proj" in out and "LoRA adapter" in out and "use_dora" in out
    code, out, _ = run(capsys, "inspect", models["base"] / "model.safetensors")
    assert code == 0 and "self_attn.q_proj.weight" in out


def test_merge_cli_writes_shards_and_json(capsys, models, tmp_path):
    out_dir = tmp_path / "merged"
    code, out, err = run(capsys, "merge", models["base"], models["plain"], "-o", out_dir, "--shard-size", "20kB",
                         "--json")
    assert code == 0, err
    report = json.loads(out)
    assert len(report["merged"]) == 6 and len(report["shards"]) > 1
    assert (out_dir / "model.safetensors.index.json").exists() and (out_dir / "config.json").exists()
    code, out, _ = run(capsys, "merge", models["base"], models["plain"], "-o", out_dir, "--force")
    assert code == 0 and "merged 6 of 21 tensors" in out
    assert (out_dir / "model.safetensors").exists() and not (out_dir / "model.safetensors.index.json").exists()
    code, out, _ = run(capsys, "inspect", out_dir)
    assert code == 0 and "written by surgery" in out and "merge" in out


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29),
                                        ("1000", 1000), ("2kib", 2048)])
def test_sizes(text, value):
    from surgery.io.summary import parse_size

    assert parse_size(text) == value


def test_bad_shard_size_is_a_usage_error(capsys, models, tmp_path):
    code, _, err = run(capsys, "merge", models["base"], models["plain"], "-o", tmp_path / "o", "--shard-size", "5XB")
    assert code == 2 and "5XB" in err and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- bad inputs
def test_missing_base(capsys, models, tmp_path):
    assert_refused(capsys, ["merge", tmp_path / "nope", models["plain"], "-o", tmp_path / "o"], "does not exist",
                   tmp_path / "o")


def test_missing_adapter(capsys, models, tmp_path):
    assert_refused(capsys, ["merge", models["base"], tmp_path / "nope", "-o", tmp_path / "o"], "does not exist",
                   tmp_path / "o")


def test_missing_inspect_path(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", tmp_path / "nope")
    assert code == 2 and err.strip().count("\n") == 0 and "does not exist" in err


def test_adapter_without_config(capsys, models, tmp_path):
    broken = tmp_path / "ad"
    shutil.copytree(models["plain"], broken)
    (broken / "adapter_config.json").unlink()
    assert_refused(capsys, ["merge", models["base"], broken, "-o", tmp_path / "o"], "no adapter_config.json",
                   tmp_path / "o")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_weights(capsys, models, tmp_path):
    base = copy_base(models, tmp_path)
    (base / "model.safetensors").chmod(0)
    assert_refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"], "cannot be read", tmp_path / "o")


def test_weights_path_is_a_directory(capsys, models, tmp_path):
    base = tmp_path / "b"
    (base / "model.safetensors").mkdir(parents=True)
    assert_refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"], "holds no model weights", tmp_path / "o")


def test_truncated_header(capsys, models, tmp_path):
    base = copy_base(models, tmp_path)
    raw = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(raw[:200])
    assert_refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"], "truncated", tmp_path / "o")


def test_truncated_data(capsys, models, tmp_path):
    base = copy_base(models, tmp_path)
    raw = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(raw[:-100])
    assert_refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"], "truncated", tmp_path / "o")


def test_corrupt_header(capsys, models, tmp_path):
    base = copy_base(models, tmp_path)
    junk = b"{this is not json}"
    (base / "model.safetensors").write_bytes(struct.pack("<Q", len(junk)) + junk)
    assert_refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"], "header is not JSON",
                   tmp_path / "o")
    code, _, err = run(capsys, "inspect", base)
    assert code == 2 and "header is not JSON" in err


@pytest.mark.parametrize("shard", ["../x.safetensors", "/tmp/x.safetensors"])
def test_index_shard_outside_directory(capsys, models, tmp_path, shard):
    base = write_sharded(models, tmp_path, shard)
    assert_refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"], "not a plain file name",
                   tmp_path / "o")


def test_index_names_missing_shard(capsys, models, tmp_path):
    base = write_sharded(models, tmp_path, "model-00009-of-00009.safetensors")
    assert_refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"], "missing", tmp_path / "o")


def test_sharded_base_merges(capsys, models, tmp_path):
    base = write_sharded(models, tmp_path, "model-00002-of-00002.safetensors")
    code, _, err = run(capsys, "merge", base, models["plain"], "-o", tmp_path / "o")
    assert code == 0, err


def test_adapter_keys_do_not_match(capsys, models, tmp_path):
    assert_refused(capsys, ["merge", models["gpt2"], models["plain"], "-o", tmp_path / "o"],
                   "does not fit the base", tmp_path / "o")


def test_adapter_shapes_do_not_match(capsys, models, tmp_path):
    base = copy_base(models, tmp_path)
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(24, 32)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    assert_refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"], "base shape [24, 32]",
                   tmp_path / "o")


def test_nonfinite_refused_then_allowed(capsys, models, tmp_path):
    args = ["merge", models["fp16"], models["huge"], "-o", tmp_path / "o"]
    assert_refused(capsys, args, "NaN or Inf", tmp_path / "o")
    code, out, _ = run(capsys, *args, "--allow-nonfinite")
    assert code == 0 and "NaN/Inf" in out and (tmp_path / "o" / "model.safetensors").exists()


def test_pickle_base_refused_then_allowed(capsys, models, tmp_path):
    base = tmp_path / "pickled"
    base.mkdir()
    torch.save(load_file(str(models["base"] / "model.safetensors")), base / "pytorch_model.bin")
    shutil.copy(models["base"] / "config.json", base / "config.json")
    assert_refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"], "--allow-pickle", tmp_path / "o")
    code, _, err = run(capsys, "merge", base, models["plain"], "-o", tmp_path / "o", "--allow-pickle")
    assert code == 0, err
    code, _, err = run(capsys, "merge", models["base"], models["plain"], "-o", tmp_path / "ref")
    got, want = load_file(str(tmp_path / "o" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_pickle_adapter_refused_then_allowed(capsys, models, tmp_path):
    adapter = tmp_path / "ad"
    adapter.mkdir()
    shutil.copy(models["plain"] / "adapter_config.json", adapter)
    torch.save(load_file(str(models["plain"] / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    assert_refused(capsys, ["merge", models["base"], adapter, "-o", tmp_path / "o"], "--allow-pickle", tmp_path / "o")
    code, _, err = run(capsys, "merge", models["base"], adapter, "-o", tmp_path / "o", "--allow-pickle")
    assert code == 0, err


def test_existing_output_refused_without_force(capsys, models, tmp_path):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "merge", models["base"], models["plain"], "-o", out_dir)
    assert code == 2 and err.strip().count("\n") == 0 and "--force" in err
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    code, _, err = run(capsys, "merge", models["base"], models["plain"], "-o", out_dir, "--force")
    assert code == 0 and (out_dir / "model.safetensors").exists() and not (out_dir / "keep.txt").exists()


def test_unmerge_dora_refused(capsys, models, tmp_path):
    assert_refused(capsys, ["merge", models["base"], models["adapter"], "-o", tmp_path / "o", "--unmerge"],
                   "DoRA", tmp_path / "o")
