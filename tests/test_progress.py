"""Progress in a pipe: plain lines on stderr, one per stage (and one per interval while a stage runs),
never a terminal escape code; bars only on a terminal; nothing with SURGERY_PROGRESS=0."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import surgery.progress as progress
from surgery.progress import Status, track

DONE = re.compile(r"^(?P<stage>[\w ]+): (?P<done>\d+)/(?P<total>\d+) in \d+\.\d s$")


@pytest.fixture
def piped(monkeypatch):
    """stderr as a pipe with no override: what `surgery ... 2> log` gets."""
    monkeypatch.delenv("SURGERY_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)


def test_a_pipe_gets_one_plain_line_per_stage(piped, capsys):
    assert progress.mode() == "lines"
    assert sum(track(range(5), description="layers")) == 10
    assert list(track(["a", "b"], description="copy files")) == ["a", "b"]
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2, err
    first, second = (DONE.match(line) for line in lines)
    assert first and (first["stage"], first["done"], first["total"]) == ("layers", "5", "5")
    assert second and (second["stage"], second["done"], second["total"]) == ("copy files", "2", "2")
    assert "\x1b" not in err and "\r" not in err


def test_a_long_stage_reports_while_it_runs(piped, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)  # every item counts as "a while"
    list(track(range(4), description="merge"))
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r"\d+\.\d s", "T", line) for line in lines] == [
        "merge: 1/4 (25%) after T", "merge: 2/4 (50%) after T", "merge: 3/4 (75%) after T", "merge: 4/4 in T",
    ]


def test_a_generator_without_length_counts_what_it_saw(piped, capsys):
    list(track((i for i in range(3)), description="shards"))
    assert re.fullmatch(r"shards: 3 in \d+\.\d s\n", capsys.readouterr().err)


def test_status_prints_its_last_text_once_at_the_end(piped, capsys):
    with Status("LoRA fine-tune") as status:
        for step in range(3):
            status.update(f"step {step + 1}/3 loss {1.0 / (step + 1):.3f}")
    err = capsys.readouterr().err
    assert re.fullmatch(r"LoRA fine-tune step 3/3 loss 0\.333 in \d+\.\d s\n", err), err


def test_off_prints_nothing_and_a_terminal_gets_bars(monkeypatch, capsys):
    monkeypatch.setenv("SURGERY_PROGRESS", "0")
    list(track(range(3), description="x"))
    with Status("y") as status:
        status.update("z")
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("SURGERY_PROGRESS")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.mode() == "bar"
    monkeypatch.setenv("SURGERY_PROGRESS", "lines")
    assert progress.mode() == "lines"


def test_merge_in_a_pipe_logs_its_stage(tmp_path):
    """The real command with stderr a pipe: a plain line for the merge loop, nothing else on stderr."""
    from tests.factories import make_adapter, make_base

    base = make_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    env = {k: v for k, v in os.environ.items() if k != "SURGERY_PROGRESS"}
    run = subprocess.run([sys.executable, "-c", "from surgery.cli.main import main; main()", "merge", str(base),
                          str(adapter), "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and DONE.match(lines[0]) and lines[0].startswith("merge: "), run.stderr
    assert "\x1b" not in run.stderr
