"""The `surgery` entry point: `--help` without torch, the source-read command list, -v/-vv logging."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from safetensors.torch import save_file
from surgery.cli import main as cli_main
from surgery.cli.command_index import command_index, entries_in_source

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import sys
from surgery.cli.main import main
try:
    main({argv!r})
except SystemExit as exc:
    code = exc.code
print("exit", code, "torch", "torch" in sys.modules, "transformers", "transformers" in sys.modules)
"""


def _probe(argv: list[str]) -> str:
    res = subprocess.run([sys.executable, "-c", _PROBE.format(argv=argv)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=dict(os.environ, SURGERY_PROGRESS="0"))
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["--version"]])
def test_help_does_not_import_torch(argv: list[str]) -> None:
    assert _probe(argv) == "exit 0 torch False transformers False"


def test_the_probe_sees_torch_when_a_command_needs_it() -> None:
    """The probe above can fail: `wanda --help` builds its options from the method module."""
    assert _probe(["wanda", "--help"]) == "exit 0 torch True transformers False"


def test_listing_matches_clicks_own_help() -> None:
    """Names and one-line helps read from source equal what click gives for the imported commands."""
    index = command_index()
    imported: dict[str, click.Command] = {}
    for module in sorted({e.module for e in index.values()}):
        for command in importlib.import_module(module).COMMANDS:
            imported[command.name] = command
    assert set(index) == set(imported)
    assert all(e.readable for e in index.values())
    for limit in (30, 45, 80):
        for name, command in imported.items():
            assert index[name].short_help_str(limit) == command.get_short_help_str(limit), name


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == sorted(command_index())
    assert "Show what a checkpoint or LoRA adapter holds" in out


def test_unreadable_source_is_left_to_click() -> None:
    computed = 'import click\nNAME = "x"\n@click.command(NAME)\ndef x_command():\n    """Doc."""\nCOMMANDS = [x_command]\n'
    literal = computed.replace("(NAME)", '("x", short_help="Short.")')
    assert entries_in_source(computed, "m") == []
    [entry] = entries_in_source(literal, "m")
    assert (entry.name, entry.help, entry.short_help_str(45)) == ("x", "Doc.", "Short.")


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(4, 3)}, str(path))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        cli_main.main(list(argv))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_vv_shows_library_debug_lines(capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path) -> None:
    code, out, err = _run(capsys, "-vv", "inspect", str(tiny_checkpoint), "--json")
    assert code == 0 and '"tensors": 1' in out
    assert f"D surgery.io.summary: {tiny_checkpoint}: no adapter_config.json, reading it as a checkpoint" in err
    assert logging.getLogger("surgery").level == logging.DEBUG


def test_default_and_v_hide_debug_lines(capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path) -> None:
    code, _, err = _run(capsys, "inspect", str(tiny_checkpoint), "--json")
    assert code == 0 and err == ""
    assert logging.getLogger("surgery").level == logging.WARNING
    code, _, err = _run(capsys, "-v", "inspect", str(tiny_checkpoint), "--json")
    assert code == 0 and "D surgery." not in err
    assert logging.getLogger("surgery").level == logging.INFO


def test_v_shows_info_lines_from_the_writer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """-v shows INFO lines; repeated runs in one process replace the handler, not stack it."""
    from surgery.io.writer import CheckpointWriter, TensorSpec

    weight = torch.zeros(2, 2)
    cli_main.configure_logging(1)
    cli_main.configure_logging(1)
    with CheckpointWriter(tmp_path / "out", [TensorSpec.like("w", weight)]) as writer:
        writer.write("w", weight)
    err = capsys.readouterr().err
    assert err.count(f"I surgery.io.writer: wrote {tmp_path / 'out'} (1 tensors, 1 shards)") == 1
    assert "D surgery." not in err
    cli_main.configure_logging(0)
