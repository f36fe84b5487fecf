"""Runs tests/kernels in a fresh interpreter when this session imported Triton before the
interpreter could be enabled (see conftest.py); otherwise the tests ran in process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_in_clean_process(kernels_contaminated):
    if not kernels_contaminated:
        pytest.skip("the kernel tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE),
         "-k", "not test_in_clean_process and not test_kernels_compile"],
        capture_output=True, text=True, env=env, timeout=1800, cwd=HERE.parent.parent,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
