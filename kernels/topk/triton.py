"""Triton radix-select kernels for top-k masks and the fused Wanda prune, with their launchers.

Scores map to order-preserving int32 keys (the fp32 bit pattern with the
non-sign bits flipped for negatives, shifted right by 16 for bf16 and by 8 for fp16
inputs, whose low bits carry nothing). Selecting the first j elements means finding
the j-th smallest key T by MSB radix select with 8-bit digits and `tl.histogram`
(2, 3 or 4 rounds), then taking every key < T plus the first m keys == T in index
order (a running `tl.cumsum` over the ties). "Largest k" is the complement of the
smallest n - k, which gives exactly the last k of the order (the tie rule of `reference`).
- scope="row": one program per row; the row is held in registers when it fits
  (<= 8192 elements) and re-read per round from cache otherwise.
- scope="tensor": one launch per radix round, each program adding its local
  histogram to a global 256-bin histogram with `tl.atomic_add`; a one-program launch
  picks the digit on the device (no host sync); a per-block count of the ties,
  its exclusive prefix sum, and a final pass write the mask. The only temporaries
  are 256-bin histograms and one int32 per 4096-element block, never a full-size
  tensor, and int64 offsets keep it correct beyond 2^24 (and 2^31) elements.
The fused prune computes the score |W| * sqrt(s) on the fly inside the same kernels
and zeroes the selected weights in place: no score tensor, no sort, no int64 indices.

Interpreter workarounds live here too: under TRITON_INTERPRET=1 bf16 inputs are widened
to fp32 first (the interpreter's bf16 loads are wrong; fp32 keys order the same), and the
per-tensor passes run few large programs.
"""

from __future__ import annotations

import inspect
import os

import torch

from .._runtime import HAS_TRITON, device_fn, interpreting, next_pow2, tl, triton

__all__ = ["topk_mask_triton", "wanda_prune_triton_"]

# Triton >= 3.7-ish has `tl.histogram(..., mask=)`; older versions need the bin-0 trick.
_HIST_HAS_MASK = tl.constexpr(HAS_TRITON and "mask" in inspect.signature(tl.histogram).parameters)
# Longest row held in registers in one block, and the block for longer rows (re-read per
# round from L1/L2). Compiled for sm_90 (fused bf16 prune): 8192 at 16 warps uses 128
# registers and 64 B of stack on Triton 3.9 (264 B on 3.6); 16384 spilled 240 B (3.9) and
# 1.2 KB (3.6) per thread, so longer rows take the chunked path (4096 at 8 warps: 156-169
# registers, no stack on either). SURGERY_TOPK_MAX_SINGLE / SURGERY_TOPK_CHUNK override.
_MAX_SINGLE = 8192
_CHUNK = 4096
_TENSOR_BLOCK = 4096  # elements per program-block in the per-tensor passes


# --------------------------------------------------------------------------- kernels


