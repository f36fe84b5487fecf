"""Wanda pruning (Sun et al. 2023), streamed layer by layer.

Wanda scores each weight of a decoder-layer Linear by S_ij = |W_ij| · ||X_j||_2 (X_j:
input channel j over the calibration tokens) and zeroes the `int(d_in · sparsity)`
lowest scores of every output row (ties in `torch.sort(stable=True)` order). As in the
reference, statistics of all Linears of a layer come from the dense layer, the layer is
then pruned and re-run, and the next layer is calibrated on the pruned outputs.

The flow is `surgery.pipeline.layerwise.layer_surgery`: one decoder layer at a time
from the checkpoint, each weight edited in fp32 and cast back (exact: an edit only
zeroes entries), every other tensor copied as it is. On CPU the masks come from the
sort-free `surgery.kernels` path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from surgery.calib.data import Sample, calibration_samples
from surgery.calib.stats import LinearStats
from surgery.errors import SurgeryError
from surgery.io.atomic import check_output
from surgery.kernels import wanda_prune_count_
from surgery.methods.config import CalibrationConfig, Runtime, option
from surgery.model.load import default_device
from surgery.pipeline.layerwise import LayerEdit, layer_surgery
from surgery.report import Report, TensorChange

__all__ = ["WandaConfig", "run", "wanda", "wanda_edit"]


@dataclass(frozen=True, kw_only=True)
class WandaConfig(CalibrationConfig):
    """Wanda's options; defaults are the reference's (128 samples, per-row comparison)."""

    method = "wanda"
    sparsity: float = option(help="Share of each row's weights to zero, e.g. 0.5.", low=0.0, high=1.0,
                             high_open=True)
    scope: Literal["row", "tensor"] = option(
        "row", "Compare scores within each output row (Wanda) or over the whole matrix.")
    targets: tuple[str, ...] = option((), "Modules to prune (q_proj,self_attn.v_proj, globs, re:REGEX); "
                                          "default every decoder Linear.")
    num_samples: int | None = option(128, "Calibration samples read from the file (Wanda's nsamples).", low=1)


def wanda_edit(sparsity: float, scope: str = "row") -> LayerEdit:
    """Wanda's rule: zero the `int(n · sparsity)` lowest |W|·||X|| per row (or per tensor)."""

    def edit(name: str, W: torch.Tensor, st: LinearStats) -> TensorChange:
        assert st.sq_norms is not None  # calibration collects sq_norms by default
        s = st.sq_norms.to(W.device)
        changed = wanda_prune_count_(W, s, sparsity, largest=False, scope=scope)
        n = W.shape[1] if scope == "row" else W.numel()
        rows = W.shape[0] if scope == "row" else 1
        return TensorChange(name, list(W.shape), rows * int(n * sparsity), changed)

    return edit


def run(config: WandaConfig, inputs: Mapping[str, Any], out: str | Path | None,
        runtime: Runtime = Runtime(), *, samples: Sequence[Sample] | None = None) -> Report:
    """Prune `inputs["model"]` with Wanda, calibrated on the pairs in `inputs["calib"]`; write `out`.

    Layers are pruned in order and later layers calibrated on the pruned outputs, as the
    reference does. The output has the input's names, dtypes and shapes. `samples`
    (pre-tokenised calibration samples) replaces reading `calib`.
    """
    model, calib = inputs["model"], inputs.get("calib")
    if not runtime.dry_run:
        if out is None:
            raise SurgeryError("give an output path (-o) or ask for a dry run")
        check_output(out, runtime.force, inputs)
    if samples is None:
        if calib is None:
            raise SurgeryError("wanda needs calibration pairs (calib)")
        samples = calibration_samples(model, calib, num_samples=config.num_samples, max_length=config.max_length,
                                      chat_template=config.chat_template)
    report = Report("wanda", config.to_dict())
    return layer_surgery(model, samples, wanda_edit(config.sparsity, config.scope), out, report,
                         inputs={"calib": Path(calib)} if calib is not None else None,
                         targets=list(config.targets) or None, token_mask=config.tokens,
                         batch_size=runtime.batch_size,
                         device=default_device(runtime.device), force=runtime.force, dry_run=runtime.dry_run,
                         shard_size=runtime.shard_size)


def wanda(model: str | Path, calib: str | Path | None, sparsity: float, out: str | Path | None, *,
          samples: Sequence[Sample] | None = None, runtime: Runtime = Runtime(), **options: Any) -> Report:
    """`run` with the config's fields as keyword arguments: `wanda(model, calib, 0.5, out, scope="tensor")`."""
    return run(WandaConfig(sparsity=sparsity, **options), {"model": model, "calib": calib}, out, runtime,
               samples=samples)
