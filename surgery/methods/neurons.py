"""Safety-critical weights (Wei et al., ICML 2024): find them, zero them, restore them, freeze them.

Importance of every weight of the target linears on safety data and on utility data,
response tokens only (the reference's `disentangle=True`):
- Wanda: I = |W| * ||X_j|| (input channel norm over response tokens);
- SNIP: I = |W| * sum_x |dL(x)/dW| with per-sample gradients (batch 1) of the mean NLL
  on the response tokens (the reference's `wandg`).
Per weight matrix, flattened (not per row): the top-q fraction of safety scores minus
the top-p fraction of utility scores (`surgery.kernels.setdiff_mask`). Scores are always
positive importances; the reference's pitfall of dumping them with `--neg_prune` (negated)
turns "top" into "bottom" and leaves a near-empty set (see the tests).

Statistics come from one forward (Wanda) or one forward+backward per sample (SNIP) of
the whole model in fp32, with hooks on the target linears. SNIP therefore needs the
model plus fp32 gradients of the target weights in memory; the reference's layer-by-layer
loop (grads for one layer's linears at a time) computes the same gradients with less
memory and L times the passes.

A mask file is a safetensors file of bool tensors named like the weights they select,
with provenance and a per-tensor sparsity report in its metadata.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from surgery.calib.data import calibration_samples
from surgery.errors import InputNotFoundError, MismatchError, SurgeryError
from surgery.io.atomic import check_output
from surgery.io.checkpoint import Checkpoint
from surgery.io.provenance import provenance
from surgery.io.writer import write_tensors
from surgery.kernels.setdiff_mask import setdiff_mask
from surgery.kernels.wanda_score import wanda_score
from surgery.methods.config import MethodConfig, Runtime, option
from surgery.model.layout import layer_index, strip_peft_prefix
from surgery.model.load import load_causal_lm, load_tokenizer, model_directory
from surgery.pipeline.rewrite import input_records, rewrite_checkpoint
from surgery.progress import track
from surgery.report import Report, TensorChange

__all__ = ["NeuronsFindConfig", "NeuronsApplyConfig", "run_find", "run_apply", "find_neurons", "apply_neurons",
           "freeze_mask_hook", "mask_from_scores", "open_mask"]

SCORES = ("wanda", "snip")
DEFAULT_SAMPLES = 128
DEFAULT_MAX_LENGTH = 256


# --------------------------------------------------------------------------- calibration helpers


def load_model_and_samples(model_dir: str | Path, data: str | Path, n_samples: int | None, max_length: int,
                           tokenizer: Any = None) -> tuple[Any, Any, list[Any]]:
    """Load a causal LM in fp32 (no remote code) and tokenize the first `n_samples` pairs of `data`."""
    from surgery.calib.data import load_pairs, tokenize_pairs

    path = model_directory(model_dir)
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    model = load_causal_lm(path)
    samples = tokenize_pairs(tok, load_pairs(data, limit=n_samples), max_length, on_overflow="truncate")
    return model, tok, samples


def target_linears(model: torch.nn.Module, targets: Sequence[str] | None) -> dict[str, torch.nn.Linear]:
    """name -> nn.Linear of the modules to score: the given short names, else every Linear but the output head."""
    found: dict[str, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        short = name.rsplit(".", 1)[-1]
        if targets:
            if short in targets:
                found[name] = module
        elif short not in ("lm_head", "embed_out") and module is not model.get_output_embeddings():  # type: ignore[operator]
            found[name] = module
    if not found:
        raise SurgeryError(
            f"no nn.Linear module matches targets {list(targets or [])}; name short module names such as "
            "q_proj,v_proj (Conv1D layers, e.g. GPT-2, are not supported)"
        )
    return found


def input_sq_norms(model: torch.nn.Module, modules: dict[str, torch.nn.Linear], samples: Sequence[Any],
                   batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per module, sum over response tokens of x_j^2 for each input channel j (fp32), via `surgery.calib.stats`."""
    from surgery.calib.stats import collect_linear_stats

    stats = collect_linear_stats(model, samples, list(modules), token_mask="response", want=("sq_norms",),
                                 batch_size=batch_size, lora=False)
    return {n: stats[n].sq_norms.cpu() for n in modules}  # type: ignore[union-attr]


