"""One file mode for every output: 0666 (directories 0777) less the umask, whoever wrote the file.

safetensors' own writer (used by transformers' and peft's `save_pretrained`) creates 0600
files; the output layer gives them the same mode as the files the toolkit writes itself.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from surgery.cli.main import main

os.environ.setdefault("SURGERY_PROGRESS", "0")


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


def _expected(root: Path, mask: int) -> dict[str, int]:
    found = {".": 0o777 & ~mask}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = (0o777 if path.is_dir() else 0o666) & ~mask
    return found


def _cli(capsys, *args: object) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    assert info.value.code == 0, capsys.readouterr().err


def test_merge_output_modes_follow_the_umask(quick_testbed, tmp_path, capsys, umask):
    out = tmp_path / "merged"
    _cli(capsys, "merge", quick_testbed.aligned, quick_testbed.attacked, "-o", out)
    modes = _modes(out)
    assert modes == _expected(out, umask)
    assert modes["model.safetensors"] == (0o644 if umask == 0o022 else 0o600)
    assert modes["."] == (0o755 if umask == 0o022 else 0o700)


def test_finetune_output_modes_follow_the_umask(quick_testbed, tmp_path, capsys, umask):
    task = tmp_path / "task.jsonl"
    rows = [json.loads(line) for line in quick_testbed.file("task_train.jsonl").read_text().splitlines()[:4]]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "adapter"
    _cli(capsys, "attack", "finetune", quick_testbed.aligned, "--data", task, "--epochs", "1", "--batch-size", "4",
         "--lora-r", "2", "--device", "cpu", "-o", out)
    modes = _modes(out)
    assert "adapter_model.safetensors" in modes  # written by peft through safetensors (0600 on its own)
    assert modes == _expected(out, umask)
    assert modes["adapter_model.safetensors"] == (0o644 if umask == 0o022 else 0o600)
