"""Click options generated from a method config, and the shared option parsers."""

from __future__ import annotations

import json

import click
from click.testing import CliRunner
from surgery.cli.options import config_options, output_options, split_targets

from tests.methods.test_config import ToyConfig


@click.command()
@config_options(ToyConfig)
@output_options()
def toy(config: ToyConfig, out: str, force: bool) -> None:
    click.echo(json.dumps({"config": config.to_dict(), "out": out, "force": force}))


def _run(*args: str):
    return CliRunner().invoke(toy, list(args), standalone_mode=False, catch_exceptions=True)


def test_flags_parse_into_one_validated_config():
    res = _run("-o", "x", "--ratio", "0.2", "--scope", "tensor", "--no-chat-template",
               "--targets", "q_proj,v_proj", "--targets", "o_proj", "--limit", "4")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got == {"config": {"ratio": 0.2, "scope": "tensor", "steps": 10, "chat_template": False,
                              "targets": ["q_proj", "v_proj", "o_proj"], "limit": 4},
                   "out": "x", "force": False}


def test_defaults_come_from_the_config():
    got = json.loads(_run("-o", "x").output)["config"]
    assert got == ToyConfig().to_dict()


def test_bad_value_is_the_config_error():
    res = _run("-o", "x", "--ratio", "1.5")
    assert res.exception is not None and "toy: ratio must lie in [0, 1), got 1.5" in str(res.exception)
    res = _run("-o", "x", "--scope", "col")
    assert res.exit_code != 0 and "col" in str(res.exception)


def test_help_shows_defaults_and_ranges():
    out = CliRunner().invoke(toy, ["--help"]).output
    assert "--ratio FLOAT" in out and "Range [0, 1)." in out
    assert "--chat-template / --no-chat-template" in out
    assert "--hook" not in out


def test_split_targets():
    assert split_targets(("q_proj,v_proj", "o_proj")) == ["q_proj", "v_proj", "o_proj"]
    assert split_targets(()) is None and split_targets(None) is None
    assert split_targets("a b") == ["a", "b"]
