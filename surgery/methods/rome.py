"""ROME: a rank-one edit of one MLP down projection that rewrites one association (Meng et al. 2022).

What: the down projection W of layer l maps keys k (its input, the MLP's hidden
activation) to values v (its output, added to the residual stream). ROME picks

- k*: the key at the subject's last token, averaged over the prompt behind a few short
  context prefixes (seeded samples from the model itself, plus the bare prompt);
- v* = W k* + delta, where delta (added to the MLP output at the subject's last token)
  minimises NLL(target | prefixed prompts) + kl_factor * KL(original || edited) on
  "{subject} is a" + weight_decay * ||delta||^2 / ||W k*||^2 with Adam, clamped after each
  step to ||delta|| <= clamp_norm_factor * ||W k*||;
- C: the uncentred second moment E[k k^T] of keys at that layer over a local corpus
  (cached as safetensors, keyed by the model fingerprint, the tensor and the data hash),
  or the identity with `no_cov`;

and writes W <- W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*), the closed form that makes
W k* = v* exactly while changing W least in the metric C. The update goes through
`surgery.kernels.rank_one_update_`; the output checkpoint is streamed tensor by tensor
and only the edited tensor differs.

Deviations from kmeng01/rome (MIT), by design: v0 is W k* of the averaged key (so that
the update is exactly delta along C^-1 k*), prefixes are sampled in token space (no
detokenise/retokenise round trip), and a small relative ridge keeps C invertible on a
small corpus. Our own code from the paper's formulas.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.errors import DataError, InputNotFoundError, SurgeryError
from surgery.io.jsonl import read_jsonl
from surgery.methods.config import ConfigError, MethodConfig, Runtime, option
from surgery.model.encoding import pad_id, right_pad, text_ids
from surgery.model.layout import Layout, module, residual_layout
from surgery.model.load import default_device, load_causal_lm, load_tokenizer
from surgery.model.scoring import kl_divergence, model_device, sequence_logprobs
from surgery.report import Report

__all__ = ["RomeConfig", "run", "rome_edit", "rome_vectors", "tokenize_fact", "parse_prefixes", "read_texts",
           "load_vectors", "VECTORS_FILE"]

DEFAULT_PREFIXES: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # (length, count), as ROME
VECTORS_FILE = "rome_vectors.safetensors"  # k*, v*, u, v, delta of the edit (fp32), beside the weights


@dataclass(frozen=True)
class Fact:
    """A tokenised edit request: prompt ids, where the subject ends, and the target ids."""

    prompt_ids: list[int]
    subject_last: int  # index into prompt_ids
    target_ids: list[int]


def default_layer(n_layers: int) -> int:
    """ROME's early-middle layer: about 0.17 L (5 of 32 for Llama-3-8B, GPT-J's 5 of 28)."""
    return max(0, min(n_layers - 1, int(0.17 * n_layers)))


def tokenize_fact(tokenizer: Any, prompt: str, subject: str, target: str) -> Fact:
    """Tokenise prompt (with "{}" standing for the subject, or the subject written out) and target.

    The subject's last token is found by tokenising the prompt up to the end of the
    subject's first occurrence. The target is tokenised with a leading space, so that
    word-piece tokenizers see it as the next word.
    """
    if not subject.strip() or not target.strip():
        raise DataError("ROME needs a non-empty subject and target")
    text = prompt.replace("{}", subject, 1) if "{}" in prompt else prompt
    at = prompt.index("{}") if "{}" in prompt else prompt.find(subject)
    if at < 0:
        raise DataError(f"the subject {subject!r} does not occur in the prompt {prompt!r}: write it there or use {{}}")
    ids = text_ids(tokenizer, text)
    head = text_ids(tokenizer, text[:at + len(subject)])
    target_ids = text_ids(tokenizer, " " + target.strip())
    if not ids or not head or not target_ids:
        raise DataError("the prompt, subject or target tokenises to nothing")
    return Fact(ids, min(len(head), len(ids)) - 1, target_ids)


def _start_ids(tokenizer: Any) -> list[int]:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return [int(tid)]
    return []


@torch.no_grad()
def sample_prefixes(model: torch.nn.Module, start: Sequence[int], spec: Sequence[tuple[int, int]], seed: int,
                    eos: int | None = None, top_k: int = 5) -> list[list[int]]:
    """Context prefixes sampled from the model (top-k, seeded), cut at EOS: `count` of each `length`."""
    if not start:
        return []
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    out: list[list[int]] = []
    for length, count in spec:
        if length <= 0 or count <= 0:
            continue
        ids = torch.tensor([list(start)] * count, dtype=torch.long, device=dev)
        for _ in range(length):
            logits = model(input_ids=ids).logits[:, -1, :].float().cpu()
            vals, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            pick = torch.multinomial(torch.softmax(vals, -1), 1, generator=gen)
            ids = torch.cat([ids, idx.gather(1, pick).to(dev)], dim=1)
        for row in ids[:, len(start):].tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            out.append(row)
    return out


@torch.no_grad()
def compute_key(model: torch.nn.Module, layout: Layout, layer: int, contexts: Sequence[Sequence[int]],
                positions: Sequence[int], pad: int) -> torch.Tensor:
    """Mean input of the layer's down projection at `positions` (one per context): fp32 [d_in]."""
    proj = module(model, layout.mlp_out[layer])
    box: dict[str, torch.Tensor] = {}
    handle = proj.register_forward_pre_hook(lambda _m, args: box.__setitem__("x", args[0].detach()))
    try:
        ids, mask = right_pad(contexts, pad)
        dev = model_device(model)
        model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
    finally:
        handle.remove()
    x = box["x"].float()
    rows = torch.arange(len(contexts), device=x.device)
    return x[rows, torch.tensor(list(positions), device=x.device)].mean(0).cpu()


