"""The fields of a peft `adapter_config.json` this tool reads: one table of type, range and default.

Every field that changes a merge is checked here, in one place, before any tensor is read:
JSON booleans must be real booleans (the string `"false"` is truthy in Python and would
silently turn rslora on), numbers must be finite and in range, patterns must be dicts of
valid regexes to positive numbers. Fields peft adds that change nothing here are passed
through unchecked. A missing `lora_alpha` takes peft's default (8) with a warning, since
it sets the strength of every delta.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import CorruptFileError

log = logging.getLogger(__name__)

# |lora_alpha| beyond this (the largest fp16 number) makes alpha/r alone overflow fp16 weights;
# peft adapters use an alpha of a few times r.
MAX_ALPHA = 65504.0
MAX_RANK = 1 << 20  # no weight matrix has more rows or columns than this


class _Invalid(Exception):
    """A value does not fit its field."""


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid
    return value


def _rank(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise _Invalid
    return value


def _alpha(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid
    value = float(value)
    if not math.isfinite(value) or abs(value) > MAX_ALPHA:
        raise _Invalid
    return value


def _pattern(check: Callable[[Any], Any]) -> Callable[[Any], dict[str, Any]]:
    def validate(value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _Invalid
        out = {}
        for key, item in value.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error:
                raise _Invalid from None
            out[key] = check(item)
        return out

    return validate


def _names(allow_single: bool) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        if value is None or (allow_single and isinstance(value, str)):
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Invalid
        return value

    return validate


def _dropout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise _Invalid
    return float(value)


def _bias(value: Any) -> str:
    if value not in ("none", "all", "lora_only"):
        raise _Invalid
    return value


def _layers(value: Any) -> Any:
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if value is None:
        return None
    if not isinstance(items, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in items):
        raise _Invalid
    return value


@dataclass(frozen=True)
class Field:
    """One config field: its check (returns the value to use), its default and what it must be."""

    name: str
    check: Callable[[Any], Any]
    default: Any
    expected: str


SCHEMA: tuple[Field, ...] = (
    Field("r", _rank, 8, f"a whole number of at least 1 (at most {MAX_RANK})"),
    Field("lora_alpha", _alpha, 8.0, f"a finite number with |lora_alpha| <= {MAX_ALPHA:g} (the largest fp16 "
          "number; a larger alpha/r overflows fp16 weights by itself)"),
    Field("use_rslora", _boolean, False, "a JSON boolean, true or false (not a string)"),
    Field("use_dora", _boolean, False, "a JSON boolean, true or false (not a string)"),
    Field("fan_in_fan_out", _boolean, False, "a JSON boolean, true or false (not a string)"),
    Field("lora_bias", _boolean, False, "a JSON boolean, true or false (not a string)"),
    Field("inference_mode", _boolean, True, "a JSON boolean, true or false (not a string)"),
    Field("rank_pattern", _pattern(_rank), {}, "an object mapping module regexes to ranks of at least 1"),
    Field("alpha_pattern", _pattern(_alpha), {},
          f"an object mapping module regexes to finite alphas with |alpha| <= {MAX_ALPHA:g}"),
    Field("target_modules", _names(allow_single=True), None, "a module name (string) or a list of names"),
    Field("modules_to_save", _names(allow_single=False), None, "null or a list of module names"),
    Field("lora_dropout", _dropout, 0.0, "a number from 0 to 1"),
    Field("bias", _bias, "none", 'one of "none", "all", "lora_only"'),
    Field("layers_to_transform", _layers, None, "null, a layer index or a list of layer indices (>= 0)"),
)


def validate_adapter_config(config: dict[str, Any], source: Path) -> dict[str, Any]:
    """The config's values for every schema field (defaults filled in), checked against `SCHEMA`.

    Raises `CorruptFileError` naming the field, the value and what it must be; logs a
    warning when `lora_alpha` is missing.
    """
    values: dict[str, Any] = {}
    for field in SCHEMA:
        if field.name not in config:
            values[field.name] = field.default
            if field.name == "lora_alpha":
                log.warning("warning: %s has no lora_alpha; using peft's default %g", source, field.default)
            continue
        value = config[field.name]
        try:
            values[field.name] = field.check(value)
        except _Invalid:
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise CorruptFileError(
                f"{source} has an invalid value for {field.name}: {shown}; expected {field.expected}"
            ) from None
    return values
