"""Scoring: next-token log-probabilities of a causal LM (batched, padded) and KL divergences.

Every score is fp32 on the CPU and does not depend on batching or padding: left-padded
batches carry an attention mask and position ids counted from each row's first real token,
right-padded ones a mask (their real tokens already sit at positions 0..n-1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from surgery.model.encoding import left_padded_batches, right_pad

__all__ = ["kl_divergence", "model_device", "next_token_logprobs", "sequence_logprobs"]


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


@torch.no_grad()
def next_token_logprobs(model: Any, seqs: Sequence[Sequence[int]], pad: int, batch_size: int = 32) -> torch.Tensor:
    """Log-probabilities [n, vocab] (fp32, CPU) of the token after each id sequence (left-padded batches)."""
    rows = []
    for batch in left_padded_batches(seqs, pad, batch_size, model_device(model)):
        logits = model(**batch, logits_to_keep=1).logits[:, -1, :]
        rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(rows)


@torch.no_grad()
def sequence_logprobs(model: Any, seqs: Sequence[Sequence[int]], pad: int) -> list[torch.Tensor]:
    """Per sequence, the next-token log-probabilities at every position: fp32 [len, vocab] each (one batch)."""
    ids, mask = right_pad(seqs, pad)
    dev = model_device(model)
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    return [logp[i, :len(s)] for i, s in enumerate(seqs)]


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean over rows of KL(ref || other) = sum_v p_ref (log p_ref - log p_other), from log-probabilities.

    Rows are the last dimension's distributions; float64 math; an exact 0 for equal inputs.
    """
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"vocabularies differ: {tuple(ref_logprobs.shape)} vs {tuple(logprobs.shape)}")
    ref, new = ref_logprobs.double(), logprobs.double()
    value = float((ref.exp() * (ref - new)).sum(-1).mean())
    return 0.0 if math.isclose(value, 0.0, abs_tol=1e-12) else value
