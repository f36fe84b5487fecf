"""Who may import whom (docs/architecture.md): checked over the real import graph of the tree.

Every `import surgery.X` inside `surgery/`, `kernels/` (installed as `surgery.kernels`) and
`cli/` (installed as `surgery.cli`) is an edge between layers; an edge the table does not
allow fails the test, naming the file. Methods may use the method contract
(`methods.config`, `methods.registry`) but never another method.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> the project layers it may import (besides itself). Top-level modules of `surgery/`
# (errors, progress, report) are shared vocabulary every layer but kernels may use.
SHARED = {"errors", "progress", "report", "__init__"}
ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "io": set(),
    "model": {"io"},
    "calib": {"model", "io", "kernels"},
    "eval": {"model", "io"},
    "pipeline": {"calib", "model", "io", "kernels"},
    "methods": {"pipeline", "model", "calib", "io", "kernels"},
    "analysis": {"io", "model", "eval", "calib"},
    "repair": {"methods", "pipeline", "model", "calib", "eval", "io", "analysis", "kernels"},
    "testbed": {"methods", "pipeline", "model", "calib", "eval", "io", "analysis", "kernels", "repair"},
    "cli": {"methods", "pipeline", "model", "calib", "eval", "io", "analysis", "kernels", "repair", "testbed"},
}
CONTRACT = {"config", "registry"}


def _layer(path: Path) -> tuple[str, str]:
    """(layer, module name inside the layer) of a source file."""
    rel = path.relative_to(ROOT).parts
    if rel[0] in ("kernels", "cli"):
        return rel[0], Path(*rel[1:]).with_suffix("").as_posix()
    if len(rel) == 2:
        return rel[1][:-3], ""
    return rel[1], Path(*rel[2:]).with_suffix("").as_posix()


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
    return [(line, m) for line, m in out if m == "surgery" or m.startswith("surgery.")]


def _sources() -> list[Path]:
    return sorted(p for d in ("surgery", "kernels", "cli") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_follow_the_layers(path):
    layer, name = _layer(path)
    if layer in SHARED:
        allowed: set[str] = set()
    else:
        allowed = ALLOWED[layer]
    bad = []
    for line, module in _imports(path):
        parts = module.split(".")
        if len(parts) == 1:
            continue
        target = parts[1]
        if target == layer:
            if layer == "methods" and len(parts) > 2 and parts[2] not in CONTRACT:
                own = name.split("/")[0]
                if parts[2] != own:
                    bad.append(f"line {line}: {module} (a method imports another method)")
            continue
        if target in SHARED or target in allowed:
            continue
        bad.append(f"line {line}: {module} ({layer} may not import {target})")
    if layer == "kernels":
        bad = [b for b in bad if "kernels may not import kernels" not in b]
    assert not bad, "; ".join(bad)


def test_every_layer_is_in_the_table():
    layers = {_layer(p)[0] for p in _sources()}
    assert layers <= set(ALLOWED) | SHARED, sorted(layers - set(ALLOWED) - SHARED)
