"""The method-config contract: typed fields, ranges and choices checked with the field named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from surgery.methods.config import ConfigError, MethodConfig, option


@dataclass(frozen=True, kw_only=True)
class ToyConfig(MethodConfig):
    method = "toy"
    ratio: float = option(0.1, "share to prune", low=0.0, high=1.0, high_open=True)
    scope: Literal["row", "tensor"] = option("row", "where the share is taken")
    steps: int = option(10, "steps", low=1)
    chat_template: bool = option(True, "use the chat template")
    targets: tuple[str, ...] = option((), "modules")
    limit: int | None = option(None, "first N samples", low=1)
    hook: str | None = option(None, "python only", cli=False)


def test_defaults_and_coercion():
    c = ToyConfig(ratio=0, targets=["q_proj", "v_proj"])
    assert c.ratio == 0.0 and isinstance(c.ratio, float)
    assert c.targets == ("q_proj", "v_proj")
    assert c.to_dict() == {"ratio": 0.0, "scope": "row", "steps": 10, "chat_template": True,
                           "targets": ["q_proj", "v_proj"], "limit": None}


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.0}, "toy: ratio must lie in [0, 1), got 1"),
    ({"ratio": -0.5}, "toy: ratio must lie in [0, 1), got -0.5"),
    ({"ratio": float("nan")}, "toy: ratio must be a number, got NaN"),
    ({"ratio": "0.1"}, "toy: ratio must be a number, got '0.1'"),
    ({"scope": "col"}, "toy: scope must be one of row, tensor, got 'col'"),
    ({"steps": 0}, "toy: steps must lie in [1, inf), got 0"),
    ({"steps": 2.5}, "toy: steps must be an integer, got 2.5"),
    ({"steps": True}, "toy: steps must be an integer, got True"),
    ({"chat_template": "false"}, "toy: chat_template must be true or false, got 'false'"),
    ({"targets": "q_proj"}, "toy: targets must be a list, got 'q_proj'"),
    ({"limit": 0}, "toy: limit must lie in [1, inf), got 0"),
])
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        ToyConfig(**kwargs)
    assert str(info.value) == message


def test_from_dict_round_trip_and_unknown_keys():
    c = ToyConfig(ratio=0.25, scope="tensor", limit=3)
    assert ToyConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown option\\(s\\) sparsity"):
        ToyConfig.from_dict({"sparsity": 0.5})
    with pytest.raises(ConfigError, match="ratio must lie"):
        c.replace(ratio=2.0)


def test_fields_describe_flags_and_ranges():
    infos = {f.name: f for f in ToyConfig.fields()}
    assert infos["chat_template"].flag == "--chat-template"
    assert infos["ratio"].range_text() == "[0, 1)"
    assert infos["steps"].range_text() == "[1, inf)"
    assert not infos["hook"].cli
