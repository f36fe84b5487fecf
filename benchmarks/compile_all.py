"""Compile every Triton kernel of surgery.kernels to a GPU binary without a GPU.

Run as a script (never with TRITON_INTERPRET=1):
`python benchmarks/compile_all.py [sm] [substring,substring,...]` (default sm 90, all kernels).
Triton ships ptxas, so the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) runs on a
CPU-only machine; this catches what the interpreter cannot (type errors in compiled mode,
constexpr handling, unsupported ops) and reports registers and spills per kernel variant.
Prints one line per variant and exits non-zero if any fails.
"""

from __future__ import annotations

import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import importlib  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def mod(name: str):
    return importlib.import_module(f"surgery.kernels.{name}")


def variants():
    """(label, kernel, signature, constexprs, num_warps) for the launches the ops make."""
    tk = mod("topk.triton")
    out = []
    ws = mod("wanda_score")
    for wt in ("fp32", "fp16", "bf16"):
        out.append((f"wanda_score {wt}", ws._wanda_score_kernel,
                    {"W": f"*{wt}", "S": "*fp32", "OUT": "*fp32", "n_cols": "i32", "stride_w": "i32",
                     "stride_o": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}, 4))
    row_sig = {"X": "*fp32", "S": "*fp32", "OUT": "*i8", "n_cols": "i32", "stride_x": "i32", "stride_o": "i32",
               "j_count": "i32", "MODE": "constexpr", "WRITE": "constexpr", "INVERT": "constexpr",
               "ROUNDS": "constexpr", "SHIFT": "constexpr", "BLOCK": "constexpr", "SINGLE": "constexpr"}
    for xt, rounds, shift in (("fp32", 4, 0), ("fp16", 3, 8), ("bf16", 2, 16)):
        for block, single, warps in ((8192, True, 16), (4096, True, 8), (4096, False, 8)):
            sig = dict(row_sig, X=f"*{xt}")
            out.append((f"row_select mask {xt} B{block}{'' if single else ' chunked'}", tk._row_select_kernel, sig,
                        {"MODE": 0, "WRITE": 0, "INVERT": True, "ROUNDS": rounds, "SHIFT": shift, "BLOCK": block,
                         "SINGLE": single}, warps))
    for wt in ("fp32", "fp16", "bf16"):
        sig = dict(row_sig, X=f"*{wt}", OUT=f"*{wt}")
        out.append((f"row_select fused-prune {wt} B8192", tk._row_select_kernel, sig,
                    {"MODE": 1, "WRITE": 1, "INVERT": False, "ROUNDS": 4, "SHIFT": 0, "BLOCK": 8192,
                     "SINGLE": True}, 16))
        out.append((f"row_select fused-prune {wt} chunked", tk._row_select_kernel, sig,
                    {"MODE": 1, "WRITE": 1, "INVERT": True, "ROUNDS": 4, "SHIFT": 0, "BLOCK": 4096,
                     "SINGLE": False}, 8))
    for xt, mode in (("bf16", 0), ("fp32", 0), ("bf16", 1)):
        rounds, shift = (2, 16) if (xt == "bf16" and mode == 0) else (4, 0)
        for r in range(rounds):
            out.append((f"tensor_hist {xt} mode{mode} r{r}", tk._tensor_hist_kernel,
                        {"X": f"*{xt}", "S": "*fp32", "HIST": "*i32", "STATE": "*i32", "numel": "i64",
                         "n_cols": "i32", "iters": "i32", "r": "constexpr", "MODE": "constexpr", "ROUNDS": "constexpr",
                         "SHIFT": "constexpr", "BLOCK": "constexpr"},
                        {"r": r, "MODE": mode, "ROUNDS": rounds, "SHIFT": shift, "BLOCK": 4096}, 4))
        out.append((f"tensor_eqcount {xt} mode{mode}", tk._tensor_eqcount_kernel,
                    {"X": f"*{xt}", "S": "*fp32", "STATE": "*i32", "COUNTS": "*i32", "numel": "i64", "n_cols": "i32",
                     "MODE": "constexpr", "SHIFT": "constexpr", "BLOCK": "constexpr"},
                    {"MODE": mode, "SHIFT": shift, "BLOCK": 4096}, 4))
        out.append((f"tensor_apply {xt} mode{mode}", tk._tensor_apply_kernel,
                    {"X": f"*{xt}", "S": "*fp32", "OUT": "*i8" if mode == 0 else f"*{xt}", "STATE": "*i32",
                     "BEFORE": "*i32", "numel": "i64", "n_cols": "i32", "MODE": "constexpr", "WRITE": "constexpr",
                     "INVERT": "constexpr", "SHIFT": "constexpr", "BLOCK": "constexpr"},
                    {"MODE": mode, "WRITE": mode, "INVERT": True, "SHIFT": shift, "BLOCK": 4096}, 4))
    for r in range(4):
        out.append((f"tensor_pick r{r}", tk._tensor_pick_kernel, {"HIST": "*i32", "STATE": "*i32", "r": "constexpr"},
                    {"r": r}, 4))
    cr = mod("_colreduce")
    for xt, square, has_w, w_bool in (("bf16", True, True, True), ("fp32", True, False, False),
                                      ("bf16", False, True, False), ("fp16", False, True, False)):
        out.append((f"colreduce {xt} sq={square} w={has_w} bool={w_bool}", cr._colreduce_kernel,
                    {"X": f"*{xt}", "Wt": "*i8" if w_bool else ("*fp32" if has_w else f"*{xt}"), "PART": "*fp32",
                     "n_rows": "i32", "n_cols": "i32", "stride_x": "i32", "rows_per_split": "i32",
                     "SQUARE": "constexpr", "HAS_W": "constexpr", "W_BOOL": "constexpr", "BLOCK_R": "constexpr",
                     "BLOCK_C": "constexpr"},
                    {"SQUARE": square, "HAS_W": has_w, "W_BOOL": w_bool, "BLOCK_R": 32, "BLOCK_C": 128}, 4))
    st = mod("activation_stats")
    for xt in ("bf16", "fp16", "fp32"):
        out.append((f"gram {xt}", st._gram_kernel,
                    {"X": f"*{xt}", "M": "*i8", "OUT": "*fp32", "n_tok": "i32", "d": "i32", "stride_x": "i32",
                     "HAS_MASK": "constexpr", "IEEE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                     "BLOCK_K": "constexpr"},
                    {"HAS_MASK": True, "IEEE": xt == "fp32", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4))
    sl = mod("safelora_project")
    for vt in ("bf16", "fp32"):
        out.append((f"safelora vtb {vt}", sl._vtb_kernel,
                    {"V": f"*{vt}", "Bm": "*fp32", "CPART": "*fp32", "SQPART": "*fp32", "d_out": "i32", "d_in": "i32",
                     "r": "i32", "stride_v": "i32", "rows_per_split": "i32", "BLOCK_M": "constexpr",
                     "BLOCK_N": "constexpr", "BLOCK_R": "constexpr"},
                    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 16}, 4))
        out.append((f"safelora vc {vt}", sl._vc_kernel,
                    {"V": f"*{vt}", "Cm": "*fp32", "OUT": "*fp32", "d_out": "i32", "d_in": "i32", "r": "i32",
                     "stride_v": "i32", "scale": "fp32", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr",
                     "BLOCK_R": "constexpr"},
                    {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 16}, 4))
    sa = mod("salora_project")
    for xt, br in (("bf16", 32), ("fp32", 16), ("fp16", 64)):
        out.append((f"salora project {xt} R{br}", sa._project_rows_kernel,
                    {"X": f"*{xt}", "U": "*fp32", "Y": f"*{xt}", "n_rows": "i32", "d": "i32", "r": "i32",
                     "stride_x": "i32", "stride_y": "i32", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr",
                     "BLOCK_R": "constexpr"},
                    {"BLOCK_T": 16, "BLOCK_D": 64 if br <= 16 else 32, "BLOCK_R": br}, 4))
    ro = mod("rank_one")
    for wt in ("bf16", "fp32"):
        out.append((f"rank_one {wt}", ro._rank_one_kernel,
                    {"W": f"*{wt}", "U": "*fp32", "V": "*fp32", "n_rows": "i32", "n_cols": "i32", "stride_w": "i32",
                     "alpha": "fp32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                    {"BLOCK_M": 16, "BLOCK_N": 256}, 4))
    return out


def resource_usage(cubin: bytes) -> str:
    """Registers / spill stores / spill loads from cuobjdump (shipped with Triton), if it runs."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            txt = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        except Exception:
            return "regs=?"
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", txt)
    return f"regs={m.group(1)} stack={m.group(2)} local={m.group(4)}" if m else "regs=?"


def main() -> int:
    sm = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    only = [o for o in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if o]
    if os.environ.get("NO_HIST_MASK"):  # compile the Triton-3.6 fallback of tl.histogram(mask=)
        tk = mod("topk.triton")
        tk._HIST_HAS_MASK = triton.language.constexpr(False)
    target = GPUTarget("cuda", sm, 32)
    failures = 0
    for label, kernel, sig, consts, warps in variants():
        if only and not any(o in label for o in only):
            continue
        try:
            src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
            k = triton.compile(src, target=target, options={"num_warps": warps})
            md = k.metadata
            print(f"ok   {label:45s} {resource_usage(k.asm['cubin'])} smem={getattr(md, 'shared', '?')}")
        except Exception as exc:  # report and continue
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if os.environ.get("VERBOSE"):
                traceback.print_exc()
    print(f"{failures} failure(s) for sm_{sm}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
