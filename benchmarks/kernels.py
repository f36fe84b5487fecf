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

Without CUDA the GPU rows make no sense (the CPU path of most ops *is* its reference), so
the script runs the CPU comparisons that do: SafeLoRA low-rank vs dense at r = 16,
streaming statistics vs the hook code, the sort-free CPU select (`topk_mask`,
`wanda_prune_`) vs the sort, and a per-tensor mask beyond 2^24 elements where
`torch.quantile` refuses. Results: `benchmarks/results/kernels-<device>.json`, `.md`, `.png`.

    python benchmarks/kernels.py [--quick] [--shapes 4096x4096,...] [--dtypes bf16,fp32] [--ops mask,prune,...]
    python benchmarks/kernels.py --smoke   # every GPU row at a tiny shape, on any device
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
from surgery.kernels import (
    channel_sq_norms,
    covariance,
    direction_ablate_,
    rank_one_update_,
    safelora_project,
    safelora_project_reference,
    salora_project,
    topk_mask,
    topk_mask_reference,
    wanda_prune_,
    wanda_prune_reference_,
    wanda_score,
)

RESULTS = Path(__file__).resolve().parent / "results"
GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TOKENS = 2048  # calibration tokens per batch for the statistics rows
RANK_SAFELORA = 16
RANK_SALORA = 32
OP_GROUPS = ("score", "prune", "mask", "stats", "safelora", "salora", "rank_one")
_SELECTED: set[str] = set(OP_GROUPS)


def want(group: str) -> bool:
    """Whether this op group was asked for (`--ops`)."""
    return group in _SELECTED


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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- baselines


def baseline_wanda_row(W: torch.Tensor, s: torch.Tensor, ratio: float) -> None:
    """locuslab/wanda `prune_wanda`: score, stable sort per row, scatter, zero."""
    W_metric = torch.abs(W) * torch.sqrt(s.reshape(1, -1))
    W_mask = torch.zeros_like(W_metric) == 1
    sort_res = torch.sort(W_metric, dim=-1, stable=True)
    indices = sort_res[1][:, : int(W_metric.shape[1] * ratio)]
    W_mask.scatter_(1, indices, True)
    W[W_mask] = 0


def baseline_row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Antidote-style highest-k per row via stable sort + scatter."""
    n = score.shape[1]
    k = int(n * ratio)
    idx = torch.sort(score, dim=-1, stable=True)[1][:, n - k :]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def baseline_tensor_sort(score: torch.Tensor, ratio: float) -> torch.Tensor:
    flat = score.flatten().float()
    n = flat.numel()
    k = int(n * ratio)
    idx = torch.sort(flat, stable=True)[1][n - k :]
    return torch.zeros(n, dtype=torch.bool, device=score.device).scatter_(0, idx, True).reshape(score.shape)


def baseline_tensor_kthvalue(score: torch.Tensor, ratio: float) -> torch.Tensor:
    flat = score.flatten().float()
    n = flat.numel()
    k = int(n * ratio)
    thr = torch.kthvalue(flat, n - k + 1).values
    return score.float() >= thr


def baseline_hook_sq_norms(X: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wanda's WrappedGPT.add_batch on the kept tokens: fp32 transposed copy, norm squared."""
    inp = X[mask].t().float()
    return torch.norm(inp, p=2, dim=1) ** 2