def snip_grad_sums(model: torch.nn.Module, modules: dict[str, torch.nn.Linear], samples: Sequence[Any]
                   ) -> dict[str, torch.Tensor]:
    """Per module, sum over samples of |dL/dW| (batch 1, mean NLL on the sample's response tokens)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    sums = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}
    try:
        for s in track(samples, description="snip"):
            if not bool(s.response_mask[1:].any()):
                continue  # no response token to predict (the first token has no prediction)
            ids = s.input_ids.unsqueeze(0)
            labels = ids.masked_fill(~s.response_mask.unsqueeze(0), -100)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            for n, m in modules.items():
                if m.weight.grad is not None:
                    sums[n] += m.weight.grad.float().abs()
                    m.weight.grad = None
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
    return sums


def layer_groups(modules: dict[str, torch.nn.Linear], layers_per_pass: int | None
                 ) -> list[dict[str, torch.nn.Linear]]:
    """Split modules by decoder-layer index (`surgery.model.layout.layer_index`) into groups of
    `layers_per_pass` layers; None or 0 gives one group of everything."""
    if not layers_per_pass:
        return [modules]
    index = {n: (-1 if (i := layer_index(n)) is None else i) for n in modules}
    layers = sorted(set(index.values()))
    groups = []
    for i in range(0, len(layers), layers_per_pass):
        chosen = set(layers[i:i + layers_per_pass])
        groups.append({n: m for n, m in modules.items() if index[n] in chosen})
    return groups


def importance(model: torch.nn.Module, modules: dict[str, torch.nn.Linear], samples: Sequence[Any],
               score: str, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """fp32 importance of every weight of `modules` on `samples` (Wanda or SNIP), keyed by module name."""
    if score == "wanda":
        norms = input_sq_norms(model, modules, samples, batch_size)
        return {n: wanda_score(m.weight.detach(), norms[n]) for n, m in modules.items()}
    if score == "snip":
        grads = snip_grad_sums(model, modules, samples)
        return {n: m.weight.detach().float().abs() * grads[n] for n, m in modules.items()}
    raise SurgeryError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")


# --------------------------------------------------------------------------- find


@dataclass(frozen=True, kw_only=True)
class NeuronsFindConfig(MethodConfig):
    """Options of `neurons find`: Wei et al.'s S(q) minus U(p), response tokens only."""

    method = "neurons-find"
    p: float = option(help="Top fraction of utility importance removed (per tensor).", low=0.0, high=1.0)
    q: float = option(help="Top fraction of safety importance kept (per tensor).", low=0.0, high=1.0)
    score: Literal["wanda", "snip"] = option("wanda", "wanda: |W|·||X|| on response tokens; snip: |W ⊙ Σ|∇W L||.")
    targets: tuple[str, ...] = option((), "Short module names, comma-separated (default: every Linear but the head).")
    num_samples: int | None = option(DEFAULT_SAMPLES, "First N pairs of each file.", low=1, flag="--samples")
    max_length: int = option(DEFAULT_MAX_LENGTH, "Tokens per sample; longer pairs are cut.", low=1)
    layers_per_pass: int = option(0, "SNIP: gradients for this many decoder layers per pass (0: all at once; 1: "
                                     "the reference's layer-by-layer loop, least memory).", low=0)


def _checkpoint_key(name: str, ckpt: Checkpoint) -> str:
    from surgery.io.adapter import base_key_candidates

    names = ckpt.names()
    for cand in base_key_candidates(name, names):
        if cand in ckpt:
            return cand
    raise MismatchError(f"model parameter {name} has no tensor in {ckpt.directory}; is the checkpoint complete?")


def mask_from_scores(safety: dict[str, torch.Tensor], utility: dict[str, torch.Tensor], p: float, q: float
                     ) -> dict[str, torch.Tensor]:
    """Per tensor (flattened): top-q of `safety` minus top-p of `utility`."""
    return {n: setdiff_mask(safety[n], utility[n], p, q) for n in safety}


