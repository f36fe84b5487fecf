"""SaLoRA (Li et al., ICLR 2025): LoRA fine-tuning that cannot move the safety output directions.

Fit: per target module, the features Y_s = X_s W^T of the aligned model on safety data
(response tokens only, as the reference's ActLinear with `disentangle`) and their top-R
left singular directions in output space, U [d_out, R]; the fixed module is
C = I - U U^T, stored as U. U spans the top-R eigenvectors of the output covariance
Y_s^T Y_s (what `surgery.calib.stats` accumulates, so Y never has to be held):
- `solver="eigh"`: exact symmetric eigendecomposition (fp64) of Y^T Y;
- `solver="randomized"`: seeded randomized subspace iteration on Y^T Y with R + 8
  columns and `niter`=30 iterations, then Rayleigh-Ritz (the reference runs
  `torch.svd_lowrank(Y, q=32, niter=30)`, the same power method on Y's Gram matrix,
  unseeded and without oversampling);
- `solver="auto"` (default): eigh when d_out <= 4096 (exact and cheap at that size),
  randomized above.
Signs and rotations of U do not matter: only the subspace enters C.

Apply: fold an existing adapter, B' = C B = B - U (U^T B) (the reference's
`process_lora.py`), so h = W x + s C B A x with a plain peft adapter.

Fine-tune: `salora_prepare(module_path)` returns a `prepare_model` hook for
`surgery.methods.finetune.train_loop`/`finetune`: every peft LoRA layer with a fitted U
gets a forward hook on its lora_B that projects the LoRA output with
`surgery.kernels.salora_project` (h = W x + s C B A x, autograd through C), and a
state-dict hook that writes C B instead of B, so `save_pretrained` produces a plain peft
adapter (folding is idempotent, C C = C, so reloading and training on is consistent).
The paper's task-specific initialisation (PiSSA-style W_res = W - C B0 A0) is an option
(`fit_salora(task=...)` + `salora_prepare(..., task_init=True)`); its saved adapter is a
plain peft adapter of rank 2r on the protected modules (see `SaloraHook`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from surgery.calib.data import calibration_samples
from surgery.errors import InputNotFoundError, MismatchError, SurgeryError
from surgery.io.adapter import LoraAdapter, rewrite_adapter
from surgery.io.atomic import check_output
from surgery.io.checkpoint import Checkpoint
from surgery.io.provenance import provenance
from surgery.io.writer import write_tensors
from surgery.kernels.salora_project import salora_fold, salora_project
from surgery.methods.config import ConfigError, MethodConfig, Runtime, option
from surgery.model.layout import strip_peft_prefix
from surgery.model.load import load_causal_lm, load_tokenizer, model_directory
from surgery.pipeline.rewrite import input_records
from surgery.progress import track
from surgery.report import REPORT_FILE, Report, TensorChange

__all__ = ["SaloraFitConfig", "SaloraApplyConfig", "run_fit", "run_apply", "fit_salora", "apply_salora",
           "salora_prepare", "salora_targets", "load_module", "load_task_subspaces", "top_eigenvectors", "SaloraHook"]

DEFAULT_TARGETS = ("q_proj", "v_proj")
DEFAULT_SAMPLES = 128
DEFAULT_MAX_LENGTH = 256
DEFAULT_NITER = 30
DEFAULT_OVERSAMPLE = 8
EIGH_MAX_DIM = 4096
SOLVERS = ("auto", "eigh", "randomized")
KIND = "salora-module"
U_SUFFIX = ".salora_U"
VT_SUFFIX = ".salora_Vt"
DEFAULT_TASK_RANK = 32


# --------------------------------------------------------------------------- the subspace


def top_eigenvectors(G: torch.Tensor, rank: int, solver: str = "auto", niter: int = DEFAULT_NITER,
                     seed: int = 0, oversample: int = DEFAULT_OVERSAMPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` eigenpairs of a symmetric PSD matrix G [d, d]: (U [d, rank] fp32, eigenvalues fp64, descending).

    eigh: exact. randomized: Z = G Omega with k = rank + oversample Gaussian columns
    (from `seed`), `niter` times Q = orth(Z), Z = G Q, then the Rayleigh-Ritz step on
    span(Z) and the top `rank` Ritz vectors. Oversampling (absent in the reference's
    `svd_lowrank(q=32)`) makes the result converge where eigenvalues near rank R are close.
    """
    d = G.shape[0]
    if not 1 <= rank <= d:
        raise ConfigError(f"salora-fit: rank must be between 1 and the output dimension {d}, got {rank}")
    if solver == "auto":
        solver = "eigh" if d <= EIGH_MAX_DIM else "randomized"
    Gd = G.double()
    Gd = (Gd + Gd.T) / 2
    if solver == "eigh":
        vals, vecs = torch.linalg.eigh(Gd)
        order = torch.argsort(vals, descending=True, stable=True)[:rank]
        return vecs[:, order].float().contiguous(), vals[order]
    if solver != "randomized":
        raise SurgeryError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k = min(d, rank + max(0, oversample))
    omega = torch.randn(d, k, generator=gen, dtype=torch.float64).to(Gd.device)
    Z = Gd @ omega
    for _ in range(niter):
        Q, _ = torch.linalg.qr(Z)
        Z = Gd @ Q
    Q, _ = torch.linalg.qr(Z)
    vals, vecs = torch.linalg.eigh(Q.T @ Gd @ Q)
    order = torch.argsort(vals, descending=True, stable=True)[:rank]
    return (Q @ vecs[:, order]).float().contiguous(), vals[order]


