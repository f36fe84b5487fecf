"""SafeLoRA's projection at r = 16, low rank against the dense projector of SafeLoRA/PEFT
(`P = V V^T / ||V||`, `P B A`)."""

from __future__ import annotations

import torch
from surgery.kernels import safelora_project, safelora_project_reference

from .case import Case, Point, Suite, Trial, rel_err

RANK = 16


def _gpu(p: Point) -> Trial:
    """V in the weight dtype, the LoRA factors in fp32."""
    V = p.inputs["W"]
    B = p.randn(V.shape[0], RANK, dtype=torch.float32) * 0.01
    A = p.randn(RANK, V.shape[1], dtype=torch.float32) * 0.01

    def check() -> str:
        Bn, cos = safelora_project(V, B, A)
        Bd, cosd = safelora_project_reference(V, B, A)
        return f"rel {rel_err(Bn, Bd):.1e}, dcos {abs(cos - cosd):.1e}"

    return Trial(
        ours=lambda: safelora_project(V, B, A),
        baseline=lambda: safelora_project_reference(V, B, A),
        check=check,
        useful_bytes=2 * V.numel() * V.element_size(),
        quick_baseline=True,
        baseline_may_oom=True,
    )


def _cpu(p: Point) -> Trial:
    """fp32 on both sides, each held to an fp64 reference."""
    d_out, d_in = p.shape
    V = torch.randn(d_out, d_in, generator=p.gen)
    B = torch.randn(d_out, RANK, generator=p.gen) * 0.01
    A = torch.randn(RANK, d_in, generator=p.gen) * 0.01

    def check() -> str:
        Bn, cos = safelora_project(V, B, A)
        Bd, cosd = safelora_project_reference(V, B, A)
        B64, cos64 = safelora_project_reference(V.double(), B.double(), A.double())
        return (f"vs fp64: rel {rel_err(Bn, B64):.1e}, dcos {abs(cos - cos64):.1e} "
                f"(dense fp32: {rel_err(Bd, B64):.1e}, {abs(cosd - cos64):.1e})")

    return Trial(
        ours=lambda: safelora_project(V, B, A),
        baseline=lambda: safelora_project_reference(V, B, A),
        check=check,
        useful_bytes=2 * V.numel() * 4,
        quick_baseline=True,
    )


OP = f"safelora_project r={RANK}"
GPU = [Case(OP, "safelora", "dense P (PEFT)", _gpu)]
CPU = Suite(
    "cpu safelora",
    (Case(OP, "safelora", "dense P (PEFT)", _cpu),),
    shapes=lambda quick: [(1024, 1024), (2048, 2048), (1024, 4096), (4096, 4096)] if quick
    else [(1024, 1024), (2048, 2048), (4096, 4096), (4096, 14336)],
    dtypes=("fp32",),
)
