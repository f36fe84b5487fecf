"""Bad input through `surgery merge`: exit 2, one line naming the problem, nothing written, inputs unchanged."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from surgery.cli.main import main

from surgery.io.summary import format_size
from tests.factories import make_adapter, make_base

os.environ.setdefault("SURGERY_PROGRESS", "0")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-input")
    base = make_base(root / "base", "llama")
    plain = make_adapter(base, root / "plain", target_modules=["q_proj", "v_proj"])
    return {"base": base, "plain": plain}


def run(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (FIFOs are named, not read)."""
    out: dict[str, str] = {}
    for path in paths:
        for f in sorted([path] if not path.is_dir() else path.rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
            elif not f.is_dir():
                out[str(f)] = "special"
    return out


def refused(capsys, args: list[object], message: str, out_dir: Path, inputs: list[Path]) -> str:
    """Exit 2, one `error:` line holding `message`, nothing at or beside `out_dir`, inputs byte-identical."""
    before_inputs = digest(*inputs)
    parent = out_dir.parent
    before = set(parent.iterdir()) if parent.exists() else set()
    code, _, err = run(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert "internal error" not in err and "weights_only=False" not in err
    assert not out_dir.exists()
    assert (set(parent.iterdir()) if parent.exists() else set()) == before, "something was left beside the output"
    assert digest(*inputs) == before_inputs, "an input changed"
    return lines[0]


def merged(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "model.safetensors"))


# ----------------------------------------------------------------------------- pickles
class _Evil:
    """A pickle payload that would run a shell command if unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_base_names_the_blocked_global(capsys, models, tmp_path, legacy):
    marker = tmp_path / "MARKER"
    base = tmp_path / "evil"
    base.mkdir()
    shutil.copy(models["base"] / "config.json", base)
    torch.save({"x": _Evil(marker)}, base / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    line = refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o", "--allow-pickle"],
                   f"blocked global {os.system.__module__}.system in the pickle; refusing", tmp_path / "o",
                   [base, models["plain"]])
    assert str(base / "pytorch_model.bin") in line and "weights_only=True only" in line
    assert not marker.exists()


def test_malicious_pickle_adapter_names_the_blocked_global(capsys, models, tmp_path):
    marker = tmp_path / "MARKER"
    adapter = tmp_path / "evil-adapter"
    adapter.mkdir()
    shutil.copy(models["plain"] / "adapter_config.json", adapter)
    torch.save({"x": _Evil(marker)}, adapter / "adapter_model.bin")
    refused(capsys, ["merge", models["base"], adapter, "-o", tmp_path / "o", "--allow-pickle"],
            "blocked global posix.system in the pickle; refusing", tmp_path / "o", [adapter, models["base"]])
    assert not marker.exists()


def test_legacy_non_zip_pickle_base_merges_like_safetensors(capsys, models, tmp_path):
    base = tmp_path / "legacy"
    base.mkdir()
    shutil.copy(models["base"] / "config.json", base)
    torch.save(load_file(str(models["base"] / "model.safetensors")), base / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    code, _, err = run(capsys, "merge", base, models["plain"], "-o", tmp_path / "o", "--allow-pickle")
    assert code == 0, err
    code, _, err = run(capsys, "merge", models["base"], models["plain"], "-o", tmp_path / "ref")
    assert code == 0, err
    got, want = merged(tmp_path / "o"), merged(tmp_path / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- adapter config
def _adapter_with(models, tmp_path: Path, text: str) -> Path:
    adapter = tmp_path / "ad"
    shutil.copytree(models["plain"], adapter)
    (adapter / "adapter_config.json").write_text(text)
    return adapter


def _config_with(models, **changes: object) -> str:
    config = json.loads((models["plain"] / "adapter_config.json").read_text())
    config.update(changes)
    return json.dumps(config)


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("use_rslora", "false", "a JSON boolean"),
        ("use_dora", "yes", "a JSON boolean"),
        ("fan_in_fan_out", 1, "a JSON boolean"),
        ("lora_alpha", 1e300, "a finite number with |lora_alpha| <= 65504 (the largest fp16 number"),
        ("lora_alpha", "16", "a finite number"),
        ("r", 0, "a whole number of at least 1"),
        ("r", 4.5, "a whole number of at least 1"),
        ("r", True, "a whole number of at least 1"),
        ("rank_pattern", {"q_proj": -2}, "ranks of at least 1"),
        ("rank_pattern", ["q_proj"], "an object mapping module regexes"),
        ("rank_pattern", {"q[": 4}, "an object mapping module regexes"),
        ("alpha_pattern", {"q_proj": "big"}, "finite alphas"),
        ("target_modules", 5, "a module name (string) or a list"),
        ("target_modules", ["q_proj", 3], "a module name (string) or a list"),
        ("lora_dropout", 2.0, "a number from 0 to 1"),
        ("bias", "some", '"none", "all", "lora_only"'),
    ],
)
def test_bad_adapter_config_field(capsys, models, tmp_path, field, value, expected):
    adapter = _adapter_with(models, tmp_path, _config_with(models, **{field: value}))
    line = refused(capsys, ["merge", models["base"], adapter, "-o", tmp_path / "o"],
                   f"has an invalid value for {field}: {value!r}; expected ", tmp_path / "o",
                   [adapter, models["base"]])
    assert str(adapter / "adapter_config.json") in line and expected in line.split("; expected ", 1)[1]


def test_nan_lora_alpha_is_refused(capsys, models, tmp_path):
    config = json.loads((models["plain"] / "adapter_config.json").read_text())
    text = json.dumps({**config, "lora_alpha": math.nan})  # json writes the NaN token Python reads back
    assert "NaN" in text
    adapter = _adapter_with(models, tmp_path, text)
    refused(capsys, ["merge", models["base"], adapter, "-o", tmp_path / "o"], "invalid value for lora_alpha: nan",
            tmp_path / "o", [adapter, models["base"]])


def test_real_booleans_still_merge_as_peft_does(capsys, models, tmp_path):
    """`use_rslora: true` scales by alpha/sqrt(r), `false` by alpha/r: the deltas differ by sqrt(r) = 2."""
    base_q = load_file(str(models["base"] / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    deltas = {}
    for flag in (False, True):
        adapter = _adapter_with(models, tmp_path / str(flag), _config_with(models, use_rslora=flag))
        code, _, err = run(capsys, "merge", models["base"], adapter, "-o", tmp_path / f"o{flag}")
        assert code == 0, err
        deltas[flag] = merged(tmp_path / f"o{flag}")["model.layers.0.self_attn.q_proj.weight"] - base_q
    torch.testing.assert_close(deltas[True], deltas[False] * 2.0)


def test_missing_lora_alpha_warns_with_peft_default(models, tmp_path):
    config = json.loads((models["plain"] / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 8  # the factory's alpha equals peft's default, so the result must match
    del config["lora_alpha"]
    adapter = _adapter_with(models, tmp_path, json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-m", "surgery.cli.main", "merge", str(models["base"]), str(adapter), "-o",
         str(tmp_path / "o")], capture_output=True, text=True, env={**os.environ, "SURGERY_PROGRESS": "0"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "has no lora_alpha; using peft's default 8" in done.stderr
    reference = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "surgery.cli.main", "merge", str(models["base"]), str(models["plain"]),
                    "-o", str(reference)], check=True, capture_output=True, timeout=300)
    got, want = merged(tmp_path / "o"), merged(reference)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_bom_in_adapter_config_is_accepted(capsys, models, tmp_path):
    adapter = tmp_path / "ad"
    shutil.copytree(models["plain"], adapter)
    text = (adapter / "adapter_config.json").read_bytes()
    (adapter / "adapter_config.json").write_bytes(b"\xef\xbb\xbf" + text)
    code, _, err = run(capsys, "merge", models["base"], adapter, "-o", tmp_path / "o")
    assert code == 0, err
    code, _, err = run(capsys, "merge", models["base"], models["plain"], "-o", tmp_path / "ref")
    got, want = merged(tmp_path / "o"), merged(tmp_path / "ref")
    assert all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- paths
def test_fifo_base_is_not_a_regular_file(capsys, models, tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    refused(capsys, ["merge", fifo, models["plain"], "-o", tmp_path / "o"],
            f"{fifo} is not a regular file (it is a FIFO (named pipe))", tmp_path / "o", [models["plain"], fifo])


def test_fifo_inside_model_directory_is_not_a_regular_file(capsys, models, tmp_path):
    base = tmp_path / "b"
    base.mkdir()
    shutil.copy(models["base"] / "config.json", base)
    os.mkfifo(base / "model.safetensors")
    refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"], "is not a regular file",
            tmp_path / "o", [models["plain"], base])


def test_fifo_shard_named_by_index_is_not_missing(capsys, models, tmp_path):
    base = tmp_path / "b"
    base.mkdir()
    tensors = load_file(str(models["base"] / "model.safetensors"))
    save_file(tensors, base / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    os.mkfifo(base / "model-00002-of-00002.safetensors")
    names = sorted(tensors)
    weight_map = {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(names)}
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    line = refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"],
                   "model-00002-of-00002.safetensors is not a regular file", tmp_path / "o", [models["plain"], base])
    assert "missing" not in line


def test_output_is_current_directory(capsys, models, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    for extra in ([], ["--force"]):
        before = digest(work, models["base"], models["plain"])
        code, _, err = run(capsys, "merge", models["base"], models["plain"], "-o", ".", *extra)
        assert code == 2 and err.count("\n") == 1 and "is the current directory" in err, err
        assert digest(work, models["base"], models["plain"]) == before
        assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]


# ----------------------------------------------------------------------------- writing
def test_free_space_is_checked_before_writing(capsys, models, tmp_path, monkeypatch):
    code, _, err = run(capsys, "merge", models["base"], models["plain"], "-o", tmp_path / "ref")
    assert code == 0, err
    size = sum(f.stat().st_size for f in (tmp_path / "ref").iterdir())  # what the output really takes
    import surgery.io.writer as writer

    monkeypatch.setattr(writer, "free_bytes", lambda directory: size - 1)
    out = tmp_path / "sub" / "o"
    refused(capsys, ["merge", models["base"], models["plain"], "-o", out],
            f"the output needs {format_size(size)}, {format_size(size - 1)} free at {out.parent}", out,
            [models["base"], models["plain"]])
    assert not out.parent.exists()
    monkeypatch.setattr(writer, "free_bytes", lambda directory: size)
    code, _, err = run(capsys, "merge", models["base"], models["plain"], "-o", out)
    assert code == 0, err


def test_free_space_message_uses_megabytes(monkeypatch, tmp_path):
    import surgery.io.writer as writer
    from surgery.errors import SurgeryError

    monkeypatch.setattr(writer, "free_bytes", lambda directory: 2_000_000)
    with pytest.raises(SurgeryError, match=r"needs 198.00 MB, 2.00 MB free at "):
        writer.check_free_space(tmp_path, 198_000_000)


@pytest.mark.parametrize("code_,text", [
    (errno.EROFS, "Read-only file system; choose an output on a writable file system"),
    (errno.ENOSPC, "No space left on device; free some space or choose another output directory"),
    (errno.EDQUOT, "Disk quota exceeded; free some space"),
    (errno.EACCES, "Permission denied; check its permissions"),
])
def test_environment_write_errors_are_one_line(capsys, models, tmp_path, monkeypatch, code_, text):
    def fail(*args, **kwargs):
        raise OSError(code_, os.strerror(code_), str(tmp_path / "o"))

    monkeypatch.setattr(os, "pwrite", fail)
    monkeypatch.setattr(os, "copy_file_range", fail, raising=False)
    refused(capsys, ["merge", models["base"], models["plain"], "-o", tmp_path / "o"], text, tmp_path / "o",
            [models["base"], models["plain"]])


def test_other_os_errors_stay_internal(capsys, models, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(os, "pwrite", fail)
    monkeypatch.setattr(os, "copy_file_range", fail, raising=False)
    code, _, err = run(capsys, "merge", models["base"], models["plain"], "-o", tmp_path / "o")
    assert code == 1 and "internal error" in err and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- NaN blame
def test_nan_already_in_base_is_blamed_on_the_base(capsys, models, tmp_path):
    base = tmp_path / "nanbase"
    shutil.copytree(models["base"], base)
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight"][3, 5] = float("nan")
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    refused(capsys, ["merge", base, models["plain"], "-o", tmp_path / "o"],
            "the base tensor model.layers.0.self_attn.q_proj.weight already holds NaN or Inf", tmp_path / "o",
            [base, models["plain"]])


def test_nan_from_the_adapter_is_blamed_on_the_adapter(capsys, models, tmp_path):
    adapter = tmp_path / "nanad"
    shutil.copytree(models["plain"], adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in sorted(tensors) if "q_proj.lora_B" in k)
    tensors[key][0, 0] = float("inf")
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    line = refused(capsys, ["merge", models["base"], adapter, "-o", tmp_path / "o"],
                   "which the base holds finite; the adapter looks broken", tmp_path / "o", [adapter, models["base"]])
    assert "q_proj.weight" in line
