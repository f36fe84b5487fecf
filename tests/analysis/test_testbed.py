"""On the quick testbed: the diff of aligned vs the attacked adapter names exactly the adapter's
target modules, and the landscape's endpoints are the aligned and attacked models' own scores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from surgery.analysis.diff import CHANGED, UNCHANGED, diff_checkpoints
from surgery.io.adapter import LoraAdapter
from surgery.io.checkpoint import Checkpoint

os.environ.setdefault("SURGERY_PROGRESS", "0")

pytestmark = pytest.mark.slow


def test_attacked_adapter_moves_exactly_its_targets(quick_testbed, tmp_path: Path) -> None:  # noqa: ANN001
    tb = quick_testbed
    lora = LoraAdapter.open(tb.attacked)
    bound, _ = lora.match(Checkpoint.open(tb.aligned))
    report = diff_checkpoints(tb.aligned, tb.attacked, base=tb.base)
    assert sorted(report.changed) == sorted(bound)  # the adapter's base tensors moved, and only they
    moved_types = {t.module_type.rsplit(".", 1)[-1] for t in report.tensors if t.status == CHANGED}
    assert moved_types == set(lora.config["target_modules"])
    for t in report.tensors:
        if t.status == UNCHANGED:
            assert t.metrics.norm_delta == 0.0 and t.metrics.max_abs == 0.0
        else:
            m = t.metrics
            assert t.source == "lora" and m.spectrum == "lowrank"
            assert 0 < m.numerical_rank <= lora.config["r"]
            assert 1.0 <= m.stable_rank <= m.effective_rank + 1e-9 <= lora.config["r"] + 1e-9
            assert len(m.principal_angles) == min(8, m.numerical_rank)
            assert 0.0 <= m.energy_in_v <= 1.0
    layers, types, grid = report.grid()
    assert layers == [str(i) for i in range(tb.manifest["recipe"]["layers"])]
    for row in grid:
        for typ, value in zip(types, row):
            assert (value > 0) == (typ.rsplit(".", 1)[-1] in moved_types)
    from surgery.analysis.plots import diff_heatmap

    png = diff_heatmap(report, tmp_path / "heat.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_landscape_endpoints_are_the_models_scores(quick_testbed) -> None:  # noqa: ANN001
    from surgery.analysis.landscape import landscape
    from surgery.eval.evaluate import evaluate

    tb = quick_testbed
    kw = dict(harmful=tb.file("harmful_eval.jsonl"), task=tb.file("task_eval.jsonl"), max_new_tokens=16,
              batch_size=32, limit=8)
    report = landscape(tb.aligned, tb.attacked, alphas=[0.0, 1.0], progress=False, **kw)
    assert report.mode == "adapter" and report.moving_tensors > 0
    aligned = evaluate(tb.aligned, **kw)
    attacked = evaluate(tb.aligned, adapter=tb.attacked, **kw)
    start, end = report.points
    assert (start.harmful_score, start.task_accuracy) == (aligned.harmful_score, aligned.task_accuracy)
    assert (end.harmful_score, end.task_accuracy) == (attacked.harmful_score, attacked.task_accuracy)


def test_landscape_cli_json_and_plot(quick_testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    import json

    from surgery.cli.main import main

    tb = quick_testbed
    png = tmp_path / "curve.png"
    with pytest.raises(SystemExit) as exc:
        main(["landscape", str(tb.aligned), str(tb.attacked), "--harmful", str(tb.file("harmful_eval.jsonl")),
              "--task", str(tb.file("task_eval.jsonl")), "--steps", "2", "--limit", "4", "--max-new-tokens", "8",
              "--json", "--plot", str(png)])
    assert exc.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["alpha"] for p in report["points"]] == [0.0, 1.0]
    assert all(0.0 <= p["harmful_score"] <= 1.0 and 0.0 <= p["task_accuracy"] <= 1.0 for p in report["points"])
    assert png.read_bytes()[:4] == b"\x89PNG"
