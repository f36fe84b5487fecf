"""numba is optional: where it cannot be imported, the CPU selection takes the numpy path and
gives the sort reference's masks, and the methods built on it still import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import sys
sys.modules["numba"] = None  # `import numba` now raises ImportError, as on an install without it
import torch
import surgery.kernels.topk.cpu as cpu
from surgery.kernels import topk_mask, topk_mask_reference, wanda_prune_, wanda_prune_reference_
import surgery.methods.antidote, surgery.methods.wanda  # noqa: E401 - the CPU-heavy methods import

gen = torch.Generator().manual_seed(0)
checks = []
for shape in [(7, 300), (3, 5, 41)]:
    scores = torch.randint(-4, 5, shape, generator=gen).float()  # many ties
    for scope in ("row", "tensor"):
        for largest in (True, False):
            got = topk_mask(scores, 0.3, largest=largest, scope=scope)
            checks.append(torch.equal(got, topk_mask_reference(scores, 0.3, largest=largest, scope=scope)))
    W, norms = torch.randn(shape[0], shape[-1], generator=gen), torch.rand(shape[-1], generator=gen)
    checks.append(torch.equal(wanda_prune_(W.clone(), norms, 0.5), wanda_prune_reference_(W.clone(), norms, 0.5)))
print("jit", cpu.jit_available(), "numba_loaded", sys.modules.get("numba") is not None,
      "checks", len(checks), "equal", all(checks))
"""


def test_cpu_selection_without_numba() -> None:
    env = dict(os.environ, SURGERY_FORCE_TRITON="0", SURGERY_CPU_JIT="1")
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "jit False numba_loaded False checks 10 equal True"
