"""Batched greedy generation with left padding and a KV cache.

Why our own loop: it is small, deterministic, works the same for every causal LM in
transformers, and lets us read first-token distributions on the way. It reproduces
`model.generate(do_sample=False)` run one prompt at a time (tested): left padding with
an attention mask and position ids counted from the first real token. Prompts are encoded by
`surgery.model.encoding`; the KV cache is a `DynamicCache` the model fills in place.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from surgery.model.encoding import left_pad, pad_id, position_ids, prompt_ids
from surgery.model.scoring import model_device


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends a generation (tokenizer EOS and the model's generation config)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    return ids


def _cache_argument(model: Any) -> str:
    """The forward keyword that takes the KV cache: `cache` on current transformers (`past_key_values`
    is deprecated there), `past_key_values` on the 5.x releases before it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: Any) -> Any:
    """An empty `DynamicCache` for `model`; the forward fills it in place, step by step."""
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return DynamicCache(config=base.config)


@torch.no_grad()
def greedy_generate_ids(model: Any, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                        eos: set[int], pad_id: int) -> list[list[int]]:
    """Greedy-decode one batch of prompt id lists; returns the new ids of each, without the EOS."""
    device = model_device(model)
    ids, mask = left_pad(prompts_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = position_ids(mask)
    n = ids.shape[0]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    out = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    eos_t = torch.tensor(sorted(eos) or [-1], device=device)
    cache = {_cache_argument(model): new_cache(model)}
    step_ids, step_pos = ids, pos
    for t in range(max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **cache)
        nxt = res.logits[:, -1, :].float().argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        done = done | torch.isin(nxt, eos_t)
        if bool(done.all()):
            out = out[:, : t + 1]
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        step_pos = step_pos[:, -1:] + 1
        step_ids = nxt[:, None]
    result = []
    for row in out.tolist():
        gen = []
        for tok in row:
            if tok in eos:
                break
            gen.append(tok)
        result.append(gen)
    return result


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
             batch_size: int = 32, chat_template: bool = True, progress: bool = False) -> list[str]:
    """Greedy answers to `prompts` (decoded, special tokens skipped), batched by length."""
    model.eval()
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    encoded = [prompt_ids(tokenizer, p, chat_template) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    answers: list[str] = [""] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    track = _track(batches, "generate") if progress else batches
    for batch in track:
        new = greedy_generate_ids(model, [encoded[i] for i in batch], max_new_tokens=max_new_tokens,
                                  eos=eos, pad_id=pad)
        for i, ids in zip(batch, new, strict=True):
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return answers


def _track(items: list, desc: str):  # noqa: ANN202 - a thin wrapper
    try:
        from surgery.progress import track  # type: ignore[import-not-found]

        return track(items, description=desc)
    except Exception:  # noqa: BLE001 - progress is optional
        return items
