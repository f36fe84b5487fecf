"""Antidote (Huang et al., arXiv 2408.09600): prune the weights harmful data relies on most.

After harmful fine-tuning, Antidote computes Wanda scores |W_ij|·||X_j|| on harmful
calibration data (prompt + harmful response) and zeroes, in every output row, the
*highest*-scoring share `ratio` of the weights (Wanda zeroes the lowest). The count per
row is Antidote's own, `n - int(n · (1 - ratio))` (its mask keeps the lowest
`int(n · (1 - ratio))`), which can exceed `int(n · ratio)` by one.

Three modes:
- `adapter=`: the published algorithm. The fine-tuning LoRA stays unmerged on `model`;
  each LoRA matrix is scored with its own input (lora_A with the layer input x, lora_B
  with A·x) and pruned; base weights are untouched; the result is a peft adapter.
- merged model: the same rule on the decoder layers' Linear weights (`targets`).
- `aligned=`: delta-aware variant for a merged model: score only the fine-tuning delta,
  |W - W_aligned|·||X||, and reset the selected entries to their aligned values.
All modes calibrate layer by layer (each layer's statistics from its unmodified form,
then the modified layer re-run for the next layer, as the reference does) and count
all tokens by default: the published code feeds whole sequences with no prompt masking.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from surgery.calib.data import Sample, calibration_samples
from surgery.calib.layerwise import LayerContext, calibrate_layerwise
from surgery.calib.stats import LinearStats
from surgery.errors import MismatchError, SurgeryError
from surgery.io.adapter import LoraAdapter, rewrite_adapter
from surgery.io.atomic import check_output
from surgery.io.checkpoint import Checkpoint
from surgery.io.provenance import provenance
from surgery.kernels import topk_mask, wanda_prune_count_
from surgery.kernels.wanda_score import wanda_score
from surgery.methods.config import CalibrationConfig, Runtime, option
from surgery.model.load import default_device
from surgery.pipeline.layerwise import layer_surgery, sync_device
from surgery.pipeline.rewrite import input_records
from surgery.report import REPORT_FILE, Report, TensorChange

__all__ = ["AntidoteConfig", "run", "antidote", "antidote_count", "antidote_mask", "antidote_prune_",
           "DEFAULT_RATIO"]

DEFAULT_RATIO = 0.1  # the reference's argparse default; its scripts use 0.1 (SST2), 0.05, 0.02, 0.01
_ROW_BLOCK = 1 << 20  # elements per row block of the delta-aware edit's temporaries


@dataclass(frozen=True, kw_only=True)
class AntidoteConfig(CalibrationConfig):
    """Antidote's options; defaults are the reference's (ratio 0.1 per row, whole sequences counted)."""

    method = "antidote"
    ratio: float = option(DEFAULT_RATIO, "Share of each row to prune (the reference's scripts use 0.1, 0.05, "
                                         "0.02, 0.01).", low=0.0, high=1.0)
    scope: Literal["row", "tensor"] = option(
        "row", "Select the top share in each output row (reference) or over the whole matrix.")
    targets: tuple[str, ...] = option((), "Modules (q_proj,self_attn.v_proj, globs, re:REGEX); default every "
                                          "LoRA module or every decoder Linear.")


def antidote_count(n: int, ratio: float) -> int:
    """Entries Antidote zeroes in a group of n: all but the `int(n·(1-ratio))` lowest scores."""
    return n - int(n * (1.0 - ratio))


def _k(shape: torch.Size, ratio: float, scope: str) -> tuple[int, int]:
    """(k per group, number of groups) for a 2-D weight."""
    if scope == "row":
        return antidote_count(shape[1], ratio), shape[0]
    return antidote_count(shape[0] * shape[1], ratio), 1


def antidote_prune_(W: torch.Tensor, sq_norms: torch.Tensor, ratio: float, scope: str = "row") -> int:
    """Zero in place the highest-scoring |W|·||X|| share `ratio` of W per row (or tensor);
    returns how many nonzero weights became zero."""
    k, _ = _k(W.shape, ratio, scope)
    return wanda_prune_count_(W, sq_norms, ratio, largest=True, scope=scope, k=k)


def antidote_mask(delta: torch.Tensor, sq_norms: torch.Tensor, ratio: float, scope: str = "row") -> torch.Tensor:
    """Bool mask of the highest |delta|·||X|| share `ratio` per row (or tensor): the delta-aware selection."""
    k, _ = _k(delta.shape, ratio, scope)
    return topk_mask(wanda_score(delta, sq_norms), ratio, largest=True, scope=scope, k=k)


def _prune_edit(ratio: float, scope: str):
    def edit(name: str, W: torch.Tensor, st: LinearStats) -> TensorChange:
        k, groups = _k(W.shape, ratio, scope)
        assert st.sq_norms is not None  # calibration collects sq_norms by default
        changed = antidote_prune_(W, st.sq_norms.to(W.device), ratio, scope)
        return TensorChange(name, list(W.shape), k * groups, changed)

    return edit


def _restore_edit(ratio: float, scope: str, aligned: Checkpoint):
    def edit(name: str, W: torch.Tensor, st: LinearStats) -> TensorChange:
        if name not in aligned:
            raise MismatchError(f"{name} is not in the aligned checkpoint {aligned.path}; give the model it was "
                                "fine-tuned from")
        if tuple(aligned.info(name).shape) != tuple(W.shape):
            raise MismatchError(f"{name}: aligned shape {list(aligned.info(name).shape)} differs from {list(W.shape)}")
        W_al = aligned.get(name).to(W.device)  # stored dtype: no full-size fp32 copy
        assert st.sq_norms is not None  # calibration collects sq_norms by default
        s = st.sq_norms.to(W.device)
        k, groups = _k(W.shape, ratio, scope)
        if scope != "row":  # one threshold over the whole tensor
            W_al = W_al.to(torch.float32)
            mask = antidote_mask(W - W_al, s, ratio, scope)
            changed = int((mask & (W != W_al)).sum())
            torch.where(mask, W_al, W, out=W)
            return TensorChange(name, list(W.shape), k * groups, changed)
        # Per row, rows are independent: work in row blocks so the fp32 delta, score and mask
        # temporaries stay a small fraction of the tensor. The aligned values are cast per block
        # (exact), so the result is the same as on the whole tensor.
        changed = 0
        step = max(1, _ROW_BLOCK // max(W.shape[1], 1))
        for r0 in range(0, W.shape[0], step):
            w, al = W[r0 : r0 + step], W_al[r0 : r0 + step].to(torch.float32)
            mask = antidote_mask(w - al, s, ratio, scope)
            changed += int((mask & (w != al)).sum())
            torch.where(mask, al, w, out=w)
        return TensorChange(name, list(W.shape), k * groups, changed)

    return edit


def run(config: AntidoteConfig, inputs: Mapping[str, Any], out: str | Path | None,
        runtime: Runtime = Runtime(), *, samples: Sequence[Sample] | None = None) -> Report:
    """Run Antidote on `inputs["model"]` (+ `adapter`) with the harmful pairs of `inputs["calib"]`.

    With `adapter`, prunes the adapter's lora_A/lora_B and writes an adapter; else edits the
    merged model's decoder Linears (zeroing, or with `aligned` resetting to aligned values)
    and writes a model. The report (per-tensor counts) goes into `out` as `surgery_report.json`.
    `samples` (pre-tokenised) replaces reading `calib`.
    """
    model, calib = inputs["model"], inputs.get("calib")
    adapter, aligned = inputs.get("adapter"), inputs.get("aligned")
    if adapter is not None and aligned is not None:
        raise SurgeryError("aligned is for a merged model; with an adapter the LoRA itself is the fine-tuning delta")
    if not runtime.dry_run:
        if out is None:
            raise SurgeryError("give an output path (-o) or ask for a dry run")
        check_output(out, runtime.force, inputs)
    if samples is None:
        if calib is None:
            raise SurgeryError("antidote needs harmful calibration pairs (calib)")
        samples = calibration_samples(model, calib, num_samples=config.num_samples, max_length=config.max_length,
                                      chat_template=config.chat_template)
    mode = "adapter" if adapter is not None else ("delta" if aligned is not None else "merged")
    report = Report(f"antidote-{mode}", {**config.to_dict(), "mode": mode, "count": "n - int(n*(1-ratio))"})
    data: dict[str, Any] = {"calib": Path(calib)} if calib is not None else {}
    targets = list(config.targets) or None
    if adapter is not None:
        return _antidote_adapter(model, adapter, samples, config, out, report, runtime, inputs=data)
    if aligned is not None:
        al = Checkpoint.open(aligned)
        edit = _restore_edit(config.ratio, config.scope, al)
        data["aligned"] = al
    else:
        edit = _prune_edit(config.ratio, config.scope)
    return layer_surgery(model, samples, edit, out, report, inputs=data, targets=targets, token_mask=config.tokens,
                         batch_size=runtime.batch_size, device=default_device(runtime.device), force=runtime.force,
                         dry_run=runtime.dry_run, shard_size=runtime.shard_size)


def antidote(model: str | Path, calib: str | Path | None, ratio: float = DEFAULT_RATIO,
             out: str | Path | None = None, *, adapter: str | Path | None = None, aligned: str | Path | None = None,
             samples: Sequence[Sample] | None = None, runtime: Runtime = Runtime(), **options: Any) -> Report:
    """`run` with the config's fields as keyword arguments: `antidote(model, calib, 0.1, out, adapter=A)`."""
    inputs = {"model": model, "calib": calib, "adapter": adapter, "aligned": aligned}
    return run(AntidoteConfig(ratio=ratio, **options), {k: v for k, v in inputs.items() if v is not None}, out,
               runtime, samples=samples)


