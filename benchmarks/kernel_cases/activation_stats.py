"""Streaming activation statistics against the calibration hook code: Wanda's squared
channel norms and SparseGPT's fp32 covariance, over TOKENS tokens with a response mask."""

from __future__ import annotations

import torch
from surgery.kernels import channel_sq_norms, covariance

from .case import Case, Point, Suite, Trial, rel_err, tf32_off

TOKENS = 2048  # calibration tokens per batch


def baseline_hook_sq_norms(X: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wanda's WrappedGPT.add_batch on the kept tokens: fp32 transposed copy, norm squared."""
    inp = X[mask].t().float()
    return torch.norm(inp, p=2, dim=1) ** 2


def baseline_covariance(X: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    Xf = X[mask].float()
    return Xf.T @ Xf


def _activations(p: Point) -> tuple[torch.Tensor, torch.Tensor]:
    """[TOKENS, d_in] activations and a 70% token mask, shared by both statistics."""
    d_in = p.shape[-1]
    return p.shared("activations", lambda: (p.randn(TOKENS, d_in), torch.rand(TOKENS, generator=p.gen).to(p.dev) < 0.7))


def _sq_norms(p: Point) -> Trial:
    X, mask = _activations(p)
    return Trial(
        ours=lambda: channel_sq_norms(X, mask),
        baseline=lambda: baseline_hook_sq_norms(X, mask),
        check=lambda: f"rel {rel_err(channel_sq_norms(X, mask), baseline_hook_sq_norms(X, mask)):.1e}",
        useful_bytes=X.numel() * X.element_size() + TOKENS,
        shape=tuple(X.shape),
    )


def _covariance(p: Point) -> Trial | None:
    """Compute-bound: reported in TFLOP/s, not GB/s; the widest shape is skipped under --quick."""
    X, mask = _activations(p)
    d_in = X.shape[1]
    if p.quick and d_in > 14336:
        return None
    flops = 2.0 * int(mask.sum()) * d_in * d_in
    return Trial(
        ours=lambda: covariance(X, mask),
        baseline=lambda: baseline_covariance(X, mask),
        check=lambda: f"rel {rel_err(covariance(X, mask), baseline_covariance(X, mask)):.1e}",
        useful_bytes=None,
        shape=tuple(X.shape),
        note=lambda ms: f"{flops / ms / 1e9:.1f} TFLOP/s",
        setting=tf32_off,
    )


GPU = [
    Case("channel_sq_norms", "stats", "hook torch.norm**2", _sq_norms),
    Case("covariance", "stats", "fp32 Xf.T@Xf", _covariance),
]


def _cpu_activations(p: Point) -> None:
    """CPU points are (TOKENS, d) already: fp32 activations and the token mask."""
    p.inputs["activations"] = (torch.randn(*p.shape, generator=p.gen), torch.rand(TOKENS, generator=p.gen) < 0.7)


CPU = Suite(
    "cpu statistics",
    (Case("channel_sq_norms", "stats", "hook torch.norm**2", _sq_norms),),
    shapes=lambda quick: [(TOKENS, d) for d in ([4096, 14336] if quick else [4096, 14336, 28672])],
    dtypes=("fp32",),
    setup=_cpu_activations,
)
