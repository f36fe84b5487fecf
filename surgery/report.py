"""One report for every method: what ran, on what, what it changed, how long it took.

Every command that writes an output puts its `Report` beside it as `surgery_report.json`
(one name for every method) and the CLI prints it one way (`surgery.cli.report_view`):
a table for a person, the same dict with `--json` for a program. Method-specific
numbers go into `metrics`; per-tensor changes into `tensors`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["REPORT_FILE", "TensorChange", "Report"]

REPORT_FILE = "surgery_report.json"


@dataclass
class TensorChange:
    """How one tensor was changed: entries selected by the rule, and entries whose value changed."""

    name: str
    shape: list[int]
    selected: int
    changed: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Report:
    """What a method did. `inputs` maps each role to `{"path", "sha256"}`."""

    method: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    out: str | None = None
    dry_run: bool = False
    tensors: list[TensorChange] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def selected(self) -> int:
        return sum(t.selected for t in self.tensors)

    @property
    def changed(self) -> int:
        return sum(t.changed for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written as `surgery_report.json` and printed by `--json`."""
        return {
            "method": self.method,
            "config": self.config,
            "inputs": self.inputs,
            "out": self.out,
            "dry_run": self.dry_run,
            "totals": {"tensors": len(self.tensors), "entries": sum(t.numel for t in self.tensors),
                       "selected": self.selected, "changed": self.changed},
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "metrics": self.metrics,
            "tensors": [asdict(t) for t in self.tensors],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=str) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        return cls(method=d["method"], config=dict(d.get("config", {})), inputs=dict(d.get("inputs", {})),
                   out=d.get("out"), dry_run=bool(d.get("dry_run", False)),
                   tensors=[TensorChange(**t) for t in d.get("tensors", [])],
                   seconds=dict(d.get("seconds", {})), metrics=dict(d.get("metrics", {})))

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read a report: a `surgery_report.json` file or the output directory holding one."""
        p = Path(path)
        if p.is_dir():
            p = p / REPORT_FILE
        return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