def _antidote_adapter(
    model: str | Path, adapter_dir: str | Path, samples: Sequence[Sample], config: AntidoteConfig,
    out: str | Path | None, report: Report, runtime: Runtime, *, inputs: dict[str, Any],
) -> Report:
    """The published algorithm: prune the unmerged LoRA's A and B, each scored with its own input."""
    ratio, scope, tokens = config.ratio, config.scope, config.tokens
    targets = list(config.targets) or None
    ckpt = Checkpoint.open(model)
    adapter = LoraAdapter.open(adapter_dir)
    modules, _ = adapter.match(ckpt)
    paths = {base_key[: -len(".weight")]: m for base_key, m in modules.items()
             if m.kind == "linear" and base_key.endswith(".weight")}
    from surgery.calib.stats import match_target

    selected = sorted(p for p in paths if targets is None or match_target(p, targets))
    if not selected:
        raise SurgeryError(f"no LoRA module of {adapter_dir} matches the targets {list(targets or [])}; check --targets")
    dev = default_device(runtime.device)
    dry_run = runtime.dry_run
    report.inputs = input_records({"model": ckpt, "adapter": adapter, **inputs})
    report.out = None if dry_run else str(out)
    report.dry_run = dry_run
    report.metrics["samples"] = len(samples)
    report.metrics["tokens"] = (sum(len(s) for s in samples) if tokens == "all"
                                else sum(s.num_response_tokens for s in samples))
    new: dict[str, torch.Tensor] = {}
    timings: dict[str, float] = {}
    edit_seconds = 0.0

    def on_layer(ctx: LayerContext) -> None:
        nonlocal edit_seconds
        for path in selected:
            if path not in ctx.lora:
                continue
            m = paths[path]
            wrapper = ctx.lora[path]
            sync_device()
            t0 = time.perf_counter()
            for part, key in (("lora_A", m.a_key), ("lora_B", m.b_key)):
                W = getattr(wrapper, part).weight.data
                st = ctx.stats[f"{path}.{part}"]
                k, groups = _k(W.shape, ratio, scope)
                assert st.sq_norms is not None  # calibration collects sq_norms by default
                changed = antidote_prune_(W, st.sq_norms.to(W.device), ratio, scope)
                report.tensors.append(TensorChange(key, list(W.shape), k * groups, changed))
                new[key] = W.detach().to("cpu", adapter.info(key).torch_dtype).clone()
            sync_device()
            edit_seconds += time.perf_counter() - t0

    start = time.perf_counter()
    calibrate_layerwise(ckpt, samples, selected, token_mask=tokens, batch_size=runtime.batch_size, device=dev,
                        adapter=adapter, on_layer=on_layer, keep_stats=False, timings=timings,
                        description="antidote")
    missing = [p for p in selected if paths[p].a_key not in new]
    if missing:
        raise SurgeryError(f"LoRA module {missing[0]} is not inside a decoder layer; only decoder-layer LoRA is supported")
    t0 = time.perf_counter()
    if not dry_run and out is not None:  # out is None only for a dry run (checked by the caller)
        meta = provenance(report.method, report.config, {"model": ckpt, "adapter": adapter, **inputs})
        report.seconds = _seconds(timings, edit_seconds, time.perf_counter() - t0, start)
        rewrite_adapter(adapter, out, new, meta, runtime.force, extra_files={REPORT_FILE: report.to_json()},
                        inputs={"model": model, "adapter": adapter_dir, **inputs})
    report.seconds = _seconds(timings, edit_seconds, time.perf_counter() - t0, start)
    return report


def _seconds(timings: dict[str, float], edit: float, write: float, start: float) -> dict[str, float]:
    return {"setup": timings.get("setup", 0.0), "calibration": timings.get("forward", 0.0), "edit": edit,
            "io": timings.get("read", 0.0) + write, "total": time.perf_counter() - start}