@device_fn
def _ordered_key(x, SHIFT: tl.constexpr):
    """fp32 -> int32 whose signed order is the float order (NaN on top, -0 == +0)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    key = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    key = tl.where(x != x, 0x7FFFFFFF, key)
    if SHIFT > 0:
        key = key >> SHIFT
    return key


@device_fn
def _load_keys(X, S, offs, scol, valid, MODE: tl.constexpr, SHIFT: tl.constexpr):
    """Keys of the elements at X + offs: the scores themselves (MODE 0) or the
    Wanda score |X| * sqrt(S[scol]) computed on the fly (MODE 1)."""
    x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
    if MODE == 1:
        s = tl.load(S + scol, mask=valid, other=0.0).to(tl.float32)
        x = tl.abs(x) * tl.sqrt_rn(s)
    return _ordered_key(x, SHIFT)


@device_fn
def _digit(key, r: tl.constexpr, ROUNDS: tl.constexpr):
    """8-bit digit r (0 = most significant) of a key with 8*ROUNDS significant bits."""
    shift: tl.constexpr = 8 * (ROUNDS - 1 - r)
    if r == 0:
        d = (key >> shift) + 128
    else:
        d = (key >> shift) & 0xFF
    return d


@device_fn
def _in_prefix(key, prefix, r: tl.constexpr, ROUNDS: tl.constexpr):
    """Whether the top r digits of key equal prefix (always true for r == 0)."""
    if r == 0:
        res = key == key
    else:
        shift: tl.constexpr = 8 * (ROUNDS - r)
        res = (key >> shift) == prefix
    return res


@device_fn
def _masked_hist(digit, include, BLOCK: tl.constexpr):
    """256-bin histogram of digit over the included lanes only.

    `tl.histogram` counts masked-out lanes unless given `mask=`, which older Tritons
    lack: there, excluded lanes go to bin 0 and their number is subtracted from bin 0.
    """
    if _HIST_HAS_MASK:
        h = tl.histogram(digit, 256, mask=include)
    else:
        bins = tl.arange(0, 256)
        h = tl.histogram(tl.where(include, digit, 0), 256)
        n_out = BLOCK - tl.sum(include.to(tl.int32), 0)
        h = h - tl.where(bins == 0, n_out, 0)
    return h


@device_fn
def _pick_bin(hist, remaining):
    """Bin b holding the remaining-th smallest element, and how many lie in bins < b.

    One max-reduction over (cumulative count, bin) packed in int64: the last bin whose
    inclusive cumulative count is below `remaining` is b - 1 (counts never decrease).
    """
    bins = tl.arange(0, 256)
    cum = tl.cumsum(hist, 0)
    packed = tl.where(cum < remaining, cum.to(tl.int64) * 512 + bins + 1, 0)
    top = tl.max(packed, 0)
    b = (top & 511).to(tl.int32)
    below = (top >> 9).to(tl.int32)
    return b, below


@triton.jit
def _row_select_kernel(
    X, S, OUT, n_cols, stride_x, stride_o, j_count,
    MODE: tl.constexpr, WRITE: tl.constexpr, INVERT: tl.constexpr,
    ROUNDS: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    """One program per row: select the first j_count elements of the row under the
    tie rule (or the complement if INVERT); write an int8 mask (WRITE 0) or zero
    the selected elements of X in place (WRITE 1)."""
    row = tl.program_id(0).to(tl.int64)
    xrow = X + row * stride_x
    offs = tl.arange(0, BLOCK)
    prefix = tl.full([], 0, tl.int32)
    remaining = tl.full([], 0, tl.int32) + j_count
    if SINGLE:
        valid0 = offs < n_cols
        key0 = _load_keys(xrow, S, offs, offs, valid0, MODE, SHIFT)
    for r in tl.static_range(ROUNDS):
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            valid = cols < n_cols
            if SINGLE:
                key = key0
            else:
                key = _load_keys(xrow, S, cols, cols, valid, MODE, SHIFT)
            inc = valid & _in_prefix(key, prefix, r, ROUNDS)
            hist += _masked_hist(_digit(key, r, ROUNDS), inc, BLOCK)
        b, below = _pick_bin(hist, remaining)
        remaining -= below
        if r == 0:
            prefix = b - 128
        else:
            prefix = prefix * 256 + b
    # prefix is now the key T of the j-th smallest element; take every key < T and
    # the first `remaining` keys == T in index order.
    seen = tl.full([], 0, tl.int32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        valid = cols < n_cols
        if SINGLE:
            key = key0
        else:
            key = _load_keys(xrow, S, cols, cols, valid, MODE, SHIFT)
        eq = ((key == prefix) & valid).to(tl.int32)
        rank = seen + tl.cumsum(eq, 0) - eq
        sel = (key < prefix) | ((eq != 0) & (rank < remaining))
        seen += tl.sum(eq, 0)
        if INVERT:
            sel = ~sel
        sel = sel & valid
        if WRITE == 0:
            tl.store(OUT + row * stride_o + cols, sel.to(tl.int8), mask=valid)
        else:
            tl.store(xrow + cols, tl.zeros([BLOCK], dtype=X.dtype.element_ty), mask=sel)


@triton.jit
def _tensor_hist_kernel(
    X, S, HIST, STATE, numel, n_cols, iters,
    r: tl.constexpr, MODE: tl.constexpr, ROUNDS: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Radix round r over the whole tensor: add the local histogram of digit r of the
    keys matching the current prefix (STATE[0]) into HIST[r] with atomics. Programs
    stride over the blocks: program p takes blocks p, p + nprog, ... (`iters` of them)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    prefix = tl.load(STATE)
    hist = tl.zeros([256], dtype=tl.int32)
    for it in range(0, iters):
        idx = (pid.to(tl.int64) + it * nprog.to(tl.int64)) * BLOCK + offs
        valid = idx < numel
        key = _load_keys(X, S, idx, idx % n_cols, valid, MODE, SHIFT)
        inc = valid & _in_prefix(key, prefix, r, ROUNDS)
        hist += _masked_hist(_digit(key, r, ROUNDS), inc, BLOCK)
    tl.atomic_add(HIST + r * 256 + tl.arange(0, 256), hist)


@triton.jit
def _tensor_pick_kernel(HIST, STATE, r: tl.constexpr):
    """One program: pick digit r from HIST[r] and update STATE = [prefix, remaining]."""
    hist = tl.load(HIST + r * 256 + tl.arange(0, 256))
    prefix = tl.load(STATE)
    remaining = tl.load(STATE + 1)
    b, below = _pick_bin(hist, remaining)
    if r == 0:
        prefix = b - 128
    else:
        prefix = prefix * 256 + b
    tl.store(STATE, prefix)
    tl.store(STATE + 1, remaining - below)


@triton.jit
def _tensor_eqcount_kernel(
    X, S, STATE, COUNTS, numel, n_cols, MODE: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr
):
    """COUNTS[block] = number of keys equal to the threshold T = STATE[0] in the block."""
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    key = _load_keys(X, S, idx, idx % n_cols, valid, MODE, SHIFT)
    thr = tl.load(STATE)
    tl.store(COUNTS + pid, tl.sum(((key == thr) & valid).to(tl.int32), 0))


@triton.jit
def _tensor_apply_kernel(
    X, S, OUT, STATE, BEFORE, numel, n_cols,
    MODE: tl.constexpr, WRITE: tl.constexpr, INVERT: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Final pass: select keys < T and the first STATE[1] keys == T in flat order;
    BEFORE[block] is the number of keys == T in earlier blocks."""
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    key = _load_keys(X, S, idx, idx % n_cols, valid, MODE, SHIFT)
    thr = tl.load(STATE)
    m = tl.load(STATE + 1)
    eq = ((key == thr) & valid).to(tl.int32)
    rank = tl.load(BEFORE + pid) + tl.cumsum(eq, 0) - eq
    sel = (key < thr) | ((eq != 0) & (rank < m))
    if INVERT:
        sel = ~sel
    sel = sel & valid
    if WRITE == 0:
        tl.store(OUT + idx, sel.to(tl.int8), mask=valid)
    else:
        tl.store(X + idx, tl.zeros([BLOCK], dtype=X.dtype.element_ty), mask=sel)


