"""The typed options of a method: one frozen dataclass per method, validated on construction.

A method's config is the single declaration of its options. The CLI expands it into
click options (`surgery.cli.options.config_options`), provenance is its `to_dict()`,
the docs list its fields, and `surgery repair` searches over its `strength` field. A
field is declared with `option(default, help, ...)`; the base class checks choices
and ranges and names the field in every error, so a bad value is caught before any
work, whether it came from the command line or from Python.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from surgery.errors import SurgeryError

__all__ = ["ConfigError", "MethodConfig", "CalibrationConfig", "Runtime", "FieldInfo", "option"]

C = TypeVar("C", bound="MethodConfig")


class ConfigError(SurgeryError):
    """A method option has a value of the wrong type or outside its range."""


@dataclass(frozen=True)
class FieldInfo:
    """What the CLI and the docs need to know of one config field."""

    name: str
    type: Any  # the resolved annotation
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    low: float | None
    high: float | None
    low_open: bool
    high_open: bool
    flag: str  # the command-line flag, e.g. "--max-length"
    cli: bool  # False: Python-only (not offered on the command line)

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def range_text(self) -> str:
        """`[0, 1)`-style text of the allowed range ('' when unbounded)."""
        if self.low is None and self.high is None:
            return ""
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[Any] | None = None,
           low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, flag: str | None = None, cli: bool = True) -> Any:
    """Declare a config field: its default, one line of help, and the values it accepts.

    `low`/`high` bound a number (closed unless `low_open`/`high_open`); `choices` lists the
    allowed values; `flag` overrides the derived `--field-name`; `cli=False` keeps a field
    out of the command line (a Python-only hook such as pre-tokenised samples)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "low": low, "high": high,
            "low_open": low_open, "high_open": high_open, "flag": flag, "cli": cli}
    if isinstance(default, (list, dict, set)):
        raise TypeError("a config default must be immutable: use a tuple")
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of every method's config. Subclasses are frozen dataclasses of `option()` fields."""

    method: ClassVar[str] = ""  # the registry name, set by each subclass

    def __post_init__(self) -> None:
        for info in self.fields():
            value = getattr(self, info.name)
            object.__setattr__(self, info.name, _check(self.method, info, value))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks of a subclass (raise `ConfigError` naming the fields)."""

    @classmethod
    def fields(cls) -> list[FieldInfo]:
        """Every field with its resolved type, default, help and limits, in declaration order."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            m = f.metadata
            out.append(FieldInfo(
                name=f.name, type=hints[f.name], default=f.default, help=m.get("help", ""),
                choices=m.get("choices"), low=m.get("low"), high=m.get("high"),
                low_open=bool(m.get("low_open")), high_open=bool(m.get("high_open")),
                flag=m.get("flag") or "--" + f.name.replace("_", "-"), cli=bool(m.get("cli", True)),
            ))
        return out

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Build from a mapping (a provenance record, a search trial); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{cls.method}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(values))

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values of the command-line fields: the provenance of an output."""
        out: dict[str, Any] = {}
        for info in self.fields():
            if not info.cli:
                continue
            value = getattr(self, info.name)
            out[info.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig(MethodConfig):
    """The calibration options every activation-statistics method shares (Wanda, Antidote, ...)."""

    num_samples: int | None = option(None, "Use the first N calibration samples (default all).", low=1)
    max_length: int = option(2048, "Tokens per sample; longer prompts are an error, longer responses are cut.",
                             low=1)
    tokens: Literal["all", "response"] = option("all", "Which tokens count in the activation statistics.")
    chat_template: bool = option(True, "Render prompt and response with the chat template (else concatenate).")


@dataclass(frozen=True)
class Runtime:
    """How to run, as opposed to what to compute: none of this changes an output's values."""

    device: str | None = None  # torch device; default CUDA when present, else CPU
    force: bool = False  # replace an existing output (never an input), once the new one is complete
    dry_run: bool = False  # report what would change, write nothing
    shard_size: int = 5_000_000_000  # largest output shard in bytes
    allow_pickle: bool = False  # read pickle checkpoints with weights_only=True
    progress: bool = True  # progress bars / lines on stderr
    batch_size: int = 1  # sequences per forward pass in calibration (sums are masked: same statistics)


def _check(method: str, info: FieldInfo, value: Any) -> Any:
    """Coerce what is safe (int -> float, list -> tuple) and refuse the rest, naming the field."""
    where = f"{method}: {info.name}" if method else info.name
    tp, optional = _unwrap_optional(info.type)
    if value is None:
        if optional or info.default is None:
            return None
        raise ConfigError(f"{where} is required")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    elif tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        value = float(value)
        if math.isnan(value):
            raise ConfigError(f"{where} must be a number, got NaN")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    elif origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item_type = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        value = tuple(value)
        if item_type is str and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {list(value)!r}")
    if info.choices is not None and value not in info.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, info.choices))}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        too_low = info.low is not None and (value <= info.low if info.low_open else value < info.low)
        too_high = info.high is not None and (value >= info.high if info.high_open else value > info.high)
        if too_low or too_high:
            raise ConfigError(f"{where} must lie in {info.range_text()}, got {value:g}")
    return value


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False
