"""Top-k masks by ratio, per row or per tensor, and the fused Wanda prune: one op, four files.

- `reference.py`: the sort-based references (fp32 math, the source of truth) and the tie rule;
- `triton.py`: the radix-select kernels and their launchers, with the interpreter workarounds;
- `cpu.py` (+ `_cpu_jit.py`, numba, imported on first use): the sort-free exact CPU select;
- `dispatch.py`: the public ops, choosing among them by device.
"""

from .dispatch import topk_mask, wanda_prune_, wanda_prune_count_
from .reference import topk_mask_reference, wanda_prune_reference_

__all__ = ["topk_mask", "topk_mask_reference", "wanda_prune_", "wanda_prune_count_", "wanda_prune_reference_"]
