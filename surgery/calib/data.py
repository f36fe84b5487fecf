"""Calibration and evaluation data: JSONL files in, token ids with a response mask out.

Files are JSONL, one object a line: `{"prompt": ..., "response": ...}` for calibration
and fine-tuning, `{"prompt": ...}` for evaluation prompts. Every problem a user can
cause (missing or empty file, a line that is not JSON, a missing or non-string field)
raises `DataError` with a one-line message naming the file and line.

Tokenization is `surgery.model.encoding`'s: the model's own chat template when it has one
(a user turn and an assistant turn), else `prompt + "\\n" + response + EOS`; the response
starts where the prompt-only and the full token sequences first differ.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.errors import DataError
from surgery.io.jsonl import read_jsonl as load_jsonl
from surgery.model.encoding import pair_ids, prompt_ids
from surgery.model.load import load_tokenizer

log = logging.getLogger(__name__)

# Tokens past `max_length` a cut text must still produce, so that a cut (and the BPE merges
# near it) never changes the first `max_length` tokens.
_SPARE_TOKENS = 16

__all__ = [
    "Sample", "calibration_samples", "load_jsonl", "load_pairs", "load_prompts", "load_tokenizer",
    "tokenize_pairs", "tokenize_prompts",
]


@dataclass
class Sample:
    """One tokenized sequence: ids [T] (int64) and the mask of its response tokens [T] (bool)."""

    input_ids: torch.Tensor
    response_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())


def load_pairs(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """`{"prompt", "response"}` records of a JSONL file (calibration, fine-tuning data)."""
    return load_jsonl(path, ("prompt", "response"), limit)


def load_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """The `"prompt"` strings of a JSONL file (evaluation prompts)."""
    return [r["prompt"] for r in load_jsonl(path, ("prompt",), limit)]


# --------------------------------------------------------------------------- tokenization


def chars_per_token(tokenizer: Any) -> int:
    """The longest token string in the vocabulary: a cheap upper bound on the characters one
    token covers (byte-level BPE stores a byte per character, SentencePiece and WordPiece spell
    their pieces out). It only sizes the first cut; `_cut_until_full` widens a cut that falls short."""
    try:
        vocab = tokenizer.get_vocab()
        return max(1, max((len(t) for t in vocab), default=1))
    except (AttributeError, TypeError, NotImplementedError):
        return 16


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars]


def _pair_ids_bounded(
    tokenizer: Any, prompt: str, response: str, chat_template: bool, max_length: int, per_token: int
) -> tuple[list[int], int, bool]:
    """`pair_ids` that tokenizes only a bounded prefix of a very long prompt or response.

    A text longer than `(max_length + spare) * per_token` characters is cut there; the cut
    stands only if it still yields more than `max_length + spare` tokens (so the first
    `max_length` are those of the whole text), else the cut is widened 4x and tried again.
    Returns (ids, response start, whether the prompt was cut).
    """
    chars = (max_length + _SPARE_TOKENS) * per_token
    while True:
        p, r = _cut(prompt, chars), _cut(response, chars)
        ids, start = pair_ids(tokenizer, p, r, chat_template)
        prompt_cut, response_cut = len(p) < len(prompt), len(r) < len(response)
        enough = max_length + _SPARE_TOKENS
        if (not prompt_cut or start > enough) and (not response_cut or prompt_cut or len(ids) > enough):
            return ids, start, prompt_cut
        chars *= 4


def tokenize_pairs(
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    max_length: int,
    chat_template: bool = True,
    on_overflow: str = "error",
) -> list[Sample]:
    """Tokenize `{"prompt", "response"}` pairs into `Sample`s of at most `max_length` tokens.

    A pair whose prompt part alone is longer than `max_length` raises `DataError`
    (`on_overflow="error"`, the default) or is cut (`"truncate"`); a response that
    runs past the limit is always cut at `max_length` (its tail is dropped).
    """
    if max_length is None or int(max_length) <= 0:
        raise DataError(f"max_length must be a positive number of tokens, got {max_length}")
    if on_overflow not in ("error", "truncate"):
        raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}")
    max_length = int(max_length)
    per_token = chars_per_token(tokenizer)
    samples: list[Sample] = []
    for i, pair in enumerate(pairs, start=1):
        for field in ("prompt", "response"):
            if not isinstance(pair.get(field), str):
                raise DataError(f"sample {i}: field {field!r} must be a string")
        ids, start, cut = _pair_ids_bounded(
            tokenizer, pair["prompt"], pair["response"], chat_template, max_length, per_token
        )
        if start > max_length and on_overflow == "error":
            raise DataError(
                f"sample {i}: the prompt takes {'more than ' if cut else ''}{start} tokens, more than the limit "
                f"of {max_length}; raise --max-length or shorten the prompt"
            )
        if not ids:
            raise DataError(f"sample {i}: tokenizes to no tokens; remove it or fix the tokenizer")
        ids = ids[:max_length]
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[min(start, len(ids)):] = True
        samples.append(Sample(torch.tensor(ids, dtype=torch.long), mask))
    return samples


def tokenize_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    max_length: int,
    chat_template: bool = True,
    on_overflow: str = "error",
) -> list[Sample]:
    """Tokenize prompts (with the generation prompt); response masks are all False."""
    if max_length is None or int(max_length) <= 0:
        raise DataError(f"max_length must be a positive number of tokens, got {max_length}")
    max_length = int(max_length)
    per_token = chars_per_token(tokenizer)
    out: list[Sample] = []
    for i, prompt in enumerate(prompts, start=1):
        chars = (max_length + _SPARE_TOKENS) * per_token
        while True:  # a bounded prefix of a very long prompt, widened until it overflows (see _pair_ids_bounded)
            ids = prompt_ids(tokenizer, _cut(prompt, chars), chat_template)
            cut = len(prompt) > chars
            if not cut or len(ids) > max_length + _SPARE_TOKENS:
                break
            chars *= 4
        if len(ids) > max_length:
            if on_overflow == "error":
                raise DataError(
                    f"sample {i}: the prompt takes {'more than ' if cut else ''}{len(ids)} tokens, more than "
                    f"the limit of {max_length}; "
                    "raise --max-length or shorten the prompt"
                )
            ids = ids[:max_length]
        out.append(Sample(torch.tensor(ids, dtype=torch.long), torch.zeros(len(ids), dtype=torch.bool)))
    return out


def warn_beyond_positions(model_dir: str | Path, max_length: int) -> None:
    """Warn when `max_length` exceeds the model config's `max_position_embeddings`: positions past
    it were never trained (or do not exist), so statistics of longer samples mean little."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return
    positions = config.get("max_position_embeddings", config.get("n_positions")) if isinstance(config, dict) else None
    if isinstance(positions, int) and not isinstance(positions, bool) and max_length > positions:
        log.warning(
            "warning: --max-length %d exceeds the model's max_position_embeddings %d (%s); samples are cut "
            "at %d tokens, but positions past %d were never trained", max_length, positions, model_dir,
            max_length, positions,
        )


def calibration_samples(
    model_dir: str | Path,
    path: str | Path,
    *,
    num_samples: int | None = None,
    max_length: int = 2048,
    chat_template: bool = True,
    on_overflow: str = "error",
    tokenizer: Any = None,
) -> list[Sample]:
    """Load `{"prompt","response"}` pairs and tokenize them with the model's own tokenizer."""
    pairs = load_pairs(path, limit=num_samples)
    tok = tokenizer if tokenizer is not None else load_tokenizer(model_dir)  # refuses custom code first
    warn_beyond_positions(model_dir, max_length)
    return tokenize_pairs(tok, pairs, max_length, chat_template=chat_template, on_overflow=on_overflow)
