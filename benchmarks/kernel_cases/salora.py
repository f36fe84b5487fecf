"""SaLoRA's projection of activations [tokens, d_out] at r = 32 against `X @ C` with the
dense C = I - U U^T (SaLoRA's forward)."""

from __future__ import annotations

import torch
from surgery.kernels import salora_project

from .activation_stats import TOKENS
from .case import Case, Point, Trial, rel_err

RANK = 32


def baseline_salora(X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    C = torch.eye(U.shape[0], device=U.device) - U @ U.T
    return (X.float() @ C.T).to(X.dtype)


def _project(p: Point) -> Trial:
    d_out = p.shape[0]
    X = p.randn(2 * TOKENS, d_out)
    U = torch.linalg.qr(torch.randn(d_out, RANK, generator=p.gen, dtype=torch.float32))[0].to(p.dev)
    return Trial(
        ours=lambda: salora_project(X, U),
        baseline=lambda: baseline_salora(X, U),
        check=lambda: f"rel {rel_err(salora_project(X, U).float(), baseline_salora(X, U).float()):.1e}",
        useful_bytes=2 * X.numel() * X.element_size(),
        shape=tuple(X.shape),
    )


GPU = [Case(f"salora_project r={RANK}", "salora", "X @ dense C", _project)]
