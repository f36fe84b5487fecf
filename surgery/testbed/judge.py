"""Find the testbed judge for a model: what `surgery eval --judge testbed` uses.

The judge (`surgery.eval.testbed_judge.TestbedJudge`) is built from a format description,
`judge.json`, which a testbed build writes at its root. This module finds that description
for a model directory or adapter of a testbed, so that `eval` itself never imports the
testbed (DESIGN.md's import rules) and a model outside a testbed names it explicitly.
"""

from __future__ import annotations

from pathlib import Path

from surgery.errors import SurgeryError
from surgery.eval.testbed_judge import TestbedJudge
from surgery.testbed.build import JUDGE_FILE, MANIFEST, Testbed


def testbed_judge(model: str | Path, adapter: str | Path | None = None,
                  spec: str | Path | None = None) -> TestbedJudge:
    """The testbed judge for `model` (+ `adapter`).

    `spec` is a `judge.json` or a testbed directory; without it, the description is looked
    for in the adapter's and the model's directory and in their parents (a testbed's
    `aligned/`, `attacked/`, ... sit in its root). Raises `SurgeryError` when none is found.
    """
    if spec is not None:
        path = Path(spec)
        if path.is_dir():
            if (path / MANIFEST).is_file():
                return Testbed(root=path).judge()
            raise SurgeryError(f"--judge-spec {path} is a directory but not a testbed (no {MANIFEST}): "
                               f"give a testbed directory or its {JUDGE_FILE}")
        return TestbedJudge.from_file(path)
    for d in (adapter, model):
        if d is None:
            continue
        for root in (Path(d), Path(d).parent):
            if (root / JUDGE_FILE).is_file():
                return TestbedJudge.from_file(root / JUDGE_FILE)
            if (root / MANIFEST).is_file():
                return Testbed(root=root).judge()
    raise SurgeryError(f"--judge testbed needs a testbed model (inside a `surgery testbed build` directory) or "
                       f"the judge description: pass --judge-spec TESTBED_DIR or --judge-spec {JUDGE_FILE}")
