"""The streamed rewrite: edited tensors changed and counted, the rest byte-identical, report and provenance written."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from surgery.io.checkpoint import Checkpoint
from surgery.pipeline.rewrite import rewrite_checkpoint
from surgery.report import REPORT_FILE, Report
from tests.factories import make_base


def test_rewrite_edits_only_what_it_is_told(tmp_path):
    base = make_base(tmp_path / "base", "llama")
    ckpt = Checkpoint.open(base)
    target = "model.layers.0.mlp.down_proj.weight"
    before = load_file(str(base / "model.safetensors"))

    def negate_first_row(name, t):
        t = t.clone()
        t[0] = -t[0]
        return t, t.shape[1]

    report = Report("toy", config={"rows": 1})
    rewrite_checkpoint(ckpt, tmp_path / "out", report, edit=negate_first_row, names={target},
                       new_tensors={"extra.bias": torch.ones(3)})
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(after) == set(before) | {"extra.bias"}
    for name, t in before.items():
        if name == target:
            expected = t.clone()
            expected[0] = -expected[0]
            assert torch.equal(after[name], expected)
        else:
            assert torch.equal(after[name], t) and after[name].dtype == t.dtype
    nonzero_in_row = int((before[target][0] != 0).sum())
    assert [(c.name, c.selected, c.changed) for c in report.tensors] == [
        (target, before[target].shape[1], nonzero_in_row)]
    written = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert written["method"] == "toy" and written["config"] == {"rows": 1}
    assert written["inputs"]["model"]["sha256"] == ckpt.fingerprint()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["surgery.method"] == "toy" and json.loads(meta["surgery.params"]) == {"rows": 1}
    assert (tmp_path / "out" / "config.json").is_file()
