"""A merge killed with SIGKILL in the middle of writing leaves no output directory.

The child runs the real `surgery merge` with the writer slowed down so the kill
lands between two tensor writes. What remains is at most a hidden temporary named
`.OUT.surgery-tmp-PID-*` beside the destination, which the next write sweeps away.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from surgery.io.merge import merge_adapter

CHILD = textwrap.dedent(
    """
    import sys, time
    from surgery.io import writer
    def slowed(original):
        def slow(self, name, *args):
            original(self, name, *args)
            print("wrote", name, flush=True)
            time.sleep(0.2)
        return slow
    for method in ("write", "write_bytes", "copy_raw"):  # every way a tensor's bytes reach the file
        setattr(writer.CheckpointWriter, method, slowed(getattr(writer.CheckpointWriter, method)))
    from surgery.cli.main import main
    main(sys.argv[1:])
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_mid_write_leaves_no_output(built, tmp_path):
    base = built("base", "llama", arch="llama")
    adapter = built("adapter", "kill", base=base, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "SURGERY_PROGRESS": "0"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "merge", str(base), str(adapter), "-o", str(out), "--shard-size", "20kB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while len(lines) < 3 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert len(lines) == 3, child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".merged.surgery-tmp-") for name in leftovers), leftovers
    assert len(leftovers) == 1  # the dead process's hidden temporary, clearly named

    merge_adapter(base, adapter, out)  # the next write succeeds and sweeps the dead temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
