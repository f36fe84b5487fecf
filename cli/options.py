"""The options every command shares, and a method config expanded into click options.

`config_options(Config)` turns each field of a `MethodConfig` into a click option (the
flag, type, default, choices and help all come from the field), and collects the
parsed values back into one validated config: the command never repeats a method's
options. `output_options`, `device_option`, `targets_option` and friends are the shared
`-o/--force/--json`, `--device` and `--targets` with one parser each.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from typing import Any

import click

from surgery.methods.config import FieldInfo, MethodConfig, _unwrap_optional

__all__ = ["config_options", "input_option", "output_options", "dry_run_option", "json_option", "device_option", "targets_option",
           "allow_pickle_option", "split_targets"]

F = Callable[..., Any]


def split_targets(values: tuple[str, ...] | str | None) -> list[str] | None:
    """`--targets q_proj,v_proj` or repeated `--targets`: one list, None when not given."""
    if values is None:
        return None
    if isinstance(values, str):
        values = (values,)
    out = [t for v in values for t in v.replace(",", " ").split()]
    return out or None


def _click_type(info: FieldInfo) -> tuple[Any, dict[str, Any]]:
    tp, _ = _unwrap_optional(info.type)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(tp)]), {}
    if info.choices is not None:
        return click.Choice([str(c) for c in info.choices]), {}
    if origin is tuple:
        return str, {"multiple": True}
    return {int: int, float: float, str: str}.get(tp, str), {}


def _decorate(info: FieldInfo) -> Callable[[F], F]:
    help_text = info.help
    if info.range_text():
        help_text += f" Range {info.range_text()}."
    tp, _ = _unwrap_optional(info.type)
    name = info.flag.lstrip("-").replace("-", "_")
    if tp is bool:
        stem = info.flag[2:]
        flags = f"--{stem}/--no-{stem}" if not stem.startswith("no-") else info.flag
        return click.option(flags, name, default=info.default, show_default=True, help=help_text)
    click_type, extra = _click_type(info)
    kwargs: dict[str, Any] = {"type": click_type, "help": help_text, **extra}
    if info.required:
        kwargs["required"] = True
    elif extra.get("multiple"):
        kwargs["default"] = tuple(info.default or ())
    else:
        kwargs["default"] = info.default
        kwargs["show_default"] = info.default is not None
    return click.option(info.flag, name, **kwargs)


def config_options(config_cls: type[MethodConfig], *, exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Add the config's fields as options; the command receives one `config` argument instead.

    List fields (`tuple[str, ...]`) accept comma-separated or repeated values. Fields in
    `exclude` (or declared `cli=False`) are left to the command."""
    own = list(vars(config_cls).get("__annotations__", {}))
    infos = [i for i in config_cls.fields() if i.cli and i.name not in exclude]
    infos.sort(key=lambda i: (i.name not in own, own.index(i.name) if i.name in own else 0))  # the method's own first

    def decorator(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {}
            for info in infos:
                key = info.flag.lstrip("-").replace("-", "_")
                value = kwargs.pop(key)
                tp, _ = _unwrap_optional(info.type)
                if typing.get_origin(tp) is tuple:
                    value = tuple(split_targets(value) or ())
                elif typing.get_origin(tp) is typing.Literal or info.choices is not None:
                    allowed = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else (info.choices or ())
                    value = next((a for a in allowed if str(a) == value), value) if value is not None else None
                values[info.name] = value
            return fn(*args, config=config_cls(**values), **kwargs)

        decorated: F = wrapper
        for info in reversed(infos):
            decorated = _decorate(info)(decorated)
        return decorated

    return decorator


def input_option(role: str, flag: str | None = None, *, required: bool = True,
                 help: str | None = None) -> Callable[[F], F]:
    """`--ROLE PATH` for one input role of the registry (its help from `ROLES`); the value is a str."""
    from surgery.methods.registry import ROLES

    return click.option(flag or f"--{role}", role, required=required, type=click.Path(path_type=str),
                        default=None, help=help or ROLES[role][0].upper() + ROLES[role][1:] + ".")


def dry_run_option(fn: F) -> F:
    """`--dry-run`: report per tensor what would change; write nothing."""
    return click.option("--dry-run", is_flag=True, help="Report per tensor what would change; write nothing.")(fn)


def output_options(required: bool = True, what: str = "Output path") -> Callable[[F], F]:
    """`-o/--output OUT` and `--force` (which replaces OUT only once the new output is complete)."""

    def decorator(fn: F) -> F:
        fn = click.option("--force", is_flag=True,
                          help="Replace OUT if it exists (never an input; only once the new output is complete).")(fn)
        return click.option("-o", "--output", "out", required=required, type=click.Path(path_type=str),
                            help=f"{what}.")(fn)

    return decorator


def json_option(fn: F) -> F:
    """`--json`: the report as JSON on stdout instead of a table."""
    return click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")(fn)


def device_option(fn: F) -> F:
    """`--device`: the torch device (default CUDA when present, else CPU)."""
    return click.option("--device", default=None, help="Torch device (default: CUDA when present, else CPU).")(fn)


def targets_option(help: str = "Modules, comma-separated or repeated (q_proj,self_attn.v_proj, globs, re:REGEX).",
                   default: tuple[str, ...] = ()) -> Callable[[F], F]:
    """`--targets`, comma-separated or repeated; the command gets `split_targets(targets)`."""
    return click.option("--targets", multiple=True, default=default, help=help)


def allow_pickle_option(fn: F) -> F:
    """`--allow-pickle`: read pickle (.bin) weights with weights_only=True."""
    return click.option("--allow-pickle", is_flag=True,
                        help="Read pickle (.bin) weights, with weights_only=True (refused otherwise).")(fn)
