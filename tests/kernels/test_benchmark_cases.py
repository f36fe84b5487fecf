"""The kernel benchmark's cases and runner (`benchmarks/kernel_cases`, `benchmarks/kernels.py`):
every op group has cases, the runner's rows agree with the recorded results' format, and at a
tiny shape every case's check passes (both sides give the same result)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
RECORDED = BENCH / "results" / "kernels-x86_64-2cpu.json"


@pytest.fixture
def bench(monkeypatch):
    """The runner module (loaded under its own name: `kernels` is also a Hugging Face package),
    with one untimed call standing in for the timer, on the plain CPU paths."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("SURGERY_FORCE_TRITON", "0")
    spec = importlib.util.spec_from_file_location("surgery_kernel_bench", BENCH / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "bench", lambda fn, dev, quick: (fn(), 2.0)[1])
    yield mod
    for name in [m for m in sys.modules if m == "kernel_cases" or m.startswith("kernel_cases.")]:
        del sys.modules[name]


def test_every_group_has_cases_and_the_cpu_rows_match_the_recorded_ones(bench):
    groups = {c.group for c in bench.GPU_SUITE.cases}
    assert groups == set(bench.OP_GROUPS)
    recorded = json.loads(RECORDED.read_text())["rows"]
    cpu_cases = {(c.op, c.baseline) for suite in bench.CPU_SUITES for c in suite.cases}
    assert cpu_cases == {(r["op"], r["baseline"]) for r in recorded}


def test_gpu_suite_at_a_tiny_shape(bench):
    """Every case runs and checks out (d_out above SaLoRA's rank 32); the row carries the numbers the runner derives."""
    rows = bench.run_suite(bench.GPU_SUITE, [(64, 48)], ["fp32"], set(bench.OP_GROUPS), torch.device("cpu"),
                           torch.Generator().manual_seed(0), True, 10.0)
    assert [(r["op"], r["baseline"]) for r in rows] == [(c.op, c.baseline) for c in bench.GPU_SUITE.cases]
    for r in rows:
        assert "MISMATCH" not in r["check"] and not bench._rel_bad(r["check"]), r
        assert r["ours_ms"] == 2.0 and r["speedup"] == 1.0
        if r["useful_bytes"]:
            assert r["gbps"] == round(r["useful_bytes"] / 2.0 / 1e6, 1)
    by_op = {r["op"]: r for r in rows}
    assert by_op["wanda_score"]["useful_bytes"] == 64 * 48 * (4 + 4) + 4 * 48
    assert by_op["channel_sq_norms"]["shape"] == "2048x48"
    assert by_op["wanda_prune_ row (fused)"]["check"] == "exact"


def test_ops_selects_groups(bench):
    rows = bench.run_suite(bench.GPU_SUITE, [(8, 32)], ["fp32"], {"mask"}, torch.device("cpu"),
                           torch.Generator().manual_seed(0), True, 10.0)
    assert [r["baseline"] for r in rows] == ["sort+scatter", "torch.sort flat", "torch.kthvalue flat"]


def test_a_failed_check_shows_in_the_row(bench, monkeypatch):
    """A case whose sides disagree is reported as MISMATCH (and main exits 1 on it)."""
    from kernel_cases import topk

    monkeypatch.setattr(topk, "baseline_row_mask", lambda score, ratio: torch.zeros_like(score, dtype=torch.bool))
    rows = bench.run_suite(bench.GPU_SUITE, [(8, 32)], ["fp32"], {"mask"}, torch.device("cpu"),
                           torch.Generator().manual_seed(0), True, 10.0)
    assert rows[0]["check"] == "MISMATCH"