def baseline_covariance(X: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    Xf = X[mask].float()
    return Xf.T @ Xf


def baseline_salora(X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    C = torch.eye(U.shape[0], device=U.device) - U @ U.T
    return (X.float() @ C.T).to(X.dtype)


# ----------------------------------------------------------------------------- rows


def row(op, shape, dtype, ours_ms, base_name, base_ms, nbytes, copy_gbps, check, note=""):
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


def gpu_rows(shape, dname: str, dev: torch.device, copy_gbps: float, quick: bool, gen: torch.Generator) -> list[dict]:
    """All GPU comparisons for one weight shape and dtype."""
    dtype = DTYPES[dname]
    d_out, d_in = shape
    esz = torch.finfo(dtype).bits // 8
    numel = d_out * d_in
    out: list[dict] = []

    def randn(*sz, dt=dtype):
        return torch.randn(*sz, generator=gen, device="cpu", dtype=torch.float32).to(dev, dt)

    W = randn(d_out, d_in)
    s = torch.rand(d_in, generator=gen).to(dev) * 4 + 0.01
    ratio = 0.5

    # Wanda score
    if want("score"):
        ms = bench(lambda: wanda_score(W, s), dev, quick)
        bms = bench(lambda: W.abs() * torch.sqrt(s.reshape(1, -1)), dev, quick)
        ok = torch.equal(wanda_score(W, s), (W.float().abs() * torch.sqrt(s.double()).float().reshape(1, -1)))
        out.append(row("wanda_score", shape, dname, ms, "abs(W)*sqrt(s)", bms, numel * (esz + 4) + 4 * d_in, copy_gbps,
                       "exact" if ok else "MISMATCH"))

    # fused per-row prune (in place; repeated runs keep the work per run the same)
    if want("prune"):
        Wa, Wb = W.clone(), W.clone()
        wanda_prune_(Wa, s, ratio)
        baseline_wanda_row(Wb, s, ratio)
        check = "exact" if torch.equal(Wa, Wb) else "MISMATCH"
        Wa.copy_(W)
        ms = bench(lambda: wanda_prune_(Wa, s, ratio), dev, quick)
        Wb.copy_(W)
        bms = bench(lambda: baseline_wanda_row(Wb, s, ratio), dev, quick)
        out.append(row("wanda_prune_ row (fused)", shape, dname, ms, "wanda sort+scatter", bms, 2 * numel * esz, copy_gbps,
                       check))

    # masks on a precomputed score in the weight dtype
    if want("mask"):
        score = (W.float().abs() * torch.sqrt(s).reshape(1, -1)).to(dtype)
        m1 = topk_mask(score, ratio, largest=True, scope="row")
        check = "exact" if torch.equal(m1, baseline_row_mask(score.float(), ratio)) else "MISMATCH"
        ms = bench(lambda: topk_mask(score, ratio, largest=True, scope="row"), dev, quick)
        bms = bench(lambda: baseline_row_mask(score, ratio), dev, quick)
        out.append(row("topk_mask row", shape, dname, ms, "sort+scatter", bms, numel * (esz + 1), copy_gbps, check))

        mt = topk_mask(score, ratio, largest=True, scope="tensor")
        check = "exact" if torch.equal(mt, baseline_tensor_sort(score, ratio)) else "MISMATCH"
        ms = bench(lambda: topk_mask(score, ratio, largest=True, scope="tensor"), dev, quick)
        try:
            bms = bench(lambda: baseline_tensor_sort(score, ratio), dev, quick)
        except torch.OutOfMemoryError:
            bms = None
        out.append(row("topk_mask tensor", shape, dname, ms, "torch.sort flat", bms, numel * (esz + 1), copy_gbps, check,
                       f"{numel / 2**24:.1f}x 2^24 elements"))
        kms = bench(lambda: baseline_tensor_kthvalue(score, ratio), dev, True)
        out.append(row("topk_mask tensor", shape, dname, ms, "torch.kthvalue flat", kms, numel * (esz + 1), copy_gbps,
                       "count equal" if int(mt.sum()) == int(numel * ratio) else "MISMATCH", "kthvalue threshold ignores ties"))

    # statistics over TOKENS tokens with a response mask
    if want("stats"):
        X = randn(TOKENS, d_in)
        mask = torch.rand(TOKENS, generator=gen).to(dev) < 0.7
        e = rel_err(channel_sq_norms(X, mask), baseline_hook_sq_norms(X, mask))
        ms = bench(lambda: channel_sq_norms(X, mask), dev, quick)
        bms = bench(lambda: baseline_hook_sq_norms(X, mask), dev, quick)
        out.append(row("channel_sq_norms", (TOKENS, d_in), dname, ms, "hook torch.norm**2", bms, X.numel() * esz + TOKENS,
                       copy_gbps, f"rel {e:.1e}"))
        if not (quick and d_in > 14336):
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                e = rel_err(covariance(X, mask), baseline_covariance(X, mask))
                ms = bench(lambda: covariance(X, mask), dev, quick)
                bms = bench(lambda: baseline_covariance(X, mask), dev, quick)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
            flops = 2.0 * int(mask.sum()) * d_in * d_in
            out.append(row("covariance", (TOKENS, d_in), dname, ms, "fp32 Xf.T@Xf", bms, None, copy_gbps, f"rel {e:.1e}",
                           f"{flops / ms / 1e9:.1f} TFLOP/s"))

    # SafeLoRA, r = 16: V in the weight dtype, LoRA factors fp32
    if want("safelora"):
        V = W
        B = randn(d_out, RANK_SAFELORA, dt=torch.float32) * 0.01
        A = randn(RANK_SAFELORA, d_in, dt=torch.float32) * 0.01
        Bn, cos = safelora_project(V, B, A)
        Bd, cosd = safelora_project_reference(V, B, A)
        check = f"rel {rel_err(Bn, Bd):.1e}, dcos {abs(cos - cosd):.1e}"
        ms = bench(lambda: safelora_project(V, B, A), dev, quick)
        try:
            bms = bench(lambda: safelora_project_reference(V, B, A), dev, True)
        except torch.OutOfMemoryError:
            bms = None
        out.append(row(f"safelora_project r={RANK_SAFELORA}", shape, dname, ms, "dense P (PEFT)", bms, 2 * numel * esz,
                       copy_gbps, check))

    # SaLoRA projection on activations [tokens, d_out]
    if want("salora"):
        X = randn(2 * TOKENS, d_out)
        U = torch.linalg.qr(torch.randn(d_out, RANK_SALORA, generator=gen, dtype=torch.float32))[0].to(dev)
        e = rel_err(salora_project(X, U).float(), baseline_salora(X, U).float())
        ms = bench(lambda: salora_project(X, U), dev, quick)
        bms = bench(lambda: baseline_salora(X, U), dev, quick)
        out.append(row(f"salora_project r={RANK_SALORA}", (2 * TOKENS, d_out), dname, ms, "X @ dense C", bms,
                       2 * X.numel() * esz, copy_gbps, f"rel {e:.1e}"))

    # rank-one edits in place
    if want("rank_one"):
        u, v = randn(d_out, dt=torch.float32), randn(d_in, dt=torch.float32)
        Wa, Wb = W.clone(), W.clone()
        rank_one_update_(Wa, u, v)
        Wb += torch.outer(u, v).to(dtype)
        check = f"rel {rel_err(Wa.float(), Wb.float()):.1e}"
        ms = bench(lambda: rank_one_update_(Wa, u, v), dev, quick)
        bms = bench(lambda: Wb.add_(torch.outer(u, v).to(dtype)), dev, quick)
        out.append(row("rank_one_update_", shape, dname, ms, "W += outer(u,v)", bms, 2 * numel * esz, copy_gbps, check))
        r = randn(d_out, dt=torch.float32)
        rh = r / r.norm()
        Wa.copy_(W)
        Wb.copy_(W)
        direction_ablate_(Wa, r)
        Wb -= torch.outer(rh, rh @ Wb.float()).to(dtype)
        check = f"rel {rel_err(Wa.float(), Wb.float()):.1e}"
        ms = bench(lambda: direction_ablate_(Wa, r), dev, quick)
        bms = bench(lambda: Wb.sub_(torch.outer(rh, rh @ Wb.float()).to(dtype)), dev, quick)
        out.append(row("direction_ablate_", shape, dname, ms, "W -= outer(r, r@W)", bms, 2 * numel * esz, copy_gbps,
                       check, "two passes (r^T W, then update)"))
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def cpu_rows(dev: torch.device, copy_gbps: float, quick: bool, gen: torch.Generator) -> list[dict]:
    """The comparisons that mean something without a GPU (fp32 CPU math)."""
    out: list[dict] = []
    shapes = [(1024, 1024), (2048, 2048), (1024, 4096), (4096, 4096)] if quick else [(1024, 1024), (2048, 2048), (4096, 4096),
                                                                          (4096, 14336)]
    for shape in shapes:
        d_out, d_in = shape
        V = torch.randn(d_out, d_in, generator=gen)
        B = torch.randn(d_out, RANK_SAFELORA, generator=gen) * 0.01
        A = torch.randn(RANK_SAFELORA, d_in, generator=gen) * 0.01
        Bn, cos = safelora_project(V, B, A)
        Bd, cosd = safelora_project_reference(V, B, A)
        B64, cos64 = safelora_project_reference(V.double(), B.double(), A.double())
        check = (f"vs fp64: rel {rel_err(Bn, B64):.1e}, dcos {abs(cos - cos64):.1e} "
                 f"(dense fp32: {rel_err(Bd, B64):.1e}, {abs(cosd - cos64):.1e})")
        ms = bench(lambda V=V, B=B, A=A: safelora_project(V, B, A), dev, quick)
        bms = bench(lambda V=V, B=B, A=A: safelora_project_reference(V, B, A), dev, True)
        out.append(row(f"safelora_project r={RANK_SAFELORA}", shape, "fp32", ms, "dense P (PEFT)", bms,
                       2 * V.numel() * 4, copy_gbps, check))
        print(f"  safelora {shape}: {ms:.1f} ms vs {bms:.1f} ms", file=sys.stderr)
    for d in ([4096, 14336] if quick else [4096, 14336, 28672]):
        X = torch.randn(TOKENS, d, generator=gen)
        mask = torch.rand(TOKENS, generator=gen) < 0.7
        e = rel_err(channel_sq_norms(X, mask), baseline_hook_sq_norms(X, mask))
        ms = bench(lambda X=X, mask=mask: channel_sq_norms(X, mask), dev, quick)
        bms = bench(lambda X=X, mask=mask: baseline_hook_sq_norms(X, mask), dev, quick)
        out.append(row("channel_sq_norms", (TOKENS, d), "fp32", ms, "hook torch.norm**2", bms, X.numel() * 4 + TOKENS,
                       copy_gbps, f"rel {e:.1e}"))
        print(f"  sq_norms {d}: {ms:.1f} ms vs {bms:.1f} ms", file=sys.stderr)
    # the sort-free CPU select (select_cpu: compiled row select, numpy per tensor) vs the sort
    for shape in [(2048, 5632)] if quick else [(2048, 5632), (4096, 14336)]:
        score = torch.rand(shape, generator=gen)
        W = torch.randn(shape, generator=gen).to(torch.bfloat16)
        s = torch.rand(shape[1], generator=gen)
        numel = score.numel()
        for scope, ratio in (("row", 0.1), ("tensor", 0.5)):
            same = torch.equal(topk_mask(score, ratio, True, scope), topk_mask_reference(score, ratio, True, scope))
            ms = bench(lambda sc=score, r=ratio, sp=scope: topk_mask(sc, r, True, sp), dev, quick)
            bms = bench(lambda sc=score, r=ratio, sp=scope: topk_mask_reference(sc, r, True, sp), dev, True)
            out.append(row(f"topk_mask {scope} {ratio:g} (CPU select)", shape, "fp32", ms, "torch.sort", bms,
                           numel * 5, copy_gbps, "mask equal" if same else "MISMATCH"))
            print(f"  cpu select {scope} {shape}: {ms:.1f} ms vs {bms:.1f} ms", file=sys.stderr)
        same = torch.equal(wanda_prune_(W.clone(), s, 0.5), wanda_prune_reference_(W.clone(), s, 0.5))
        ms = bench(lambda W=W, s=s: wanda_prune_(W.clone(), s, 0.5), dev, quick)
        bms = bench(lambda W=W, s=s: wanda_prune_reference_(W.clone(), s, 0.5), dev, True)
        out.append(row("wanda_prune_ row 0.5 (CPU select)", shape, "bf16", ms, "score + torch.sort + fill", bms,
                       numel * 4, copy_gbps, "weights equal" if same else "MISMATCH", "both times include a clone"))
        print(f"  cpu prune {shape}: {ms:.1f} ms vs {bms:.1f} ms", file=sys.stderr)
    # per-tensor mask past 2^24 elements, where torch.quantile refuses
    shape = (4096, 4097)
    x = torch.randn(shape, generator=gen)
    n = x.numel()
    try:
        torch.quantile(x.flatten(), 0.5)
        qnote = "torch.quantile worked"
    except RuntimeError as exc:
        qnote = "torch.quantile: " + str(exc).split("\n")[0][:60]
    m = topk_mask(x, 0.5, scope="tensor")
    ms = bench(lambda: topk_mask(x, 0.5, scope="tensor"), dev, True)
    out.append(row("topk_mask tensor", shape, "fp32", ms, "torch.quantile", None, n * 5, copy_gbps,
                   "count exact" if int(m.sum()) == int(n * 0.5) else "MISMATCH",
                   f"{n / 2**24:.2f}x 2^24 elements; {qnote}; CPU path = select_cpu's radix histograms"))
    return out


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
    p.add_argument("--smoke", action="store_true", help="every GPU row at a tiny shape, results under /tmp")
    p.add_argument("--shapes", default=None, help="comma-separated d_outxd_in list for the GPU rows")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", default=",".join(OP_GROUPS), help="GPU op groups: " + ",".join(OP_GROUPS))
    args = p.parse_args(argv)
    _SELECTED.clear()
    _SELECTED.update(o for o in args.ops.split(",") if o)
    unknown = _SELECTED - set(OP_GROUPS)
    if unknown:
        p.error(f"unknown --ops {sorted(unknown)}; choose from {','.join(OP_GROUPS)}")

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
    out_dir = Path(args.out)
    if args.smoke:
        out_dir = Path("/tmp/surgery-kernel-bench-smoke")
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
            shapes = [(64, 96)]
        dnames = [d for d in args.dtypes.split(",") if d]
        if dev.type != "cuda":
            dnames = [d for d in dnames if d != "bf16"] or ["fp32"]
        for shape in shapes:
            for dname in dnames:
                print(f"  {shape} {dname}", file=sys.stderr)
                rows += gpu_rows(shape, dname, dev, copy_gbps, args.quick or args.smoke, gen)
    if dev.type != "cuda" and not args.smoke:
        rows += cpu_rows(dev, copy_gbps, args.quick, gen)

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