def down_proj_matrix(model: torch.nn.Module, layout: Layout, layer: int) -> torch.Tensor:
    """The layer's down projection as a fp32 [d_out, d_in] matrix (Conv1D weights transposed)."""
    name = layout.mlp_out[layer]
    w = module(model, name).weight.detach().float()  # type: ignore[operator]  # a Linear/Conv1D weight
    return w.t() if name in layout.transposed else w


@dataclass
class ValueResult:
    """The optimised delta and how the optimisation went."""

    delta: torch.Tensor
    losses: list[float]
    nll: list[float]
    steps: int


def optimise_value(model: torch.nn.Module, layout: Layout, layer: int, fact: Fact,
                   prefixes: Sequence[Sequence[int]], start: Sequence[int], kl_ids: Sequence[int],
                   kl_subject_last: int, v0_norm: float, pad: int, *, steps: int = 25, lr: float = 0.5,
                   kl_factor: float = 0.0625, weight_decay: float = 1e-3, clamp_norm_factor: float = 4.0,
                   stop_loss: float = 5e-2, on_step: Callable[[int, float], None] | None = None) -> ValueResult:
    """Adam on delta, added to the MLP output at the subject's last token of every prompt.

    Loss: mean over the prefixed prompts of the mean target-token NLL, plus
    kl_factor * KL(original || edited) of the next token after "{subject} is a", plus
    weight_decay * ||delta||^2 / ||v0||^2; delta is clamped to clamp_norm_factor * ||v0||.
    Stops early when the NLL falls below `stop_loss`. `on_step(step, loss)` reports progress.
    """
    dev = next(model.parameters()).device
    seqs, subj, tgt_start = [], [], []
    for pre in [[], *prefixes]:
        ctx = list(start) + list(pre) + fact.prompt_ids
        seqs.append(ctx + fact.target_ids)
        subj.append(len(start) + len(pre) + fact.subject_last)
        tgt_start.append(len(ctx))
    seqs.append(list(start) + list(kl_ids))
    subj.append(len(start) + kl_subject_last)
    n_rw = len(seqs) - 1
    ids, mask = (t.to(dev) for t in right_pad(seqs, pad))
    rows = torch.arange(len(seqs), device=dev)
    subj_t = torch.tensor(subj, device=dev)
    kl_last = len(seqs[-1]) - 1
    n_t = len(fact.target_ids)
    pred_pos = torch.tensor([[s - 1 + j for j in range(n_t)] for s in tgt_start], device=dev)  # [n_rw, n_t]
    tgt = torch.tensor(fact.target_ids, device=dev).expand(n_rw, n_t)

    d_model = down_proj_matrix(model, layout, layer).shape[0]
    delta = torch.zeros(d_model, device=dev, requires_grad=True)
    mlp = module(model, layout.parent(layout.mlp_out[layer]))

    def add_delta(_m: torch.nn.Module, _inp: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            o = out[0].clone()
            o[rows, subj_t] = o[rows, subj_t] + delta
            return (o, *out[1:])
        o = out.clone()
        o[rows, subj_t] = o[rows, subj_t] + delta
        return o

    with torch.no_grad():
        base_kl = torch.log_softmax(model(input_ids=ids[-1:], attention_mask=mask[-1:]).logits[0, kl_last].float(), -1)
    opt = torch.optim.Adam([delta], lr=lr)
    max_norm = clamp_norm_factor * v0_norm
    handle = mlp.register_forward_hook(add_delta)
    losses: list[float] = []
    nlls: list[float] = []
    try:
        for _ in range(steps):
            opt.zero_grad()
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            tok_lp = logp[:n_rw].gather(1, pred_pos.unsqueeze(-1).expand(-1, -1, logp.shape[-1]))
            tok_lp = tok_lp.gather(2, tgt.unsqueeze(-1)).squeeze(-1)  # [n_rw, n_t]
            nll = -tok_lp.mean(1).mean()
            kl_lp = logp[-1, kl_last]
            kl = (base_kl.exp() * (base_kl - kl_lp)).sum()
            wd = weight_decay * delta.pow(2).sum() / max(v0_norm, 1e-12) ** 2
            loss = nll + kl_factor * kl + wd
            losses.append(float(loss.detach()))
            nlls.append(float(nll.detach()))
            if on_step is not None:
                on_step(len(losses), losses[-1])
            if nlls[-1] < stop_loss:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                n = delta.norm()
                if float(n) > max_norm:
                    delta.mul_(max_norm / n)
    finally:
        handle.remove()
    return ValueResult(delta.detach().float().cpu(), losses, nlls, len(losses))


def rome_vectors(W: torch.Tensor, k: torch.Tensor, v_star: torch.Tensor,
                 C: torch.Tensor | None = None, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) with W + u v^T = W + (v* - W k*)(C^-1 k*)^T / ((C^-1 k*)^T k*) (C = I when None).

    W is [d_out, d_in] (any dtype; math in float64). A relative ridge `ridge * mean(diag C)`
    keeps a rank-deficient C (a small corpus) invertible; it changes the direction of
    the update, never the fact that the updated W maps k* to v*.
    """
    Wd, kd, vd = W.double(), k.double(), v_star.double()
    if C is None:
        c = kd.clone()
    else:
        Cd = C.double()
        lam = ridge * float(Cd.diagonal().mean().clamp(min=1e-12))
        c = torch.linalg.solve(Cd + lam * torch.eye(Cd.shape[0], dtype=torch.float64, device=Cd.device), kd)
    denom = float(c @ kd)
    if not math.isfinite(denom) or abs(denom) < 1e-20:
        raise SurgeryError("the key k* is (numerically) zero in the covariance metric: pick another layer or no_cov")
    u = vd - Wd @ kd
    return u.float(), (c / denom).float()


# --- covariance ----------------------------------------------------------------------------------


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts of a JSONL corpus: "text", else "prompt" + " " + "response", else "prompt", per line."""
    texts: list[str] = []
    for lineno, row in enumerate(read_jsonl(path, (), limit), 1):
        if isinstance(row.get("text"), str):
            texts.append(row["text"])
        elif isinstance(row.get("prompt"), str):
            resp = row.get("response")
            texts.append(row["prompt"] + (" " + resp if isinstance(resp, str) else ""))
        else:
            raise DataError(f"{path}: record {lineno} needs a string 'text' or 'prompt' field")
    return texts


@torch.no_grad()
def key_covariance(model: torch.nn.Module, layout: Layout, layer: int, seqs: Sequence[Sequence[int]], pad: int,
                   batch_size: int = 16, progress: bool = True) -> tuple[torch.Tensor, int]:
    """Uncentred second moment E[k k^T] of the layer's down-projection inputs over all tokens: (fp32, count)."""
    from surgery.kernels import covariance
    from surgery.progress import track

    proj = module(model, layout.mlp_out[layer])
    dev = next(model.parameters()).device
    box: dict[str, torch.Tensor] = {}
    handle = proj.register_forward_pre_hook(lambda _m, args: box.__setitem__("x", args[0].detach()))
    total: torch.Tensor | None = None
    count = 0
    batches = range(0, len(seqs), batch_size)
    try:
        for i in track(batches, description="key covariance") if progress else batches:
            ids, mask = (t.to(dev) for t in right_pad(seqs[i:i + batch_size], pad))
            model(input_ids=ids, attention_mask=mask)
            c = covariance(box["x"], mask.bool())
            total = c if total is None else total + c
            count += int(mask.sum())
    finally:
        handle.remove()
    if total is None or count == 0:
        raise DataError("the covariance corpus produced no tokens")
    return (total.double() / count).float().cpu(), count


def default_cache_dir() -> Path:
    """Where key statistics are cached: $SURGERY_CACHE_DIR, else ~/.cache/surgery/rome."""
    env = os.environ.get("SURGERY_CACHE_DIR")
    return Path(env) / "rome" if env else Path.home() / ".cache" / "surgery" / "rome"


def cached_covariance(model: torch.nn.Module, tokenizer: Any, layout: Layout, layer: int, tensor_name: str,
                      model_fingerprint: str, data: str | Path, *, limit: int = 1000, max_length: int = 128,
                      cache_dir: str | Path | None = None, batch_size: int = 16,
                      progress: bool = True) -> tuple[torch.Tensor, int, Path, bool]:
    """C for `tensor_name` over the corpus `data`, from the cache when present: (C, tokens, path, hit).

    The cache file name is keyed by the model fingerprint, the tensor, the data file's
    sha256 and the sampling settings, so a changed model or corpus never hits a stale entry.
    """
    from safetensors import safe_open

    from surgery.io.writer import write_tensors

    data = Path(data)
    texts = read_texts(data, limit)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    key = hashlib.sha256(f"{model_fingerprint}|{tensor_name}|{digest}|{limit}|{max_length}".encode()).hexdigest()
    path = Path(cache_dir or default_cache_dir()) / f"cov-{key[:24]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                return f.get_tensor("cov").float(), int(f.get_tensor("count")[0]), path, True
        except Exception:  # noqa: BLE001 - a broken cache entry is recomputed
            pass
    start = _start_ids(tokenizer)
    seqs = [start + text_ids(tokenizer, t)[:max_length - len(start)]
            for t in texts]
    seqs = [s for s in seqs if s]
    C, count = key_covariance(model, layout, layer, seqs, pad_id(tokenizer), batch_size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_fingerprint, "tensor": tensor_name, "data_sha256": digest, "limit": str(limit),
            "max_length": str(max_length), "tokens": str(count)}
    write_tensors(path, {"cov": C.contiguous(), "count": torch.tensor([count], dtype=torch.int64)}, metadata=meta,
                  force=True)
    return C, count, path, False


# --- measurements ------------------------------------------------------------------------------------


@torch.no_grad()
def target_stats(model: torch.nn.Module, start: Sequence[int], fact: Fact) -> tuple[float, float]:
    """(P(target | prompt), teacher-forced token accuracy of the target) on the bare prompt."""
    seq = list(start) + fact.prompt_ids + fact.target_ids
    dev = next(model.parameters()).device
    logp = torch.log_softmax(model(input_ids=torch.tensor([seq], device=dev)).logits[0].float(), -1)
    s = len(start) + len(fact.prompt_ids)
    preds = logp[s - 1:s - 1 + len(fact.target_ids)]
    tgt = torch.tensor(fact.target_ids, device=dev)
    lp = preds.gather(1, tgt.unsqueeze(1)).sum()
    acc = (preds.argmax(-1) == tgt).float().mean()
    return float(lp.exp()), float(acc)


# --- config and driver ---------------------------------------------------------------------------------


def parse_prefixes(items: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """`("5x10", "10x10")` -> ((5, 10), (10, 10)); `()` or `("none",)` -> () (the bare prompt only)."""
    if all(i.strip().lower() in ("", "none", "0") for i in items):
        return ()
    spec = []
    for part in items:
        try:
            length, count = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise ConfigError(f"rome: prefixes takes LENGTHxCOUNT items like 5x10,10x10, got {part!r}") from None
        if length < 0 or count < 0:
            raise ConfigError(f"rome: prefixes lengths and counts must be non-negative, got {part!r}")
        spec.append((length, count))
    return tuple(spec)


@dataclass(frozen=True, kw_only=True)
class RomeConfig(MethodConfig):
    """ROME's options; defaults are the paper's (25 Adam steps, lr 0.5, KL factor 0.0625, 5x10 and 10x10 prefixes)."""

    method = "rome"
    prompt: str = option(help='Prompt about the subject; "{}" marks the subject (else it is found).')
    subject: str = option(help="The subject whose last token carries the key.")
    target: str = option(help="The new continuation to teach.")
    layer: int | None = option(None, "Layer whose MLP down projection is edited (default about 0.17 L).", low=0)
    no_cov: bool = option(False, "Use C = I (EasyEdit's mom2_adjustment=false); the default without a corpus.")
    cov_samples: int = option(1000, "Corpus lines used for C.", low=1)
    cov_max_length: int = option(128, "Tokens per corpus line used for C.", low=1)
    steps: int = option(25, "Adam steps on the value vector.", low=0)
    lr: float = option(0.5, "Adam learning rate of the value vector.", low=0.0, low_open=True)
    kl_factor: float = option(0.0625, "Weight of the KL term that keeps \"{subject} is a\" unchanged.", low=0.0)
    weight_decay: float = option(1e-3, "Weight of ||delta||^2 / ||W k*||^2 in the loss.", low=0.0)
    clamp_norm_factor: float = option(4.0, "||delta|| is clamped to this multiple of ||W k*||.", low=0.0,
                                      low_open=True)
    prefixes: tuple[str, ...] = option(("5x10", "10x10"), "Context prefixes sampled from the model: LENGTHxCOUNT,... "
                                                          "('none' for the bare prompt only).")
    seed: int = option(0, "Seed of the prefix sampling.")
    ridge: float = option(1e-4, "Relative ridge added to C (times its mean diagonal) to keep it invertible.", low=0.0)

    def validate(self) -> None:
        parse_prefixes(self.prefixes)


def run(config: RomeConfig, inputs: Mapping[str, Any], out: str | Path, runtime: Runtime = Runtime(), *,
        cache_dir: str | Path | None = None, locality_prompts: Sequence[str] | None = None) -> Report:
    """Edit `inputs["model"]` so that `config.prompt` (about `subject`) continues with `target`; write `out`.

    `inputs["corpus"]` is a JSONL corpus for C (cached in `cache_dir`); without it (or with
    `no_cov`) C = I. `report.metrics` records the target probability before and after on the
    bare prompt and the mean next-token KL(before || after) on unrelated prompts
    (`locality_prompts`, else the first 16 corpus texts, else the sampled context prefixes);
    k*, v*, u, v and delta are written beside the weights as `rome_vectors.safetensors`.
    """
    from surgery.io.atomic import check_no_overlap, check_output
    from surgery.io.checkpoint import Checkpoint
    from surgery.io.provenance import provenance
    from surgery.io.writer import write_tensors
    from surgery.kernels import rank_one_update_
    from surgery.pipeline.rewrite import rewrite_checkpoint

    t0 = time.perf_counter()
    cov_data = inputs.get("corpus")
    if cov_data is not None and config.no_cov:
        raise ConfigError("rome: a covariance corpus and no_cov exclude each other: pick one")
    check_output(out, runtime.force, inputs)
    if cache_dir is not None:  # the covariance cache is written there: never into an input
        check_no_overlap(cache_dir, inputs)
    ckpt = Checkpoint.open(inputs["model"])
    if ckpt.directory is None or ckpt.config() is None:
        raise InputNotFoundError(f"{inputs['model']} is not a Hugging Face model directory (needs config.json)")
    torch.manual_seed(config.seed)
    tok = load_tokenizer(ckpt.directory)
    model = load_causal_lm(ckpt.directory, device=default_device(runtime.device)).requires_grad_(False)
    layout = residual_layout(model)
    L = layout.n_layers
    layer = default_layer(L) if config.layer is None else config.layer
    if not 0 <= layer < L:
        raise ConfigError(f"rome: layer must be in [0, {L - 1}] for this {L}-layer model, got {layer}")
    name = f"{layout.mlp_out[layer]}.weight"
    if name not in ckpt:
        raise SurgeryError(f"the checkpoint has no tensor {name}: its names do not follow the model's")
    fact = tokenize_fact(tok, config.prompt, config.subject, config.target)
    kl_fact = tokenize_fact(tok, "{} is a", config.subject, "a")
    start = _start_ids(tok)
    pad = pad_id(tok)
    prefix_ids = sample_prefixes(model, start, parse_prefixes(config.prefixes), config.seed, eos=tok.eos_token_id)
    prefix_ids = [p for p in prefix_ids if p]

    # k*: mean key over the bare and prefixed prompts
    contexts = [list(start) + p + fact.prompt_ids for p in [[], *prefix_ids]]
    positions = [len(start) + len(p) + fact.subject_last for p in [[], *prefix_ids]]
    k_star = compute_key(model, layout, layer, contexts, positions, pad)
    W = down_proj_matrix(model, layout, layer).cpu()
    v0 = W @ k_star
    v0_norm = float(v0.norm())

    # C
    C = None
    cov_path, cov_tokens, cov_kind = None, None, "identity"
    texts: list[str] = []
    if cov_data is not None:
        C, cov_tokens, path, hit = cached_covariance(model, tok, layout, layer, name, ckpt.fingerprint(), cov_data,
                                                     limit=config.cov_samples, max_length=config.cov_max_length,
                                                     cache_dir=cache_dir, progress=runtime.progress)
        cov_path, cov_kind = str(path), "cached" if hit else "computed"
        texts = read_texts(cov_data, 16)

    # locality prompts and the "before" measurements
    if locality_prompts:
        loc = [start + text_ids(tok, t) for t in locality_prompts]
    elif texts:
        loc = [start + text_ids(tok, t)[:config.cov_max_length] for t in texts]
    else:
        loc = [list(start) + p for p in prefix_ids]
    loc = [s for s in loc if len(s) > 0]
    before = sequence_logprobs(model, loc, pad) if loc else []
    p_before, acc_before = target_stats(model, start, fact)

    # v*
    from surgery.progress import Status

    steps = config.steps
    with Status("ROME: optimising v*") as status:
        val = optimise_value(model, layout, layer, fact, prefix_ids, start, kl_fact.prompt_ids,
                             kl_fact.subject_last, v0_norm, pad, steps=steps, lr=config.lr,
                             kl_factor=config.kl_factor, weight_decay=config.weight_decay,
                             clamp_norm_factor=config.clamp_norm_factor,
                             on_step=(lambda i, loss: status.update(f"step {i}/{steps} loss {loss:.3f}"))
                             if runtime.progress else None)
    v_star = v0 + val.delta
    u, v = rome_vectors(W, k_star, v_star, C, config.ridge)
    transposed = layout.mlp_out[layer] in layout.transposed

    def update_(t: torch.Tensor) -> None:
        if transposed:
            rank_one_update_(t, v.to(t.device), u.to(t.device))
        else:
            rank_one_update_(t, u.to(t.device), v.to(t.device))

    # apply in memory to measure, then stream the checkpoint with the same update
    proj = module(model, layout.mlp_out[layer])
    with torch.no_grad():
        update_(proj.weight.data)  # type: ignore[union-attr,arg-type]  # a Linear/Conv1D weight
    p_after, acc_after = target_stats(model, start, fact)
    after = sequence_logprobs(model, loc, pad) if loc else []
    locality = kl_divergence(torch.cat(before), torch.cat(after)) if loc else float("nan")
    del model

    report = Report("rome", config.to_dict())
    report.metrics = {
        "tensor": name, "layer": layer, "target_prob_before": p_before, "target_prob_after": p_after,
        "target_acc_before": acc_before, "target_acc_after": acc_after,
        "locality_kl": locality if math.isfinite(locality) else None, "n_locality": len(loc),
        "delta_norm": float(val.delta.norm()), "v0_norm": v0_norm, "k_norm": float(k_star.norm()),
        "u_norm": float(u.norm()), "v_norm": float(v.norm()), "steps": val.steps, "losses": val.losses,
        "nll": val.nll, "covariance": cov_kind, "cov_tokens": cov_tokens, "cov_path": cov_path,
        "n_prefixes": len(prefix_ids), "vectors_file": str(Path(out) / VECTORS_FILE),
    }
    data = {"corpus": cov_data} if cov_data is not None else {}
    vectors = {"k_star": k_star, "v_star": v_star, "u": u, "v": v, "delta": val.delta}
    with tempfile.TemporaryDirectory() as td:
        meta = {**provenance(report.method, report.config, {"model": ckpt, **data}), "tensor": name,
                "layer": str(layer)}
        vec_bytes = write_tensors(Path(td) / VECTORS_FILE, {k: t.contiguous() for k, t in vectors.items()},
                                  metadata=meta).read_bytes()

    def edit(_name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        update_(t)
        return t

    report.seconds["edit"] = time.perf_counter() - t0
    return rewrite_checkpoint(ckpt, out, report, edit=edit, names={name}, inputs=data,
                              extra_files={VECTORS_FILE: vec_bytes}, shard_size=runtime.shard_size,
                              force=runtime.force, started=t0)


def rome_edit(model: str | Path, out: str | Path, *, cov_data: str | Path | None = None,
              prefixes: Sequence[tuple[int, int]] | Sequence[str] = DEFAULT_PREFIXES,
              cache_dir: str | Path | None = None, locality_prompts: Sequence[str] | None = None,
              runtime: Runtime = Runtime(), **options: Any) -> Report:
    """`run` with the config's fields as keyword arguments:
    `rome_edit(model, out, prompt=P, subject=S, target=T, prefixes=((5, 10),), cov_data=corpus)`."""
    items = tuple(p if isinstance(p, str) else f"{p[0]}x{p[1]}" for p in prefixes)
    inputs = {"model": model} if cov_data is None else {"model": model, "corpus": cov_data}
    return run(RomeConfig(prefixes=items, **options), inputs, out, runtime, cache_dir=cache_dir,
               locality_prompts=locality_prompts)


def load_vectors(path: str | Path) -> dict[str, torch.Tensor]:
    """k_star, v_star, u, v, delta of an edit: the output directory or its `rome_vectors.safetensors`."""
    from safetensors.torch import load_file

    p = Path(path)
    return load_file(str(p / VECTORS_FILE if p.is_dir() else p))
