"""Supervised fine-tuning: alignment SFT, the harmful fine-tuning attack, and user fine-tuning.

The harmful fine-tuning protocol of the literature (Vaccine, Lisa, Booster, Antidote):
a user data set of n pairs where a share p is replaced by harmful prompt + compliant
answer pairs (`int(p*n)` harmful, the rest benign), trained with the loss on response
tokens only. The pieces are separate so that defenses can reuse them:

- `mix_pairs` (the poisoning), `encode_pairs` + `collate` (response masks),
- `train_loop(model, samples, ...)` with hooks `prepare_model(model)` (e.g. add a fixed
  projection) and `after_backward(model)` (e.g. zero the gradients of frozen weights),
- `finetune(model_dir, pairs, out, ...)` which loads, wraps in peft LoRA (or trains all
  weights with `full=True`), trains, and writes an adapter or a model atomically with its
  training configuration in `surgery_finetune.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.errors import DataError
from surgery.io.atomic import atomic_path, check_output
from surgery.model.encoding import pad_id, pair_ids, right_pad
from surgery.model.load import default_device, load_causal_lm, load_tokenizer, model_directory
from surgery.progress import Status

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG_NAME = "surgery_finetune.json"

Hook = Callable[[torch.nn.Module], None]


@dataclass
class Sample:
    """One tokenized training example: ids and labels (-100 on prompt tokens)."""

    input_ids: list[int]
    labels: list[int]


def mix_pairs(train_pairs: Sequence[dict], harmful_pairs: Sequence[dict] | None = None, ratio: float = 0.1,
              n: int | None = None, seed: int = 0) -> list[dict]:
    """Poison a data set the way the harmful fine-tuning papers do.

    Of `n` examples (default: all of `train_pairs`), `int(ratio * n)` are harmful pairs
    (sampled without replacement while they last, in a seeded order) and the rest the
    first benign pairs; the result is shuffled with `seed`.
    """
    if not train_pairs:
        raise DataError("fine-tuning data is empty: give at least one {prompt, response} pair")
    n = len(train_pairs) if n is None else n
    if not 0.0 <= ratio <= 1.0:
        raise DataError(f"harmful ratio must be in [0, 1], got {ratio}")
    rng = random.Random(seed)
    k = int(ratio * n) if harmful_pairs else 0
    harmful: list[dict] = []
    if k:
        pool = list(harmful_pairs)  # type: ignore[arg-type]
        while len(harmful) < k:
            order = pool[:]
            rng.shuffle(order)
            harmful += order[: k - len(harmful)]
    benign = [train_pairs[i % len(train_pairs)] for i in range(n - k)]
    mixed = [dict(p) for p in benign + harmful]
    rng.shuffle(mixed)
    return mixed


def encode_pairs(tokenizer: Any, pairs: Sequence[dict], max_length: int = 256,
                 chat_template: bool = True) -> list[Sample]:
    """Tokenize {prompt, response} pairs as `surgery.model.encoding.pair_ids` does (the chat template's
    user and assistant turns when there is one, else prompt + response + EOS).

    Labels are -100 on the prompt so the loss only teaches the response. Truncated to
    `max_length` tokens from the right.
    """
    samples = []
    for i, pair in enumerate(pairs):
        if "prompt" not in pair or "response" not in pair:
            raise DataError(f"pair {i} lacks 'prompt' or 'response': training data needs both fields")
        ids, start = pair_ids(tokenizer, pair["prompt"], pair["response"], chat_template)
        labels = [-100] * start + ids[start:]
        samples.append(Sample(ids[:max_length], labels[:max_length]))
    return samples


def collate(batch: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into input_ids, attention_mask and labels tensors."""
    ids, mask = right_pad([s.input_ids for s in batch], pad_id)
    labels, _ = right_pad([s.labels for s in batch], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_loop(model: torch.nn.Module, samples: Sequence[Sample], *, pad_id: int, epochs: float = 3,
               lr: float = 1e-3, batch_size: int = 16, seed: int = 0, weight_decay: float = 0.0,
               warmup: float = 0.05, max_grad_norm: float | None = 1.0, device: torch.device | None = None,
               prepare_model: Hook | None = None, after_backward: Hook | None = None,
               progress: bool = True, desc: str = "fine-tune") -> list[float]:
    """Train the trainable parameters of `model` on `samples` (AdamW, warmup then linear decay).

    Deterministic for a seed: the batch order comes from a seeded generator. `epochs` may
    be fractional. `prepare_model` runs once before training, `after_backward` after each
    backward pass (before clipping and the optimizer step). Returns the loss per step.
    """
    if not samples:
        raise DataError("no training samples")
    device = default_device(device)
    model.to(device)
    if prepare_model is not None:
        prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DataError("the model has no trainable parameters")
    # foreach: one multi-tensor step instead of a Python loop over parameters (same arithmetic)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    per_epoch = math.ceil(len(samples) / batch_size)
    total = max(1, int(round(per_epoch * epochs)))
    n_warm = int(warmup * total)

    def lr_at(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return max(0.0, (total - step) / max(1, total - n_warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    losses: list[float] = []
    order: list[int] = []
    with Status(desc) if progress else contextlib.nullcontext() as status:
        for step in range(total):
            if len(order) < batch_size:
                order += torch.randperm(len(samples), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            batch = {k: v.to(device) for k, v in collate([samples[i] for i in idx], pad_id).items()}
            loss = model(**batch).loss
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if status is not None:
                status.update(f"step {step + 1}/{total} loss {losses[-1]:.4f}")
    model.eval()
    return losses


def _fingerprint(pairs: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps(p, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def finetune(model_dir: str | Path, train_pairs: Sequence[dict], out: str | Path, *,
             harmful_pairs: Sequence[dict] | None = None, ratio: float = 0.1, n: int | None = None,
             lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
             targets: Sequence[str] | None = None, epochs: float = 3, lr: float = 1e-3, batch_size: int = 16,
             seed: int = 0, full: bool = False, max_length: int = 256, chat_template: bool = True,
             weight_decay: float = 0.0, warmup: float = 0.05, device: str | torch.device | None = None,
             prepare_model: Hook | None = None, after_backward: Hook | None = None,
             force: bool = False, progress: bool = True, extra_config: dict | None = None,
             base_name: str | None = None, inputs: Mapping[str, Any] | None = None) -> Path:
    """Fine-tune `model_dir` on `train_pairs` (poisoned with `harmful_pairs` at share `ratio`).

    Writes a peft LoRA adapter (r, alpha on `targets`, default all attention and MLP
    projections) or, with `full=True`, a whole model with its tokenizer, into `out`
    atomically; `out/surgery_finetune.json` records the configuration. `base_name` is
    what the adapter config records as its base model (default: `model_dir`). `inputs`: the
    command's other input paths by role (data files, a mask, a SaLoRA module); `out` may not
    overlap them or `model_dir`. Returns `out`.
    """
    guarded = {"MODEL": model_dir, **(inputs or {})}
    out = check_output(out, force, guarded)
    torch.manual_seed(seed)
    tok = load_tokenizer(model_directory(model_dir))
    model = load_causal_lm(model_dir)
    mixed = mix_pairs(train_pairs, harmful_pairs, ratio=ratio, n=n, seed=seed)
    samples = encode_pairs(tok, mixed, max_length=max_length, chat_template=chat_template)
    pad = pad_id(tok)
    targets = list(targets or DEFAULT_TARGETS)
    if not full:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                         bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft's deprecation noise from transformers
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, cfg)
        model.peft_config["default"].base_model_name_or_path = base_name or str(model_dir)
    dev = default_device(device)
    losses = train_loop(model, samples, pad_id=pad, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                        weight_decay=weight_decay, warmup=warmup, device=dev, prepare_model=prepare_model,
                        after_backward=after_backward, progress=progress,
                        desc="full fine-tune" if full else "LoRA fine-tune")
    n_harm = int(ratio * len(mixed)) if harmful_pairs else 0
    record = {
        "method": "finetune", "base_model": base_name or str(model_dir), "full": full, "epochs": epochs, "lr": lr,
        "batch_size": batch_size, "seed": seed, "max_length": max_length, "chat_template": chat_template,
        "weight_decay": weight_decay, "warmup": warmup,
        "lora": None if full else {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "targets": targets},
        "n_examples": len(mixed), "n_harmful": n_harm, "ratio": ratio if harmful_pairs else 0.0,
        "train_sha256": _fingerprint(train_pairs),
        "harmful_sha256": _fingerprint(harmful_pairs) if harmful_pairs else None,
        "steps": len(losses), "final_loss": losses[-1], "first_loss": losses[0],
        **(extra_config or {}),
    }
    model.to("cpu")
    with atomic_path(out, force, guarded) as tmp:
        if full:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        else:  # no hub look-up for the base's vocabulary: embeddings are not trained here
            model.save_pretrained(tmp, save_embedding_layers=False)
            # peft's boilerplate model card records the local (temporary) base path: drop it
            (tmp / "README.md").unlink(missing_ok=True)
            _sort_target_modules(tmp / "adapter_config.json")
        (tmp / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def _sort_target_modules(config_path: Path) -> None:
    """peft writes `target_modules` from a set, in an order that follows the process's string
    hash seed: sort it so that the same run gives the same bytes in any process."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
