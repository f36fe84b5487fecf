"""The kernels compile for real GPUs (sm_90, and the Triton-3.6 histogram fallback), not
only run in the interpreter: a subprocess without TRITON_INTERPRET builds cubins with the
ptxas that Triton ships. A representative subset keeps this quick; run
`python benchmarks/compile_all.py 90` for every variant with registers and spills."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compile_all.py"
SUBSET = ",".join(
    [
        "wanda_score bf16",
        "row_select mask bf16 B8192",
        "row_select fused-prune fp16 chunked",
        "tensor_hist fp32 mode0 r1",
        "tensor_eqcount bf16 mode1",
        "tensor_apply bf16 mode1",
        "tensor_pick r1",
        "colreduce bf16 sq=True",
        "gram bf16",
        "safelora vtb bf16",
        "salora project bf16",
        "rank_one bf16",
    ]
)


def _compile_supported() -> bool:
    """ptxas is shipped, and the Triton is one whose ASTSource API compile_all.py targets (3.9+)."""
    try:
        import triton
    except Exception:
        return False
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    has_ptxas = (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()
    return has_ptxas and (major, minor) >= (3, 9)


@pytest.mark.skipif(not _compile_supported(), reason="needs Triton >= 3.9 with its NVIDIA backend (ptxas)")
@pytest.mark.parametrize("fallback", [False, True], ids=["hist-mask", "hist-fallback"])
def test_kernels_compile_for_sm90(fallback):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SURGERY_FORCE_TRITON")}
    if fallback:
        env["NO_HIST_MASK"] = "1"
    subset = SUBSET if not fallback else "row_select mask fp32 B8192,tensor_hist fp32 mode0 r2"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "90", subset], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "0 failure(s)" in res.stdout
    assert res.stdout.count("ok   ") >= (2 if fallback else 12)