# --------------------------------------------------------------------------- launchers


def _key_format(dtype: torch.dtype) -> tuple[int, int]:
    """(radix rounds, right shift) of the order-preserving key for scores of this dtype."""
    if dtype == torch.bfloat16:
        return 2, 16
    if dtype == torch.float16:
        return 3, 8
    return 4, 0


def _row_launch(X, S, out, j: int, invert: bool, mode: int, block: int | None = None) -> None:
    """Per-row select on a 2-D X with unit column stride (mask into out, or X zeroed in place)."""
    n_rows, n_cols = X.shape
    if n_rows == 0 or n_cols == 0:
        return
    rounds, shift = _key_format(X.dtype if mode == 0 else torch.float32)
    if block is None:
        max_single = int(os.environ.get("SURGERY_TOPK_MAX_SINGLE", _MAX_SINGLE))
        chunk = int(os.environ.get("SURGERY_TOPK_CHUNK", _CHUNK))
        block = next_pow2(n_cols) if n_cols <= max_single else chunk
    block = max(int(block), 256)
    single = block >= n_cols
    num_warps = 4 if block <= 2048 else (8 if block <= 4096 else 16)
    write = 0 if out is not None else 1
    o = out.view(torch.int8) if out is not None else X
    _row_select_kernel[(n_rows,)](
        X, S if S is not None else X, o, n_cols, X.stride(0), o.stride(0), j,
        MODE=mode, WRITE=write, INVERT=invert, ROUNDS=rounds, SHIFT=shift,
        BLOCK=block, SINGLE=single, num_warps=num_warps,
    )


