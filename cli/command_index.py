"""The index of `surgery` commands, read from the command modules' source without importing them.

`surgery --help` lists every command with its one-line help. Importing the command modules for
that would pull in torch, transformers and triton (seconds and hundreds of MB), so the listing
parses each `surgery.cli.<name>_cmd` module instead: the functions named in its `COMMANDS` list,
their `@click.command("name")` / `@click.group("name")` decorators and their docstrings.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import click

_DECORATORS = ("command", "group")


@dataclass(frozen=True)
class CommandEntry:
    """One top-level command: its name, the module that defines it and its help texts.

    `readable` is False where the source did not say (a computed name or help): the listing then
    imports the module.
    """

    name: str
    module: str
    help: str | None = None
    short_help: str | None = None
    readable: bool = True

    def short_help_str(self, limit: int) -> str:
        """The one-line help the imported command would give: click's own shortening of the same texts."""
        return click.Command(self.name, help=self.help, short_help=self.short_help).get_short_help_str(limit)


def _constant_keyword(call: ast.Call, key: str) -> str | None:
    for keyword in call.keywords:
        if keyword.arg == key and isinstance(keyword.value, ast.Constant) and isinstance(keyword.value.value, str):
            return keyword.value.value
    return None


def _click_decorator(node: ast.FunctionDef) -> ast.Call | None:
    """The `@click.command(...)` or `@click.group(...)` call decorating `node`, if any."""
    for decorator in node.decorator_list:
        if (
            isinstance(decorator, ast.Call)
            and isinstance(decorator.func, ast.Attribute)
            and decorator.func.attr in _DECORATORS
            and isinstance(decorator.func.value, ast.Name)
            and decorator.func.value.id == "click"
        ):
            return decorator
    return None


def _exported_names(tree: ast.Module) -> list[str]:
    """The function names listed in the module's `COMMANDS = [...]`."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in node.targets):
            if isinstance(node.value, ast.List | ast.Tuple):
                return [e.id for e in node.value.elts if isinstance(e, ast.Name)]
    return []


def entries_in_source(source: str, module: str) -> list[CommandEntry]:
    """The commands a command module's source exports, as click would name and describe them.

    A command whose name or help is not a literal in the source is left out; the caller then
    imports the module to learn it.
    """
    tree = ast.parse(source)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    found: list[CommandEntry] = []
    for function_name in _exported_names(tree):
        node = functions.get(function_name)
        call = _click_decorator(node) if node is not None else None
        if node is None or call is None:
            return []
        first = call.args[0] if call.args else None
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            return []  # a name click derives (differently across click versions) or computes
        computed = {k.arg for k in call.keywords if not isinstance(k.value, ast.Constant)}
        if {"help", "short_help"} & computed or {"hidden", "deprecated"} & {k.arg for k in call.keywords}:
            return []  # click would list these differently: let it
        text = _constant_keyword(call, "help") or ast.get_docstring(node)
        if text is not None:
            text = inspect.cleandoc(text).split("\f", 1)[0]
        found.append(CommandEntry(first.value, module, text, _constant_keyword(call, "short_help")))
    return found


def command_index() -> dict[str, CommandEntry]:
    """Every command under `surgery.cli`, keyed by name.

    A module whose source says nothing readable gets its assumed name (`x` for `x_cmd`) and an
    entry with `readable=False`.
    """
    import surgery.cli as package

    index: dict[str, CommandEntry] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.endswith("_cmd"):
            continue
        module = f"surgery.cli.{info.name}"
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        entries = entries_in_source(Path(origin).read_text(encoding="utf-8"), module) if origin else []
        if not entries:
            name = info.name.removesuffix("_cmd")
            index[name] = CommandEntry(name, module, readable=False)
        for entry in entries:
            index[entry.name] = entry
    return index
