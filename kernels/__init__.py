"""Triton kernels for the hot operations, each beside its PyTorch reference.

Every op module `surgery.kernels.<op>` (a package, `surgery.kernels.topk`, for the op with
several implementations) exposes `<op>_reference` (plain PyTorch,
fp32 math, the source of truth) and `<op>`, which dispatches to Triton for CUDA
tensors and to the reference for CPU tensors, except `topk_mask` and `wanda_prune_`,
whose CPU tensors take `select_cpu`, a sort-free exact path that gives the reference's
mask element for element (see `surgery.kernels.topk.cpu`). Set `SURGERY_FORCE_TRITON=1`
together with `TRITON_INTERPRET=1` (before Triton is imported) to run the Triton
code on CPU (the tests do). This package imports nothing else from the project.

Tie rule for every top-k/mask: elements are totally ordered by (score, flat index),
as torch.sort(stable=True) orders them; "smallest k" are the first k, "largest k"
the last k (see `surgery.kernels.topk.reference`).
"""

from ._runtime import HAS_TRITON
from .activation_stats import channel_sq_norms, channel_sq_norms_reference, covariance, covariance_reference
from .rank_one import (
    direction_ablate_,
    direction_ablate_reference_,
    rank_one_update_,
    rank_one_update_reference_,
)
from .safelora_project import column_space_basis, safelora_project, safelora_project_reference
from .salora_project import salora_fold, salora_fold_reference, salora_project, salora_project_reference
from .setdiff_mask import setdiff_mask, setdiff_mask_reference
from .topk import (
    topk_mask,
    topk_mask_reference,
    wanda_prune_,
    wanda_prune_count_,
    wanda_prune_reference_,
)
from .wanda_score import wanda_score, wanda_score_reference

__all__ = [
    "HAS_TRITON",
    "wanda_score",
    "wanda_score_reference",
    "topk_mask",
    "topk_mask_reference",
    "wanda_prune_",
    "wanda_prune_count_",
    "wanda_prune_reference_",
    "setdiff_mask",
    "setdiff_mask_reference",
    "safelora_project",
    "safelora_project_reference",
    "column_space_basis",
    "salora_fold",
    "salora_fold_reference",
    "salora_project",
    "salora_project_reference",
    "channel_sq_norms",
    "channel_sq_norms_reference",
    "covariance",
    "covariance_reference",
    "rank_one_update_",
    "rank_one_update_reference_",
    "direction_ablate_",
    "direction_ablate_reference_",
]