def run_find(config: NeuronsFindConfig, inputs: Mapping[str, Any], out: str | Path,
             runtime: Runtime = Runtime()) -> Report:
    """Find the safety-critical weights of `inputs["model"]` and write their mask to `out` (one safetensors file).

    Per tensor: the top-`q` fraction of importance on `inputs["safety"]` minus the top-`p`
    fraction on `inputs["utility"]`. A mask is one file, so the report (per tensor: entries
    selected; metrics: sparsity) goes into its metadata as `surgery.report` (without wall
    time, so equal inputs give equal bytes) and is returned. SNIP with `layers_per_pass=k`:
    gradients for k decoder layers at a time (same result, less memory, more passes).
    """
    started = time.perf_counter()
    model_dir, safety, utility = inputs["model"], inputs["safety"], inputs["utility"]
    out = Path(out)
    check_output(out, runtime.force, inputs)
    ckpt = Checkpoint.open(model_dir)
    model, tok, safety_samples = load_model_and_samples(model_dir, safety, config.num_samples, config.max_length)
    utility_samples = calibration_samples(model_dir, utility, num_samples=config.num_samples,
                                          max_length=config.max_length, on_overflow="truncate", tokenizer=tok)
    modules = target_linears(model, list(config.targets) or None)
    keys = {n: _checkpoint_key(f"{n}.weight", ckpt) for n in modules}
    masks: dict[str, torch.Tensor] = {}
    per_pass = (config.layers_per_pass or None) if config.score == "snip" else None
    for group in layer_groups(modules, per_pass):
        s_scores = importance(model, group, safety_samples, config.score, runtime.batch_size)
        u_scores = importance(model, group, utility_samples, config.score, runtime.batch_size)
        masks.update(mask_from_scores(s_scores, u_scores, config.p, config.q))
        del s_scores, u_scores
    report = Report("neurons-find", {**config.to_dict(), "response_tokens_only": True})
    report.inputs = input_records({"model": ckpt, "safety": Path(safety), "utility": Path(utility)})
    report.out = str(out)
    tensors: dict[str, torch.Tensor] = {}
    for n in modules:
        m = masks[n].contiguous()
        tensors[keys[n]] = m
        report.tensors.append(TensorChange(keys[n], list(m.shape), int(m.sum()), 0))
    numel = sum(t.numel for t in report.tensors)
    report.metrics.update(selected=report.selected, numel=numel, sparsity=report.selected / numel if numel else 0.0,
                          tensor_sparsity={t.name: t.selected / t.numel if t.numel else 0.0 for t in report.tensors})
    meta = provenance(report.method, report.config, {"model": ckpt, "safety": Path(safety), "utility": Path(utility)})
    meta["surgery.kind"] = "mask"
    meta["surgery.report"] = json.dumps({k: v for k, v in report.to_dict().items() if k != "seconds"}, sort_keys=True)
    write_tensors(out, tensors, metadata=meta, force=runtime.force, inputs=inputs)
    report.seconds["total"] = time.perf_counter() - started
    return report


def find_neurons(model_dir: str | Path, safety: str | Path, utility: str | Path, out: str | Path, *,
                 runtime: Runtime = Runtime(), **options: Any) -> Report:
    """`run_find` with the config's fields as keyword arguments: `find_neurons(m, s, u, out, p=0.1, q=0.2)`."""
    return run_find(NeuronsFindConfig(**options), {"model": model_dir, "safety": safety, "utility": utility}, out,
                    runtime)


# --------------------------------------------------------------------------- apply


@dataclass(frozen=True, kw_only=True)
class NeuronsApplyConfig(MethodConfig):
    """Options of `neurons apply`."""

    method = "neurons-apply"
    mode: Literal["zero", "restore"] = option(
        help="zero: remove the weights (an attack); restore: copy them from the aligned model (a repair).")