@dataclass
class ModuleFit:
    """One fitted module: its U's shape and how much of the safety output energy U holds."""

    module: str
    d_out: int
    rank: int
    tokens: int
    energy: float  # sum of the top-R eigenvalues / trace of Y^T Y


@dataclass(frozen=True, kw_only=True)
class SaloraFitConfig(MethodConfig):
    """Options of `salora fit`: the rank and solver of U per module, fitted on response tokens."""

    method = "salora-fit"
    rank: int = option(help="Safety directions removed per module (the paper: 32).", low=1)
    targets: tuple[str, ...] = option(DEFAULT_TARGETS, "Short module names to fit (use the same as the LoRA's "
                                                       "targets).")
    num_samples: int | None = option(DEFAULT_SAMPLES, "First N pairs of the file.", low=1, flag="--samples")
    max_length: int = option(DEFAULT_MAX_LENGTH, "Tokens per sample; longer pairs are cut.", low=1)
    solver: Literal["auto", "eigh", "randomized"] = option(
        "auto", "eigh: exact eigenvectors of Y^T Y; randomized: seeded subspace iteration; auto: eigh up to "
                "d_out=4096.")
    niter: int = option(DEFAULT_NITER, "Randomized solver iterations.", low=0)
    seed: int = option(0, "Seed of the randomized solver.")
    task_rank: int = option(DEFAULT_TASK_RANK, "Task output directions kept per module (the paper's ds; used with "
                                               "task data).", low=1)

    def validate(self) -> None:
        if not self.targets:
            raise ConfigError("salora-fit: targets must name at least one module")


def _load_model_and_samples(model_dir: str | Path, data: str | Path, config: SaloraFitConfig
                            ) -> tuple[Any, Any, list[Any]]:
    """The model in fp32 (no remote code), its tokenizer, and the first pairs of `data` tokenized."""
    path = model_directory(model_dir)
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    samples = calibration_samples(path, data, num_samples=config.num_samples, max_length=config.max_length,
                                  on_overflow="truncate", tokenizer=tok)
    return model, tok, samples


