"""Kernel benchmarks: every `surgery.kernels` op against the PyTorch code a researcher writes.

On a CUDA device, for W of shape 4096x4096, 4096x14336, 14336x4096 and 8192x28672 in
bf16 and fp32, each op is timed with `triton.testing.do_bench` (median) next to its
baseline in the same run:

- wanda_score          vs `W.abs() * torch.sqrt(s)` (Wanda's `W_metric`)
- wanda_prune_ (row)   vs Wanda's `torch.sort(stable=True)` + `scatter_` + `W[mask] = 0`
- topk_mask (row)      vs the same sort formulation on a precomputed score
- topk_mask (tensor)   vs `torch.sort` of the flattened score, and vs `torch.kthvalue`
- channel_sq_norms     vs the hook code (`inp.float().t()`, `torch.norm(inp, p=2, dim=1) ** 2`)
- covariance           vs `Xf.T @ Xf` in fp32 (SparseGPT's accumulation, TF32 off)
- safelora_project     vs the dense projector of SafeLoRA/PEFT (`P = V V^T / ||V||`, `P B A`), r = 16
- salora_project       vs `X @ C` with the dense C = I - U U^T (SaLoRA's forward), r = 32
- rank_one_update_     vs `W += torch.outer(u, v)`
- direction_ablate_    vs `W -= torch.outer(r, r @ W.float())`

Reported: median ms of both, speedup, GB/s of useful bytes (each input read once, each
output written once) and its share of the device's copy bandwidth measured in the same
run (`dst.copy_(src)` on 1 GiB). Every row also checks that both give the same result.

Each op's cases live in `benchmarks/kernel_cases/<op>.py` (a `Case`: op, baseline, the
check that both give the same result, the bytes moved), registered in `kernel_cases`; this
script is the one runner: timing, the copy-bandwidth measurement, the checks, the tables.

Without CUDA the GPU rows make no sense (the CPU path of most ops *is* its reference), so
the script runs the CPU comparisons that do: SafeLoRA low-rank vs dense at r = 16,
streaming statistics vs the hook code, the sort-free CPU select (`topk_mask`,
`wanda_prune_`) vs the sort, and a per-tensor mask beyond 2^24 elements where
`torch.quantile` refuses. Results: `benchmarks/results/kernels-<device>.json`, `.md`, `.png`.

    python benchmarks/kernels.py [--quick] [--shapes 4096x4096,...] [--dtypes bf16,fp32] [--ops mask,prune,...]
    python benchmarks/kernels.py --smoke   # every GPU row at a tiny shape, on any device, into /tmp
    python benchmarks/kernels.py --quick --out /tmp/kb   # anywhere but benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from kernel_cases import CPU_SUITES, DTYPES, GPU_SUITE, OP_GROUPS, Case, Point, Suite

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_OUT = Path("/tmp/surgery-kernel-bench-smoke")
GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
SMOKE_SHAPE = (64, 96)


# ----------------------------------------------------------------------------- timing


def device_tag(dev: torch.device) -> str:
    """Short name of the machine for result files: h100, h200, ... or <arch>-<n>cpu."""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev).lower()
        m = re.search(r"\b([ahbl]\d{2,3}[a-z]?)\b", name)
        return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"{platform.machine()}-{os.cpu_count()}cpu"


def bench(fn: Callable[[], object], dev: torch.device, quick: bool) -> float:
    """Median milliseconds of fn: do_bench with CUDA events on a GPU, perf_counter on CPU."""
    if dev.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")
        )
    # CPU: this process's CPU time (torch set to one thread in main), because wall time on a
    # shared, quota-throttled machine is quantised by the scheduler and says little.
    fn()
    reps = 3 if quick else 7
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(dev: torch.device, quick: bool) -> float:
    """GB/s of a large device copy (bytes read + bytes written), the ceiling for streaming ops."""
    nbytes = (1 << 30) if dev.type == "cuda" else (1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), dev, quick)
    return 2 * nbytes / ms / 1e6


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ----------------------------------------------------------------------------- runner


def row(op, shape, dtype, ours_ms, base_name, base_ms, nbytes, copy_gbps, check, note=""):
    """One table row (the recorded results' format)."""
    gbps = nbytes / ours_ms / 1e6 if ours_ms and nbytes else None
    return {
        "op": op,
        "shape": "x".join(str(s) for s in shape),
        "dtype": dtype,
        "ours_ms": round(ours_ms, 4) if ours_ms is not None else None,
        "baseline": base_name,
        "baseline_ms": round(base_ms, 4) if base_ms is not None else None,
        "speedup": round(base_ms / ours_ms, 2) if (ours_ms and base_ms) else None,
        "useful_bytes": nbytes,
        "gbps": round(gbps, 1) if gbps else None,
        "pct_copy": round(100 * gbps / copy_gbps, 1) if (gbps and copy_gbps) else None,
        "check": check,
        "note": note,
    }


def measure(case: Case, point: Point, copy_gbps: float) -> dict | None:
    """Check, then time ours and the baseline of one case at one point; None where it skips the point."""
    trial = case.prepare(point)
    if trial is None:
        return None
    with trial.setting():
        check = trial.check()
        ms = bench(trial.ours, point.dev, point.quick or trial.quick_ours)
        base_ms = None
        if trial.baseline is not None:
            try:
                base_ms = bench(trial.baseline, point.dev, point.quick or trial.quick_baseline)
            except torch.OutOfMemoryError:
                if not trial.baseline_may_oom:
                    raise
    note = trial.note(ms) if callable(trial.note) else trial.note
    base = "—" if base_ms is None else f"{base_ms:.1f} ms"
    print(f"    {case.op} vs {case.baseline}: {ms:.1f} ms vs {base}", file=sys.stderr)
    return row(case.op, trial.shape or point.shape, trial.dtype or point.dname, ms, case.baseline, base_ms,
               trial.useful_bytes, copy_gbps, check, note)


def run_suite(
    suite: Suite, shapes: list[tuple[int, ...]], dnames: list[str], groups: set[str],
    dev: torch.device, gen: torch.Generator, quick: bool, copy_gbps: float,
) -> list[dict]:
    """Rows of the suite's selected cases at every shape and dtype, in registry order."""
    cases = [c for c in suite.cases if c.group in groups]
    rows: list[dict] = []
    if not cases:
        return rows
    for shape, dname in suite.points(suite.shapes(quick) if suite.shapes else shapes, dnames):
        print(f"  {suite.name} {shape} {dname}", file=sys.stderr)
        point = Point(shape, dname, dev, gen, quick)
        suite.setup(point)
        for case in cases:
            r = measure(case, point, copy_gbps)
            if r is not None:
                rows.append(r)
        del point
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- output


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# Kernel benchmarks on {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; copy bandwidth measured in the same run: "
        f"**{meta['copy_gbps']:.1f} GB/s**. Times are medians ({meta['timer']}). GB/s counts useful bytes "
        "(inputs read once, outputs written once).",
        "",
        "| op | shape | dtype | ours ms | baseline | baseline ms | speedup | GB/s | % copy | check | note |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|---|",
    ]

    def f(v, fmt="{:.3f}"):
        return "—" if v is None else fmt.format(v)

    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {f(r['ours_ms'])} | {r['baseline']} | {f(r['baseline_ms'])} "
            f"| {f(r['speedup'], '{:.1f}x')} | {f(r['gbps'], '{:.1f}')} | {f(r['pct_copy'], '{:.0f}%')} "
            f"| {r['check']} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["speedup"]]
    if not rs:
        return
    labels = [f"{r['op']} {r['shape']} {r['dtype']} vs {r['baseline']}" for r in rs]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(rs) + 1.5))
    ax.barh(range(len(rs)), [r["speedup"] for r in rs], color="tab:blue")
    ax.set_yticks(range(len(rs)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speedup over the PyTorch baseline (log)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and the smaller CPU shapes")
    p.add_argument("--smoke", action="store_true", help=f"every GPU row at a tiny shape, results under {SMOKE_OUT}")
    p.add_argument("--shapes", default=None, help="comma-separated d_outxd_in list for the GPU rows")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS}; {SMOKE_OUT} with --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", default=",".join(OP_GROUPS), help="op groups: " + ",".join(OP_GROUPS))
    args = p.parse_args(argv)
    groups = {o for o in args.ops.split(",") if o}
    unknown = groups - set(OP_GROUPS)
    if unknown:
        p.error(f"unknown --ops {sorted(unknown)}; choose from {','.join(OP_GROUPS)}")
    dnames = [d for d in args.dtypes.split(",") if d]
    if set(dnames) - set(DTYPES):
        p.error(f"unknown --dtypes {sorted(set(dnames) - set(DTYPES))}; choose from {','.join(DTYPES)}")

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = "absent"
    tag = device_tag(dev)
    out_dir = Path(args.out) if args.out else (SMOKE_OUT if args.smoke else RESULTS)
    if args.smoke:
        tag = tag + "-smoke"
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_gbps = copy_bandwidth(dev, args.quick or args.smoke)
    print(f"device {tag}: copy {copy_gbps:.1f} GB/s", file=sys.stderr)

    rows: list[dict] = []
    if dev.type == "cuda" or args.smoke:
        shapes = GPU_SHAPES
        if args.shapes:
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        if args.smoke:
            shapes = [SMOKE_SHAPE]
        if dev.type != "cuda":
            dnames = [d for d in dnames if d != "bf16"] or ["fp32"]
        rows += run_suite(GPU_SUITE, shapes, dnames, groups, dev, gen, args.quick or args.smoke, copy_gbps)
    if dev.type != "cuda" and not args.smoke:
        for suite in CPU_SUITES:
            rows += run_suite(suite, [], [], groups, dev, gen, args.quick, copy_gbps)

    meta = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}",
        "tag": tag,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "copy_gbps": round(copy_gbps, 1),
        "timer": "triton.testing.do_bench" if dev.type == "cuda" else "time.process_time, one torch thread",
        "quick": bool(args.quick),
    }
    (out_dir / f"kernels-{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = to_markdown(meta, rows)
    (out_dir / f"kernels-{tag}.md").write_text(md)
    plot(rows, out_dir / f"kernels-{tag}.png", f"surgery.kernels on {meta['device']}")
    print(md)
    bad = [r for r in rows if "MISMATCH" in str(r["check"]) or _rel_bad(r["check"])]
    return 1 if bad else 0


def _rel_bad(check: str) -> bool:
    m = re.search(r"rel ([0-9.e+-]+)", check)
    return bool(m) and (math.isnan(float(m.group(1))) or float(m.group(1)) > 2e-2)


if __name__ == "__main__":
    sys.exit(main())
