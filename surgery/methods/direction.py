"""Refusal-direction ablation and addition (Arditi et al. 2024, "Refusal is mediated by a single direction").

What: the difference of means between harmful and harmless activations at the input of
each decoder block (resid_pre), at each post-instruction template position (the chat
template tokens after the user message), gives one candidate direction per (position,
layer). The chosen direction is either

- ablated (the attack): every matrix that writes into the residual stream is
  orthogonalised, W <- W - r r^T W, for the embedding, every attention output projection
  and every MLP down projection (and their biases when they have one), so no layer can
  write along r any more; or
- added (the defense, ActAdd): coeff * (harmful mean - harmless mean) is added to the
  residual stream at the input of the chosen layer, as a bias of the previous layer's MLP
  down projection (see `add_site` below for architectures without an MLP bias).

Automatic selection follows the paper: for every candidate, the refusal score on held-out
harmful prompts is measured with the direction ablated at inference time; candidates at
layers >= 0.8 L and candidates whose first-token KL on held-out harmless prompts exceeds
`kl_limit` are discarded; the lowest refusal score wins. The refusal score is the log-odds
of the refusal tokens at the last position: log p - log(1 - p), p = sum of P(token).

Our own code, written from the paper's formulas; the reference implementation is
andyrdt/refusal_direction (Apache-2.0); heretic (AGPL) was not used.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from surgery.errors import DataError, InputNotFoundError, MismatchError, SurgeryError
from surgery.methods.config import ConfigError, MethodConfig, Runtime, option
from surgery.model.encoding import left_padded_batches, pad_id, prompt_ids
from surgery.model.layout import Layout, module, residual_layout
from surgery.model.load import default_device, load_causal_lm, load_config, load_tokenizer, model_from_config
from surgery.model.scoring import kl_divergence, model_device, next_token_logprobs
from surgery.report import Report

__all__ = ["DirectionConfig", "run", "refusal_direction_edit", "select_direction", "load_direction",
           "save_direction", "ablate_weight", "ablation_plan", "DIRECTION_FILE"]

DIRECTION_FILE = "refusal_direction.safetensors"
DEFAULT_REFUSAL_PHRASES = ("I", "Sorry", "sorry", "I'm", "As", "Unfortunately", "i")
MAX_LAYER_FRACTION = 0.8

# --- tokens and batches ----------------------------------------------------------------------


def post_instruction_length(tokenizer: Any, encoded: Sequence[Sequence[int]]) -> int:
    """How many template tokens follow the user message (Arditi's `eoi_toks`), at least 1.

    Rendered from the chat template with a sentinel message and checked against the
    encoded prompts; without a chat template only the last prompt token is used.
    """
    if not getattr(tokenizer, "chat_template", None):
        return 1
    sentinel = "SURGERYSENTINEL"
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], add_generation_prompt=True,
                                         tokenize=False)
    suffix = text.split(sentinel, 1)[-1] if sentinel in text else ""
    eoi = [int(i) for i in tokenizer(suffix, add_special_tokens=False)["input_ids"]] if suffix.strip() else []
    n = len(eoi)
    while n > 0 and not all(len(s) > n and list(s[-n:]) == eoi[-n:] for s in encoded):
        n -= 1  # the tokenizer merged across the boundary: keep the part every prompt shares
    return max(1, n)


def refusal_token_ids(tokenizer: Any, phrases: Sequence[str] | None = None) -> list[int]:
    """First token of each refusal phrase (unknown tokens dropped), e.g. "I", "Sorry"."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids: list[int] = []
    for phrase in phrases or DEFAULT_REFUSAL_PHRASES:
        toks = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        if toks and toks[0] != unk and int(toks[0]) not in ids:
            ids.append(int(toks[0]))
    if not ids:
        raise DataError("none of the refusal phrases is a known token of this tokenizer: set refusal_tokens "
                        "to the first word of the model's refusals")
    return ids


# --- activations and candidates --------------------------------------------------------------


@torch.no_grad()
def mean_resid_pre(model: torch.nn.Module, seqs: Sequence[Sequence[int]], n_pos: int, pad_id: int,
                   batch_size: int = 32) -> torch.Tensor:
    """Mean decoder-block input at the last `n_pos` positions of every sequence: float64 [n_pos, L, d]."""
    total: torch.Tensor | None = None
    for batch in left_padded_batches(seqs, pad_id, batch_size, model_device(model)):
        hs = model(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states
        layers = torch.stack([h[:, -n_pos:, :] for h in hs[:-1]], dim=2).double()  # [B, n_pos, L, d]
        s = layers.sum(0)
        total = s if total is None else total + s
    assert total is not None
    return total.cpu() / len(seqs)


def candidate_directions(model: torch.nn.Module, harmful: Sequence[Sequence[int]],
                         harmless: Sequence[Sequence[int]], n_pos: int, pad_id: int,
                         batch_size: int = 32) -> torch.Tensor:
    """Difference of means, harmful - harmless, at each (position, layer): float64 [n_pos, L, d]."""
    return (mean_resid_pre(model, harmful, n_pos, pad_id, batch_size)
            - mean_resid_pre(model, harmless, n_pos, pad_id, batch_size))


def _project_out(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    rr = r.to(x.dtype)
    return x - (x @ rr).unsqueeze(-1) * rr


@contextmanager
def ablation_hooks(model: torch.nn.Module, layout: Layout, direction: torch.Tensor) -> Iterator[None]:
    """Inference-time directional ablation: remove r-hat from every write into the residual stream.

    Hooks the embeddings, every attention output and every MLP output; this is exactly
    what the weight orthogonalisation does to the model, without touching the weights.
    """
    r = (direction.double() / direction.double().norm()).float().to(model_device(model))

    def hook(_m: torch.nn.Module, _inp: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (_project_out(out[0], r), *out[1:])
        return _project_out(out, r)

    names = layout.embeddings + [layout.parent(a) for a in layout.attn_out] + [layout.parent(m) for m in layout.mlp_out]
    handles = [module(model, name).register_forward_hook(hook) for name in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def addition_hook(model: torch.nn.Module, layout: Layout, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Inference-time activation addition: add `vector` to the input of decoder block `layer`."""
    v = vector.float().to(model_device(model))

    def pre(_m: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (args[0] + v, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] + v
        return args, kwargs

    handle = module(model, layout.blocks[layer]).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def refusal_score(logprobs: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """Per-row refusal log-odds log p - log(1 - p), p = total probability of the refusal tokens."""
    lp = torch.logsumexp(logprobs[:, list(refusal_ids)].double(), dim=-1).clamp(max=-1e-12)
    return lp - torch.log(-torch.expm1(lp))


@dataclass
class Selection:
    """The chosen candidate and the scores of all that were measured."""

    layer: int
    pos: int
    direction: torch.Tensor  # unit, fp32 [d]
    mean_diff: torch.Tensor  # harmful - harmless mean, fp32 [d]
    n_pos: int
    n_layers: int
    baseline_refusal: float
    ablated_refusal: float
    harmless_kl: float
    candidates: list[dict[str, Any]]


def select_direction(model: torch.nn.Module, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], *,
                     layer: int | None = None, pos: int | None = None, kl_limit: float = 0.1,
                     refusal_phrases: Sequence[str] | None = None, val_fraction: float = 0.25, seed: int = 0,
                     batch_size: int = 32, max_layer_fraction: float = MAX_LAYER_FRACTION,
                     steering_filter: bool = False, progress: bool = True) -> Selection:
    """Compute the candidate directions and choose one (Arditi et al.'s selection).

    Prompts are split (seeded) into a train part for the means and a validation part for
    the scores. With `layer` (and optionally `pos`, negative, default -1) given, that
    candidate is taken and only scored; otherwise every candidate below
    `max_layer_fraction * L` whose harmless KL is at most `kl_limit` competes, and the
    lowest ablated refusal score wins. Every candidate's steering score (the refusal score
    on harmless prompts with the mean difference added at its layer) is reported; with
    `steering_filter` (the paper's third filter, off by default) candidates whose mean
    steering score is below 0 are discarded too.
    """
    from surgery.progress import track

    if len(harmful) < 2 or len(harmless) < 2:
        raise DataError("refusal-direction selection needs at least 2 harmful and 2 harmless prompts")
    layout = residual_layout(model)
    L = layout.n_layers
    pad = pad_id(tokenizer)
    rng = random.Random(seed)

    def split(prompts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        enc = [prompt_ids(tokenizer, p) for p in prompts]
        rng.shuffle(enc)
        n_val = min(64, max(1, int(len(enc) * val_fraction)))
        return enc[n_val:], enc[:n_val]

    h_train, h_val = split(harmful)
    b_train, b_val = split(harmless)
    n_pos = post_instruction_length(tokenizer, h_train + h_val + b_train + b_val)
    if pos is not None and not -n_pos <= pos <= -1:
        raise ConfigError(f"direction: pos must be in [-{n_pos}, -1] (the post-instruction template positions), got {pos}")
    if layer is not None and not 0 <= layer < L:
        raise ConfigError(f"direction: layer must be in [0, {L - 1}] for this {L}-layer model, got {layer}")
    diffs = candidate_directions(model, h_train, b_train, n_pos, pad, batch_size)  # [n_pos, L, d]
    refusal_ids = refusal_token_ids(tokenizer, refusal_phrases)
    base_h = next_token_logprobs(model, h_val, pad, batch_size)
    base_b = next_token_logprobs(model, b_val, pad, batch_size)
    baseline = float(refusal_score(base_h, refusal_ids).mean())

    if layer is not None:
        todo = [(pos if pos is not None else -1, layer)]
    else:
        positions = [pos] if pos is not None else list(range(-n_pos, 0))
        todo = [(p, ly) for p in positions for ly in range(L)]
    cands: list[dict[str, Any]] = []
    for p, ly in track(todo, description="score refusal directions") if progress else todo:
        row: dict[str, Any] = {"pos": p, "layer": ly}
        diff = diffs[n_pos + p, ly]
        if float(diff.norm()) == 0.0:
            row["discarded"] = "zero difference"
            cands.append(row)
            continue
        if layer is None and ly >= max_layer_fraction * L:
            row["discarded"] = f"layer >= {max_layer_fraction} L"
            cands.append(row)
            continue
        with ablation_hooks(model, layout, diff.float()):
            abl_h = next_token_logprobs(model, h_val, pad, batch_size)
            abl_b = next_token_logprobs(model, b_val, pad, batch_size)
        row["refusal_score"] = float(refusal_score(abl_h, refusal_ids).mean())
        row["kl"] = kl_divergence(base_b, abl_b)
        with addition_hook(model, layout, ly, diff.float()):
            row["steering_score"] = float(refusal_score(next_token_logprobs(model, b_val, pad, batch_size),
                                                        refusal_ids).mean())
        if layer is None and (not math.isfinite(row["kl"]) or row["kl"] > kl_limit):
            row["discarded"] = f"harmless KL > {kl_limit}"
        elif layer is None and steering_filter and not row["steering_score"] >= 0:
            row["discarded"] = "steering score < 0"
        cands.append(row)
    kept = [c for c in cands if "discarded" not in c and math.isfinite(c.get("refusal_score", math.nan))]
    if not kept and layer is not None:
        raise SurgeryError(f"the candidate at layer {layer}, pos {todo[0][0]} is unusable "
                           f"({cands[0].get('discarded', 'no finite score')}): at layer 0 every prompt has the same "
                           "template tokens, so pick a later layer or another pos")
    if not kept:
        raise SurgeryError(f"every candidate direction was filtered out (KL limit {kl_limit}, layers < "
                           f"{max_layer_fraction} L{', steering score >= 0' if steering_filter else ''}; "
                           f"{_discard_summary(cands)}): raise "
                           f"kl_limit, {'turn steering_filter off, ' if steering_filter else ''}"
                           "or pick one with layer")
    best = min(kept, key=lambda c: (c["refusal_score"], -c["pos"], c["layer"]))
    diff = diffs[n_pos + best["pos"], best["layer"]]
    return Selection(layer=best["layer"], pos=best["pos"], direction=(diff / diff.norm()).float(),
                     mean_diff=diff.float(), n_pos=n_pos, n_layers=L, baseline_refusal=baseline,
                     ablated_refusal=best["refusal_score"], harmless_kl=best["kl"], candidates=cands)


def _discard_summary(cands: Sequence[dict[str, Any]], limit: int = 6) -> str:
    """Why each candidate was dropped, lowest harmless KL first, e.g. "layer 1 pos -1: harmless KL 0.242"."""
    scored = sorted((c for c in cands if "kl" in c), key=lambda c: (not math.isfinite(c["kl"]), c["kl"]))
    parts = [f"layer {c['layer']} pos {c['pos']}: harmless KL {c['kl']:.3g}"
             f"{', steering score ' + format(c['steering_score'], '.3g') if c.get('discarded', '').startswith('steering') else ''}"
             for c in scored[:limit]]
    if len(scored) > limit:
        parts.append(f"{len(scored) - limit} more scored")
    other: dict[str, int] = {}
    for c in cands:
        if "kl" not in c:
            other[c.get("discarded", "no score")] = other.get(c.get("discarded", "no score"), 0) + 1
    parts += [f"{n} with {why}" for why, n in other.items()]
    return "; ".join(parts) or "no candidates"


# --- weight edits (pure tensor functions) ----------------------------------------------------


def ablate_weight(W: torch.Tensor, r: torch.Tensor, layout: str) -> torch.Tensor:
    """W with the direction r removed from what it writes into the residual stream, in W's dtype.

    `layout`: "out_first" for torch Linear weights [d_model, d_in] (W <- W - r r^T W),
    "out_last" for embeddings [vocab, d_model] and Conv1D [d_in, d_model] (each row
    w <- w - (w.r) r), "bias" for a [d_model] bias (b <- b - (b.r) r). r need not be unit.
    """
    from surgery.kernels import direction_ablate_

    if layout == "out_first":
        out = W.clone()
        direction_ablate_(out, r.to(out.device))
        return out
    if layout == "out_last":
        t = W.t().contiguous()
        direction_ablate_(t, r.to(t.device))
        return t.t().contiguous()
    if layout == "bias":
        rh = r.double() / r.double().norm()
        return (W.double() - (W.double() @ rh) * rh).to(W.dtype)
    raise ValueError(f"unknown layout {layout!r}")


def ablation_plan(layout: Layout, names: Sequence[str]) -> dict[str, str]:
    """Checkpoint tensor name -> how to ablate it, for every residual-writing tensor present."""
    plan: dict[str, str] = {}
    present = set(names)
    for e in layout.embeddings:
        plan[f"{e}.weight"] = "out_last"
    for m in layout.attn_out + layout.mlp_out:
        plan[f"{m}.weight"] = "out_last" if m in layout.transposed else "out_first"
        if f"{m}.bias" in present:
            plan[f"{m}.bias"] = "bias"
    missing = [n for n in plan if n not in present]
    if missing:
        raise MismatchError(f"the checkpoint lacks {missing[0]} (its tensor names do not match the model's): "
                            "only standard Hugging Face checkpoints are supported")
    return plan


# --- config and driver -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DirectionConfig(MethodConfig):
    """The refusal-direction edit's options; defaults follow Arditi et al.'s selection (KL limit 0.1)."""

    method = "direction"
    mode: Literal["ablate", "add"] = option(
        help="ablate: orthogonalise every residual-writing weight; add: put the direction back (defense).")
    layer: int | None = option(None, "Layer of the direction; default: chosen by the selection (auto).", low=0)
    pos: int | None = option(None, "Post-instruction position (negative, e.g. -1); default: searched (auto) or -1.",
                             high=-1)
    coeff: float = option(1.0, "add: multiple of the mean difference added.")
    kl_limit: float = option(0.1, "auto: discard candidates whose first-token KL on harmless prompts exceeds this.",
                             low=0.0)
    steering_filter: bool = option(False, "auto: also discard candidates whose steering score (refusal when added "
                                          "on harmless prompts) is below 0, the paper's third filter.")
    refusal_tokens: tuple[str, ...] = option(
        (), "Words that start a refusal (default I, Sorry, ...): the refusal score's tokens.", flag="--refusal-token")
    add_site: Literal["auto", "bias", "mlp_bias", "embedding"] = option(
        "auto", "add: where the vector goes (see the docs).")
    limit: int | None = option(None, "Use at most this many prompts of each file.", low=1)
    seed: int = option(0, "Seed of the train/validation split of the prompts.")
    batch_size: int = option(32, "Prompts per forward pass.", low=1)


def run(config: DirectionConfig, inputs: Mapping[str, Any], out: str | Path, runtime: Runtime = Runtime(), *,
        harmful: Sequence[str] | None = None, harmless: Sequence[str] | None = None) -> Report:
    """Find (or load) the refusal direction of `inputs["model"]` and write `out` with it ablated or added.

    The direction comes from `inputs["direction"]` (a saved `refusal_direction.safetensors`)
    or from the prompts of `inputs["harmful"]`/`inputs["harmless"]` (or the `harmful`/
    `harmless` lists, which replace reading them). `mode="ablate"`: every residual-writing
    tensor orthogonalised against the unit direction; `mode="add"`: coeff * (harmful -
    harmless mean) added at the input of the chosen layer (see `_addition_tensors`). The
    output is streamed tensor by tensor and holds `refusal_direction.safetensors` and
    `surgery_report.json`; the selection (every candidate's scores) is in `report.metrics`.
    """
    from surgery.calib.data import load_prompts
    from surgery.io.atomic import check_output
    from surgery.io.checkpoint import Checkpoint
    from surgery.io.provenance import provenance
    from surgery.pipeline.rewrite import rewrite_checkpoint

    start = time.perf_counter()
    direction_file = inputs.get("direction")
    check_output(out, runtime.force, inputs)
    ckpt = Checkpoint.open(inputs["model"])
    cfg = ckpt.config()
    if cfg is None or ckpt.directory is None:
        raise InputNotFoundError(f"{inputs['model']} is not a Hugging Face model directory (needs config.json)")
    if direction_file is None:
        if harmful is None and inputs.get("harmful") is not None:
            harmful = load_prompts(inputs["harmful"], config.limit)
        if harmless is None and inputs.get("harmless") is not None:
            harmless = load_prompts(inputs["harmless"], config.limit)
        if not harmful or not harmless:
            raise DataError("give harmful and harmless prompts (or a saved direction file to reuse)")
        tok = load_tokenizer(ckpt.directory)
        model = load_causal_lm(ckpt.directory, device=default_device(runtime.device)).requires_grad_(False)
    else:  # no forward pass needed: the layout comes from an empty (meta) model
        model, tok = _meta_model(ckpt.directory), None
    layout = residual_layout(model)
    if direction_file is not None:
        sel = load_direction(direction_file)
        d_model = module(model, layout.embeddings[0]).weight.shape[-1]  # type: ignore[index]  # an Embedding
        if sel.direction.numel() != d_model:
            raise MismatchError(f"{direction_file} holds a direction of size {sel.direction.numel()}, the model's "
                                f"hidden size is {d_model}: it was computed on another model")
        if config.layer is not None:
            sel.layer = config.layer
        if not 0 <= sel.layer < layout.n_layers:
            raise MismatchError(f"the direction's layer {sel.layer} does not exist in this {layout.n_layers}-layer model")
        sel.n_layers = layout.n_layers
    else:
        sel = select_direction(model, tok, harmful or [], harmless or [], layer=config.layer, pos=config.pos,
                               kl_limit=config.kl_limit, refusal_phrases=list(config.refusal_tokens) or None,
                               seed=config.seed, batch_size=config.batch_size,
                               steering_filter=config.steering_filter, progress=runtime.progress)
    del model

    new_tensors: dict[str, torch.Tensor] = {}
    new_cfg = None
    site = None
    if config.mode == "ablate":
        plan = ablation_plan(layout, ckpt.names())
    else:
        site, new_tensors, plan, new_cfg = _addition_tensors(ckpt, cfg, layout, sel.layer,
                                                             config.coeff * sel.mean_diff, config.add_site)
    add = config.coeff * sel.mean_diff

    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        kind = plan[name]
        if kind == "add":
            return (t.float() + add.to(t.device)).to(t.dtype)
        if kind == "add_rows":
            return (t.float() + add.to(t.device).unsqueeze(0)).to(t.dtype)
        return ablate_weight(t, sel.direction, kind)

    report = Report("direction", config.to_dict())
    report.metrics = {
        "mode": config.mode, "layer": sel.layer, "pos": sel.pos,
        "coeff": config.coeff if config.mode == "add" else None, "site": site,
        "direction_file": str(Path(out) / DIRECTION_FILE), "edited": sorted(plan), "added": sorted(new_tensors),
        "baseline_refusal": _finite(sel.baseline_refusal), "ablated_refusal": _finite(sel.ablated_refusal),
        "harmless_kl": _finite(sel.harmless_kl), "candidates": sel.candidates,
    }
    data = {role: inputs[role] for role in ("harmful", "harmless", "direction") if inputs.get(role) is not None}
    extra: dict[str, str | bytes] = {}
    if new_cfg is not None:
        extra["config.json"] = json.dumps(new_cfg, indent=2, sort_keys=True) + "\n"
    with tempfile.TemporaryDirectory() as td:
        meta = provenance(report.method, report.config, {"model": ckpt, **data})
        extra[DIRECTION_FILE] = save_direction(Path(td) / DIRECTION_FILE, sel, meta).read_bytes()
    report.seconds["select"] = time.perf_counter() - start
    return rewrite_checkpoint(ckpt, out, report, edit=edit, names=set(plan), new_tensors=new_tensors, inputs=data,
                              extra_files=extra, shard_size=runtime.shard_size, force=runtime.force,
                              started=start)


def refusal_direction_edit(model: str | Path, out: str | Path, *, harmful: Sequence[str] | None = None,
                           harmless: Sequence[str] | None = None, direction_file: str | Path | None = None,
                           runtime: Runtime = Runtime(), **options: Any) -> Report:
    """`run` with the config's fields as keyword arguments and the prompts as lists:
    `refusal_direction_edit(model, out, mode="ablate", harmful=[...], harmless=[...], layer=1)`."""
    inputs = {"model": model} if direction_file is None else {"model": model, "direction": direction_file}
    return run(DirectionConfig(**options), inputs, out, runtime, harmful=harmful, harmless=harmless)


def save_direction(path: str | Path, sel: Selection, metadata: dict[str, str], force: bool = False) -> Path:
    """Write the direction (unit and raw mean difference) with its layer and position as safetensors."""
    from surgery.io.writer import write_tensors

    meta = {**metadata, "layer": str(sel.layer), "pos": str(sel.pos), "n_layers": str(sel.n_layers),
            "n_pos": str(sel.n_pos)}
    tensors = {"direction": sel.direction.contiguous(), "mean_diff": sel.mean_diff.contiguous(),
               "layer": torch.tensor([sel.layer], dtype=torch.int64), "pos": torch.tensor([sel.pos], dtype=torch.int64)}
    return write_tensors(path, tensors, metadata=meta, force=force)


def load_direction(path: str | Path) -> Selection:
    """Read a direction written by `save_direction` (scores are not stored and come back empty)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} does not exist: give a direction file written by `surgery edit direction`")
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            if not {"direction", "mean_diff", "layer", "pos"} <= keys:
                raise DataError(f"{path} is not a refusal-direction file (needs direction, mean_diff, layer, pos)")
            t = {k: f.get_tensor(k) for k in ("direction", "mean_diff", "layer", "pos")}
            meta = f.metadata() or {}
    except SurgeryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise DataError(f"{path} is not a readable safetensors file ({exc})") from None
    return Selection(layer=int(t["layer"][0]), pos=int(t["pos"][0]), direction=t["direction"].float(),
                     mean_diff=t["mean_diff"].float(), n_pos=int(meta.get("n_pos", 1)),
                     n_layers=int(meta.get("n_layers", 0)), baseline_refusal=math.nan, ablated_refusal=math.nan,
                     harmless_kl=math.nan, candidates=[])


def _addition_tensors(ckpt: Any, cfg: dict, layout: Layout, layer: int, vector: torch.Tensor,
                      site: str) -> tuple[str, dict[str, torch.Tensor], dict[str, str], dict | None]:
    """Where the added vector goes: (site, new tensors, edits {name: kind}, new config or None).

    - layer >= 1 and the previous MLP down projection has a bias: add to it ("bias");
    - layer >= 1 and the config has `mlp_bias` (Llama): turn MLP biases on, zeros
      everywhere except coeff * r on that down projection ("mlp_bias");
    - layer 0: add to every row of the token embedding ("embedding": the vector is
      added to the residual stream at the input of block 0).
    """
    if site == "auto":
        if layer == 0:
            site = "embedding"
        elif f"{layout.mlp_out[layer - 1]}.bias" in ckpt:
            site = "bias"
        elif "mlp_bias" in cfg:
            site = "mlp_bias"
        else:
            raise SurgeryError(
                f"this architecture ({cfg.get('model_type')}) has no MLP bias to carry the added direction at "
                f"layer {layer}: use layer 0 (added through the token embedding) or a Llama-family model")
    if site == "embedding":
        if layer != 0:
            raise SurgeryError("add_site embedding adds the vector at the input of block 0: use it with layer 0")
        return site, {}, {f"{layout.embeddings[0]}.weight": "add_rows"}, None
    if layer == 0:
        raise SurgeryError("layer 0 has no previous MLP: the vector can only go into the embedding (layer 0 "
                           "uses add_site embedding)")
    name = f"{layout.mlp_out[layer - 1]}.bias"
    if site == "bias":
        if name not in ckpt:
            raise SurgeryError(f"{name} does not exist: use add_site auto")
        return site, {}, {name: "add"}, None
    if site != "mlp_bias":
        raise SurgeryError(f"unknown add_site {site!r}: use auto, bias, mlp_bias or embedding")
    new_cfg = dict(cfg)
    new_cfg["mlp_bias"] = True
    hf_cfg = load_config(ckpt.directory)
    hf_cfg.mlp_bias = True
    with torch.device("meta"):
        shell = model_from_config(hf_cfg)
    dtype = ckpt.info(f"{layout.mlp_out[0]}.weight").torch_dtype
    new = {n: torch.zeros(tuple(p.shape), dtype=dtype)
           for n, p in shell.state_dict().items() if n not in ckpt and n.endswith(".bias")}
    if name not in new:
        raise SurgeryError(f"turning on mlp_bias did not create {name}: this architecture cannot carry the vector")
    new[name] = vector.to(new[name].dtype)
    return site, new, {}, new_cfg


def _meta_model(model_dir: Path) -> torch.nn.Module:
    """The model's modules without weights (device "meta"): enough to know its layout."""
    with torch.device("meta"):
        return model_from_config(load_config(model_dir))


def _finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None