def run_fit(config: SaloraFitConfig, inputs: Mapping[str, Any], out: str | Path,
            runtime: Runtime = Runtime()) -> Report:
    """Fit SaLoRA's fixed safety module on `inputs["model"]` (the aligned model) with `inputs["safety"]`.

    One whole-model forward in fp32 over the first `num_samples` pairs, response tokens
    only; Y^T Y per target Linear via `surgery.calib.stats`; the top-`rank` output
    directions per module. Output: one safetensors file `{module}.salora_U` -> [d_out, rank].
    With `inputs["task"]`, also the top-`task_rank` output directions on it,
    `{module}.salora_Vt`, for the paper's task-specific initialisation. A module is one
    file, so the report (metrics: per-module energy) goes into its metadata as
    `surgery.report` (without wall time) and is returned.
    """
    from surgery.calib.stats import collect_linear_stats

    started = time.perf_counter()
    aligned, safety, task = inputs["model"], inputs["safety"], inputs.get("task")
    out = Path(out)
    check_output(out, runtime.force, inputs)
    targets = list(config.targets)
    rank, solver = config.rank, config.solver
    ckpt = Checkpoint.open(aligned)
    model, tok, samples = _load_model_and_samples(aligned, safety, config)
    stats = collect_linear_stats(model, samples, targets, token_mask="response", want=("yty",),
                                 batch_size=runtime.batch_size, lora=False)
    task_stats = {}
    if task is not None:
        task_samples = calibration_samples(aligned, task, num_samples=config.num_samples,
                                           max_length=config.max_length, on_overflow="truncate", tokenizer=tok)
        task_stats = collect_linear_stats(model, task_samples, targets, token_mask="response", want=("yty",),
                                          batch_size=runtime.batch_size, lora=False)
    modules: list[ModuleFit] = []
    tensors: dict[str, torch.Tensor] = {}
    for name in track(sorted(stats), description="salora fit"):
        st = stats[name]
        if st.yty is None or st.tokens == 0:
            raise SurgeryError(f"{name} saw no response tokens; check the safety data and max_length")
        U, vals = top_eigenvectors(st.yty, rank, solver, config.niter, config.seed)
        trace = float(torch.trace(st.yty.double()))
        energy = float(vals.clamp_min(0).sum()) / trace if trace > 0 else 0.0
        tensors[name + U_SUFFIX] = U.cpu()
        if task is not None:
            tt = task_stats[name]
            if tt.yty is None or tt.tokens == 0:
                raise SurgeryError(f"{name} saw no response tokens of the task data; check the task file")
            tensors[name + VT_SUFFIX] = top_eigenvectors(tt.yty, min(config.task_rank, tt.yty.shape[0]), solver,
                                                         config.niter, config.seed)[0].cpu()
        modules.append(ModuleFit(name, st.yty.shape[0], rank, st.tokens, energy))
    params = {**config.to_dict(), "oversample": DEFAULT_OVERSAMPLE, "response_tokens_only": True}
    if task is None:
        params["task_rank"] = None
    report = Report("salora-fit", params)
    records: dict[str, Any] = {"model": ckpt, "safety": Path(safety)}
    if task is not None:
        records["task"] = Path(task)
    report.inputs = input_records(records)
    report.out = str(out)
    report.metrics.update(rank=rank, solver=solver, modules=[asdict(m) for m in modules])
    meta = provenance(report.method, report.config, records)
    meta["surgery.kind"] = KIND
    meta["surgery.salora"] = "C = I - U U^T per module; U = top output directions of the module on safety data"
    meta["surgery.report"] = json.dumps({k: v for k, v in report.to_dict().items() if k != "seconds"}, sort_keys=True)
    write_tensors(out, tensors, metadata=meta, force=runtime.force, inputs=inputs)
    report.seconds["total"] = time.perf_counter() - started
    return report


def fit_salora(aligned: str | Path, safety: str | Path, out: str | Path, *, task: str | Path | None = None,
               runtime: Runtime = Runtime(), **options: Any) -> Report:
    """`run_fit` with the config's fields as keyword arguments: `fit_salora(aligned, safety, out, rank=32)`."""
    inputs = {"model": aligned, "safety": safety, **({"task": task} if task is not None else {})}
    return run_fit(SaloraFitConfig(**options), inputs, out, runtime)