def open_mask(path: str | Path) -> Checkpoint:
    """Open a mask file and check that it holds only bool tensors."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"mask {path} does not exist; create one with `surgery neurons find`")
    mask = Checkpoint.open(path)
    bad = [i.name for i in mask.infos() if i.dtype != "BOOL"]
    if bad:
        raise SurgeryError(f"{path} is not a mask file: {bad[0]} is {mask.info(bad[0]).dtype}, not BOOL")
    return mask


def run_apply(config: NeuronsApplyConfig, inputs: Mapping[str, Any], out: str | Path,
              runtime: Runtime = Runtime()) -> Report:
    """Stream `inputs["model"]` into `out`, zeroing the weights of `inputs["mask"]` (`mode="zero"`, the
    brittleness attack) or setting them to `inputs["aligned"]`'s values (`mode="restore"`, the repair)."""
    started = time.perf_counter()
    model_dir, mask, aligned = inputs["model"], inputs["mask"], inputs.get("aligned")
    mode = config.mode
    out = Path(out)
    check_output(out, runtime.force, inputs)
    if mode == "restore" and aligned is None:
        raise SurgeryError("mode restore needs the aligned model (aligned), the checkpoint to copy the weights from")
    if mode == "zero" and aligned is not None:
        raise SurgeryError("the aligned model is only used with mode restore; drop it or use mode restore")
    ckpt = Checkpoint.open(model_dir, allow_pickle=runtime.allow_pickle)
    masks = open_mask(mask)
    ref = Checkpoint.open(aligned, allow_pickle=runtime.allow_pickle) if aligned is not None else None
    for name in masks.names():
        if name not in ckpt:
            raise MismatchError(f"mask tensor {name} is not in {model_dir}; use the mask made for this model")
        if tuple(masks.info(name).shape) != tuple(ckpt.info(name).shape):
            raise MismatchError(f"{name}: mask shape {list(masks.info(name).shape)} but the model has "
                                f"{list(ckpt.info(name).shape)}")
        if ref is not None and (name not in ref or tuple(ref.info(name).shape) != tuple(ckpt.info(name).shape)):
            raise MismatchError(f"{name} is missing or shaped differently in {aligned}; pass the matching aligned model")

    def edit(name: str, w: torch.Tensor) -> tuple[torch.Tensor, int]:
        m = masks.get(name)
        w = w.clone()
        w[m] = 0 if ref is None else ref.get(name)[m].to(w.dtype)
        return w, int(m.sum())

    report = Report("neurons-apply", config.to_dict())
    report.metrics.update(tensors=len(ckpt.names()), masked_tensors=len(masks.names()))
    extra: dict[str, Any] = {"mask": Path(mask)}
    if ref is not None:
        extra["aligned"] = ref
    return rewrite_checkpoint(ckpt, out, report, edit=edit, names=set(masks.names()), inputs=extra,
                              shard_size=runtime.shard_size, force=runtime.force, description=f"neurons {mode}",
                              started=started)


def apply_neurons(model_dir: str | Path, mask: str | Path, out: str | Path, *, mode: str,
                  aligned: str | Path | None = None, runtime: Runtime = Runtime()) -> Report:
    """`run_apply` with the config's field as a keyword: `apply_neurons(m, mask, out, mode="zero")`."""
    inputs = {"model": model_dir, "mask": mask, **({"aligned": aligned} if aligned is not None else {})}
    return run_apply(NeuronsApplyConfig(mode=mode), inputs, out, runtime)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- freeze during fine-tuning


def _canonical(param_name: str) -> str:
    """A model parameter's name as a checkpoint names it (peft wrappers removed)."""
    return strip_peft_prefix(param_name).replace(".base_layer.", ".")


def freeze_mask_hook(mask_path: str | Path) -> Callable[[torch.nn.Module], None]:
    """An `after_backward(model)` hook that zeroes the gradients of the masked weights.

    For full fine-tuning (`finetune(..., full=True)`): with LoRA the base weights are
    frozen anyway and the update B A moves every weight, so the hook refuses a model
    whose masked parameters take no gradient. Zero gradients keep AdamW's moments at 0,
    so the masked weights do not move unless weight decay is on (decay still shrinks them).
    """
    masks_file = open_mask(mask_path)
    masks = {n: masks_file.get(n) for n in masks_file.names()}
    bound: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    state = {"ready": False}

    def bind(model: torch.nn.Module) -> None:
        hits = 0
        for name, param in model.named_parameters():
            key = _canonical(name)
            if key not in masks:
                key = next((k for k in masks if k.endswith("." + key) or key.endswith("." + k)), "")
            if not key:
                continue
            hits += 1
            if tuple(param.shape) != tuple(masks[key].shape):
                raise MismatchError(f"{name}: mask shape {list(masks[key].shape)} but the parameter is {list(param.shape)}")
            if param.requires_grad:
                bound.append((param, masks[key].to(param.device)))
        if hits == 0:
            raise MismatchError(f"no parameter of the model matches a tensor of the mask {mask_path}")
        if not bound:
            raise SurgeryError(
                "the masked weights take no gradient (LoRA fine-tuning freezes them already); "
                "freezing a mask needs full fine-tuning (--full)"
            )
        state["ready"] = True

    def after_backward(model: torch.nn.Module) -> None:
        if not state["ready"]:
            bind(model)
        for param, m in bound:
            if param.grad is not None:
                if m.device != param.grad.device:
                    m = m.to(param.grad.device)
                param.grad.masked_fill_(m, 0)

    return after_backward
