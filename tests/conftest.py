"""Shared fixtures: the quick testbed, built once per test session.

Set SURGERY_TESTBED_DIR to a directory to reuse (or build there once and keep) a quick
testbed across sessions; otherwise it is built under the session's tmp directory.
"""

from __future__ import annotations

import os
from pathlib import Path

# Kernel tests run the Triton code on CPU through the interpreter, which must be switched on
# before triton is first imported (any test module may import it through surgery.methods).
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass

# Tests read stderr; progress lines (what a pipe gets) are switched on only where a test asks.
os.environ.setdefault("SURGERY_PROGRESS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def quick_testbed(tmp_path_factory: pytest.TempPathFactory):
    """The quick synthetic testbed (seed 0): `tb.base`, `tb.aligned`, `tb.attacked`, `tb.benign_ft`, `tb.data`.

    Treat it as read-only: every test in the session shares it.
    """
    from surgery.testbed import Testbed, build_testbed

    env = os.environ.get("SURGERY_TESTBED_DIR")
    if env:
        root = Path(env)
        if (root / "testbed.json").exists():
            return Testbed.load(root)
        return build_testbed(root, seed=0, quick=True, progress=False)
    return build_testbed(tmp_path_factory.mktemp("testbed") / "quick", seed=0, quick=True, progress=False)
