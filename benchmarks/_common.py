"""What the pipeline benchmarks share: the safetensors read-and-write-once floor, machine
names, and measuring a subprocess's wall time, CPU time and peak RSS."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

# Read every shard with safetensors and write it back: the floor any streaming surgery is held to.
FLOOR_SCRIPT = """
import sys, shutil
from pathlib import Path
from safetensors.torch import load_file, save_file
base, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
for shard in sorted(base.glob("*.safetensors")):
    tensors = load_file(str(shard))
    save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
    del tensors
for extra in ("config.json", "model.safetensors.index.json"):
    if (base / extra).exists():
        shutil.copy(base / extra, out / extra)
"""


def machine_name() -> str:
    return f"{platform.machine()}-{os.cpu_count()}cpu"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure_rss(cmd: list[str], with_detail: bool = True) -> dict:
    """Wall time, peak RSS (wait4: the child alone), CPU time and, with `with_detail`, the
    child's last stdout line parsed as JSON."""
    env = {**os.environ, "SURGERY_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"}
    out_file = tempfile.TemporaryFile()
    err_file = tempfile.TemporaryFile()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out_file, stderr=err_file, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    out_file.seek(0)
    err_file.seek(0)
    if code != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({code}): {err_file.read().decode(errors='replace')[-3000:]}")
    result = {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}
    if with_detail:
        lines = out_file.read().decode().strip().splitlines()
        result["detail"] = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return result


def warm(path: Path) -> None:
    """Read the inputs once so every path starts from the same (warm) page cache."""
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with f.open("rb") as handle:
                while handle.read(1 << 24):
                    pass