def load_module(path: str | Path) -> dict[str, torch.Tensor]:
    """module path -> U [d_out, R] (fp32) from a file written by `fit_salora`."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"SaLoRA module {path} does not exist; create it with `surgery salora fit`")
    ckpt = Checkpoint.open(path)
    if ckpt.metadata().get("surgery.kind") != KIND:
        raise SurgeryError(f"{path} is not a SaLoRA module file (made by `surgery salora fit`)")
    return _read_suffix(ckpt, path, U_SUFFIX)


def load_task_subspaces(path: str | Path) -> dict[str, torch.Tensor]:
    """module path -> V_t [d_out, ds] (task output directions), empty if fitted without --task."""
    return _read_suffix(Checkpoint.open(path), Path(path), VT_SUFFIX)


def _read_suffix(ckpt: Checkpoint, path: Path, suffix: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in ckpt.names():
        if not name.endswith((U_SUFFIX, VT_SUFFIX)):
            raise SurgeryError(f"{path}: unexpected tensor {name}; re-create it with `surgery salora fit`")
        if not name.endswith(suffix):
            continue
        t = ckpt.get(name).float()
        if t.dim() != 2:
            raise SurgeryError(f"{path}: {name} is not a matrix")
        out[name[: -len(suffix)]] = t
    return out


# --------------------------------------------------------------------------- apply (fold into an adapter)


@dataclass(frozen=True, kw_only=True)
class SaloraApplyConfig(MethodConfig):
    """`salora apply` has no options: the module file says everything (B' = C B per fitted module)."""

    method = "salora-apply"


def run_apply(config: SaloraApplyConfig, inputs: Mapping[str, Any], out: str | Path,
              runtime: Runtime = Runtime()) -> Report:
    """Fold C = I - U U^T into every lora_B of `inputs["adapter"]` with a fitted U in `inputs["module"]`
    and write the adapter to `out` atomically, with `surgery_report.json` (metrics: folded, unprotected)."""
    started = time.perf_counter()
    adapter, module = inputs["adapter"], inputs["module"]
    out = Path(out)
    check_output(out, runtime.force, inputs)
    lora = LoraAdapter.open(adapter, allow_pickle=runtime.allow_pickle)
    Us = load_module(module)
    report = Report("salora-apply", config.to_dict())
    folded: list[str] = []
    unprotected: list[str] = []
    new_b: dict[str, torch.Tensor] = {}
    for path, m in sorted(lora.modules.items()):
        U = Us.get(path)
        if U is None:
            unprotected.append(path)
            continue
        if m.is_dora or m.kind != "linear":
            raise SurgeryError(f"{path}: SaLoRA folds plain linear LoRA only (DoRA and embeddings are not supported)")
        B = lora.get(m.b_key)
        if U.shape[0] != B.shape[0]:
            raise MismatchError(f"{path}: U has {U.shape[0]} output rows but lora_B has {B.shape[0]}; "
                                "fit the module on the adapter's base model")
        new_b[m.b_key] = salora_fold(U, B.float()).to(B.dtype)
        report.tensors.append(TensorChange(m.b_key, list(B.shape), B.numel(), int((new_b[m.b_key] != B).sum())))
        folded.append(path)
    if not folded:
        raise MismatchError(f"no module of adapter {adapter} has a fitted U in {module}; "
                            f"the module covers {', '.join(sorted(Us)[:3])}...")
    records = {"adapter": lora, "module": Path(module)}
    report.inputs = input_records(records)
    report.out = str(out)
    report.metrics.update(folded=folded, unprotected=unprotected)
    meta = provenance(report.method, {**report.config, "folded": folded}, records)
    report.seconds["total"] = time.perf_counter() - started
    rewrite_adapter(lora, out, new_b, meta, runtime.force, extra_files={REPORT_FILE: report.to_json()},
                    inputs=inputs)
    return report


def apply_salora(adapter: str | Path, module: str | Path, out: str | Path, *,
                 runtime: Runtime = Runtime()) -> Report:
    """`run_apply` on an adapter and a module file: `apply_salora(adapter, module, out)`."""
    return run_apply(SaloraApplyConfig(), {"adapter": adapter, "module": module}, out, runtime)


# --------------------------------------------------------------------------- fine-tuning with the fixed module


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """module path (checkpoint naming) -> peft LoRA layer."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_B") and isinstance(mod.lora_B, torch.nn.ModuleDict):
            out[strip_peft_prefix(name)] = mod
    return out


class SaloraHook:
    """A `prepare_model(model)` hook that puts C = I - U U^T after every fitted lora_B.

    After it runs: the forward is h = W x + s C B A x (gradients flow through C), and
    `model.state_dict()` (hence peft's `save_pretrained`) holds C B in place of B, so the
    saved adapter is a plain peft adapter. `fold_(model)` makes the fold permanent in the
    parameters and removes the hooks; `remove()` removes them without folding.
    `protected` / `unprotected` list the LoRA layers with and without a fitted U.

    `task_init=True` (needs a module fitted with `--task`): the paper's task-specific
    initialisation. With W ~ U2 S2 V2^T (top r singular triplets), B0 = Vt Vt^T U2 sqrt(S2),
    A0 = sqrt(S2) V2^T; lora_B, lora_A start at B0, A0 and the frozen base becomes
    W_res = W - s C B0 A0 (the output is unchanged at step 0). So that the saved adapter
    still applies to the original W, the state dict then holds W (not W_res) and a rank-2r
    LoRA [C B, -C B0] [A; A0] (its `rank_pattern`/`alpha_pattern` entries keep the scaling),
    whose product is s (C B A - C B0 A0) = the fine-tuned weights minus W.
    """

    def __init__(self, module_path: str | Path, task_init: bool = False) -> None:
        self.module_path = Path(module_path)
        self.U = load_module(module_path)
        self.task_init = task_init
        self.Vt = load_task_subspaces(module_path) if task_init else {}
        if task_init and not self.Vt:
            raise SurgeryError(f"{module_path} has no task subspace; fit it with task data (`surgery salora fit --task T.jsonl`)")
        self.protected: list[str] = []
        self.unprotected: list[str] = []
        self._handles: list[Any] = []
        self._bound: list[tuple[torch.nn.Linear, torch.Tensor]] = []

    def __call__(self, model: torch.nn.Module) -> None:
        if self._handles:
            raise RuntimeError("this SaLoRA hook is already attached to a model")
        layers = _lora_layers(model)
        if not layers:
            raise SurgeryError("the model has no peft LoRA layers; SaLoRA fine-tuning needs LoRA (not --full)")
        for path, layer in sorted(layers.items()):
            U = self.U.get(path)
            if U is None:
                self.unprotected.append(path)
                continue
            variants = getattr(layer, "lora_variant", {}) or {}
            for adapter_name, lora_b in layer.lora_B.items():  # type: ignore[union-attr,operator]  # a peft LoRA layer
                if adapter_name in variants:
                    raise SurgeryError(f"{path}: SaLoRA supports plain LoRA only (not DoRA or other variants)")
                if lora_b.weight.shape[0] != U.shape[0]:
                    raise MismatchError(f"{path}: U has {U.shape[0]} rows but lora_B has {lora_b.weight.shape[0]} "
                                        "outputs; fit the module on this model")
                u = U.to(lora_b.weight.device)
                self._bound.append((lora_b, u))
                self._handles.append(lora_b.register_forward_hook(_project_output(u)))
                if self.task_init:
                    self._task_init(model, path, layer, adapter_name, u)
                else:
                    self._handles.append(lora_b.register_state_dict_post_hook(_fold_state(u)))
            self.protected.append(path)
        if not self.protected:
            raise MismatchError(f"no LoRA layer of the model has a fitted U in {self.module_path}; "
                                "fine-tune the modules the SaLoRA module was fitted on (targets)")

    def _task_init(self, model: torch.nn.Module, path: str, layer: torch.nn.Module, name: str,
                   U: torch.Tensor) -> None:
        base = layer.base_layer
        if not isinstance(base, torch.nn.Linear) or getattr(layer, "fan_in_fan_out", False):
            raise SurgeryError(f"{path}: the task-specific initialisation supports nn.Linear layers only")
        Vt = self.Vt.get(path)
        if Vt is None:
            raise SurgeryError(f"{path}: no task subspace in {self.module_path}; refit with targets covering it")
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]  # type: ignore[index]  # a peft LoRA layer
        r = lora_a.weight.shape[0]  # type: ignore[union-attr]
        s = float(layer.scaling[name])  # type: ignore[index]
        with torch.no_grad():
            W = base.weight.detach().float()
            Uw, Sw, Vhw = torch.linalg.svd(W, full_matrices=False)
            root = Sw[:r].sqrt()
            vt = Vt.to(W.device)
            B0 = vt @ (vt.T @ (Uw[:, :r] * root))
            A0 = root[:, None] * Vhw[:r]
            CB0 = salora_fold(U, B0)
            base.weight.copy_((W - s * CB0 @ A0).to(base.weight.dtype))
            lora_b.weight.copy_(B0.to(lora_b.weight.dtype))  # type: ignore[union-attr]
            lora_a.weight.copy_(A0.to(lora_a.weight.dtype))  # type: ignore[union-attr]
        CB0, A0 = CB0.detach(), A0.detach()
        prefix_mod = layer

        def export(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
            kb, ka, kw = f"{prefix}lora_B.{name}.weight", f"{prefix}lora_A.{name}.weight", f"{prefix}base_layer.weight"
            if kb in state_dict and ka in state_dict:
                b, a = state_dict[kb], state_dict[ka]
                cb = salora_fold(U.to(b.device), b.detach().float())
                state_dict[kb] = torch.cat([cb, -CB0.to(b.device)], dim=1).to(b.dtype)
                state_dict[ka] = torch.cat([a.detach().float(), A0.to(a.device)], dim=0).to(a.dtype)
            if kw in state_dict:  # the original W, so that W + the exported delta is the fine-tuned weight
                w = state_dict[kw]
                state_dict[kw] = (w.detach().float() + s * CB0.to(w.device) @ A0.to(w.device)).to(w.dtype)

        self._handles.append(prefix_mod.register_state_dict_post_hook(export))
        config = getattr(model, "peft_config", {}).get(name)
        if config is not None:
            key = re.escape(path)
            rank_pattern = dict(config.rank_pattern or {})
            alpha_pattern = dict(config.alpha_pattern or {})
            alpha = float(alpha_pattern.get(key, config.lora_alpha))
            rank_pattern[key] = 2 * r
            # keep the scaling: alpha/r (or alpha/sqrt(r) with rslora) at rank 2r
            alpha_pattern[key] = alpha * (math.sqrt(2) if config.use_rslora else 2)
            config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern

    def fold_(self, model: torch.nn.Module | None = None) -> None:
        """B <- C B in every hooked lora_B, then remove the hooks (the model is a plain LoRA model again)."""
        if self.task_init:
            raise RuntimeError("fold_ is not defined after the task-specific initialisation (the base is W_res); "
                               "save the adapter instead")
        with torch.no_grad():
            for lora_b, u in self._bound:
                w = lora_b.weight
                w.copy_(salora_fold(u.to(w.device), w.float()).to(w.dtype))
        self.remove()

    def remove(self) -> None:
        """Detach all hooks (without folding)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._bound.clear()


def _project_output(U: torch.Tensor) -> Any:
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        u = U if U.device == output.device else U.to(output.device)
        return salora_project(output, u)
    return hook


def _fold_state(U: torch.Tensor) -> Any:
    def hook(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            state_dict[key] = salora_fold(U.to(w.device), w.detach().float()).to(w.dtype)
    return hook


def salora_prepare(module_path: str | Path, task_init: bool = False) -> SaloraHook:
    """The `prepare_model` hook for SaLoRA fine-tuning with the module at `module_path`.

    `finetune(model_dir, pairs, out, prepare_model=salora_prepare(m), targets=[...])`
    trains with h = W x + s C B A x and saves a plain peft adapter (C folded into B).
    `task_init=True`: the paper's task-specific initialisation (see `SaloraHook`).
    """
    return SaloraHook(module_path, task_init=task_init)


def salora_targets(module_path: str | Path) -> list[str]:
    """The short module names (e.g. q_proj, v_proj) a SaLoRA module was fitted on: use them as LoRA targets."""
    return sorted({p.rsplit(".", 1)[-1] for p in load_module(module_path)})
