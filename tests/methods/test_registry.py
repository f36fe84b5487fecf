"""The registry: every method has a known kind and roles, a CLI command, a docs page and a demo row."""

from __future__ import annotations

from pathlib import Path

import pytest
from surgery.cli.main import cli

from surgery.methods.registry import KINDS, REGISTRY, ROLES, get

ROOT = Path(__file__).resolve().parents[2]


def _command(path: str):
    words = path.split()[1:]
    cmd = cli
    ctx = None
    import click

    ctx = click.Context(cli)
    for word in words:
        cmd = cmd.get_command(ctx, word)  # type: ignore[union-attr]
        assert cmd is not None, f"{path}: no command {word!r}"
    return cmd


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_is_complete(name):
    spec = get(name)
    assert spec.kind in KINDS
    assert set(spec.needs) | set(spec.optional) <= set(ROLES)
    assert _command(spec.command) is not None
    assert spec.docs and (ROOT / spec.docs).is_file(), f"{name}: docs page {spec.docs} missing"
    if spec.kind != "utility":
        assert spec.demo, f"{name}: no demo row"
    if spec.config:
        assert spec.config_class().method == name
    if spec.run:
        assert callable(spec.runner())


def test_unknown_method_is_a_one_line_error():
    from surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match="unknown method 'nope'; known: antidote"):
        get("nope")