def _tensor_launch(X, S, out, j: int, invert: bool, mode: int, block: int | None = None) -> None:
    """Per-tensor select on a contiguous X (mask into out, or X zeroed in place)."""
    numel = X.numel()
    if numel == 0:
        return
    if numel >= 2**31 - 1:
        raise ValueError("per-tensor top-k supports fewer than 2^31 elements (int32 histogram counts)")
    n_cols = X.shape[-1] if X.dim() > 0 else 1
    rounds, shift = _key_format(X.dtype if mode == 0 else torch.float32)
    if block is None:  # the interpreter runs few large programs fastest
        block = _TENSOR_BLOCK if X.is_cuda else 1 << 16
    block = int(block)
    dev = X.device
    hist = torch.zeros((rounds, 256), dtype=torch.int32, device=dev)
    state = torch.tensor([0, j], dtype=torch.int32, device=dev)
    n_blocks = triton.cdiv(numel, block)
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        hist_grid = min(n_blocks, 8 * sms)
    else:  # interpreter: few large programs are fastest
        hist_grid = min(n_blocks, 8)
    Sx = S if S is not None else X
    for r in range(rounds):
        _tensor_hist_kernel[(hist_grid,)](
            X, Sx, hist, state, numel, n_cols, triton.cdiv(n_blocks, hist_grid),
            r=r, MODE=mode, ROUNDS=rounds, SHIFT=shift, BLOCK=block,
        )
        _tensor_pick_kernel[(1,)](hist, state, r=r)
    counts = torch.empty(n_blocks, dtype=torch.int32, device=dev)
    _tensor_eqcount_kernel[(n_blocks,)](X, Sx, state, counts, numel, n_cols, MODE=mode, SHIFT=shift, BLOCK=block)
    before = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    write = 0 if out is not None else 1
    o = out.view(torch.int8) if out is not None else X
    _tensor_apply_kernel[(n_blocks,)](
        X, Sx, o, state, before, numel, n_cols,
        MODE=mode, WRITE=write, INVERT=invert, SHIFT=shift, BLOCK=block,
    )


def _prep_scores(scores: torch.Tensor) -> torch.Tensor:
    if not scores.is_floating_point():
        scores = scores.float()
    elif scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        scores = scores.float()
    if interpreting() and scores.dtype == torch.bfloat16:
        scores = scores.float()  # the interpreter's bf16 loads are wrong; fp32 keys order the same
    return scores.contiguous()


def _select(
    X: torch.Tensor, S: torch.Tensor | None, out: torch.Tensor | None, n: int, kk: int,
    largest: bool, scope: str, mode: int, block: int | None,
) -> None:
    j = n - kk if largest else kk
    launch = _row_launch if scope == "row" else _tensor_launch
    X2 = X.reshape(-1, X.shape[-1]) if scope == "row" else X
    out2 = None if out is None else (out.reshape(X2.shape))
    launch(X2, S, out2, j, largest, mode, block)


# --------------------------------------------------------------------------- entry points


def topk_mask_triton(
    scores: torch.Tensor, n: int, kk: int, largest: bool, scope: str,
    out: torch.Tensor | None, block: int | None = None,
) -> torch.Tensor:
    """The top-k mask of `scores` (group size n, count kk, both checked) by radix select; into `out` if given."""
    x = _prep_scores(scores)
    if out is None:
        out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    elif out.shape != scores.shape or out.dtype != torch.bool or not out.is_contiguous():
        raise ValueError("out must be a contiguous bool tensor of the scores' shape")
    _select(x, None, out, n, kk, largest, scope, 0, block)
    return out


def wanda_prune_triton_(
    W: torch.Tensor, sq_norms: torch.Tensor, n: int, kk: int, largest: bool, scope: str, block: int | None = None
) -> None:
    """Zero in place the kk smallest (largest) Wanda scores of W per row or per tensor, fused in one kernel."""
    if interpreting() and W.dtype == torch.bfloat16:  # the interpreter's bf16 is broken: prune an fp32 copy
        work = W.float()
        _select(work, sq_norms.float().contiguous(), None, n, kk, largest, scope, 1, block)
        W.copy_(work)
        return
    work = W if W.is_contiguous() else W.contiguous()
    _select(work, sq_norms.contiguous(), None, n, kk, largest, scope, 1, block)
    if work is not W:
        W.copy_(work)
