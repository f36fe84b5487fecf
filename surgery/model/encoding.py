"""Prompt encoding: the one rule that turns a prompt (and a response) into token ids, and padding.

With a chat template (the tokenizer has one and `chat_template` is on) the ids are exactly
`tokenizer.apply_chat_template(messages, tokenize=True)`: the rendered conversation encoded
without adding special tokens again (the template writes its own BOS). A prompt is a user turn
with the generation prompt; a pair is a user turn and an assistant turn. Without a template a
prompt is encoded with the tokenizer's special tokens, and a pair is `prompt + "\\n" + response`
(no newline where either side already has white space there) followed by EOS.

Calibration, evaluation, fine-tuning and every method use these functions, so the same prompt
gives the same ids everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "has_chat_template", "left_pad", "left_padded_batches", "pad_id", "pair_ids", "position_ids", "prompt_ids",
    "right_pad", "text_ids",
]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def text_ids(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of plain text (no special tokens unless asked)."""
    return [int(i) for i in tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # apply_chat_template(tokenize=True) encodes its rendering exactly so: no special tokens added
    return text_ids(tokenizer, text, add_special_tokens=False)


def prompt_ids(tokenizer: Any, prompt: str, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt as the model sees it before answering (generation prompt included)."""
    if chat_template and has_chat_template(tokenizer):
        return _template_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return text_ids(tokenizer, prompt, add_special_tokens=True)


def pair_ids(tokenizer: Any, prompt: str, response: str, chat_template: bool = True) -> tuple[list[int], int]:
    """Token ids of a prompt answered by `response`, and the index where the response starts.

    The start is where the prompt-only ids (`prompt_ids`) and the full ids first differ, so
    it never depends on the template's internals; the response part runs to the end (the
    template's end-of-turn tokens, or the EOS without a template, included).
    """
    prefix = prompt_ids(tokenizer, prompt, chat_template)
    if chat_template and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        full = _template_ids(tokenizer, messages, add_generation_prompt=False)
    else:
        sep = "" if not prompt or prompt[-1].isspace() or not response or response[0].isspace() else "\n"
        full = text_ids(tokenizer, prompt + sep + response, add_special_tokens=True)
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int) and (not full or full[-1] != eos):
            full.append(eos)
    start = 0
    limit = min(len(prefix), len(full))
    while start < limit and prefix[start] == full[start]:
        start += 1
    return full, start


def pad_id(tokenizer: Any) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else its EOS, else 0.

    Padded positions are always masked out, so the choice only has to be a valid id.
    """
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, int):
            return tid
    return 0


def left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into (input_ids, attention_mask), both int64 [n, longest]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def right_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (input_ids, attention_mask), both int64 [n, longest]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (0 on left padding), as `generate` does."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def left_padded_batches(seqs: Sequence[Sequence[int]], pad: int, batch_size: int,
                        device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Model inputs (input_ids, attention_mask, position_ids) of left-padded batches of `seqs`, in order."""
    for i in range(0, len(seqs), batch_size):
        ids, mask = left_pad(seqs[i:i + batch_size], pad)
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device),
               "position_ids": position_ids(mask).to(device)}
