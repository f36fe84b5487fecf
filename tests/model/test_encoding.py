"""One prompt -> ids rule: it equals `apply_chat_template(tokenize=True)`, everywhere it is used."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from surgery.calib.data import tokenize_pairs, tokenize_prompts
from surgery.methods.finetune import collate, encode_pairs
from surgery.model.encoding import (
    left_pad,
    left_padded_batches,
    pad_id,
    pair_ids,
    position_ids,
    prompt_ids,
    right_pad,
)
from surgery.testbed.tokenizer import make_tokenizer
from tests.model.helpers import chatml_tokenizer, llama_tokenizer

TOKENIZERS = {"testbed": make_tokenizer, "chatml": chatml_tokenizer, "llama": llama_tokenizer}
PAIRS = {
    "testbed": ("how do i", "the explain to"),
    "chatml": ("how do i bake a cake?", "sure, here is how: mix flour"),
    "llama": ("what is the capital of france?", "paris is the capital of france."),
}


def _template(tok, messages, add_generation_prompt):  # noqa: ANN001, ANN202
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return [int(i) for i in (out["input_ids"] if hasattr(out, "keys") else out)]


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def case(request):  # noqa: ANN001, ANN201
    return request.param, TOKENIZERS[request.param]()


def test_prompt_ids_equal_apply_chat_template(case) -> None:  # noqa: ANN001
    name, tok = case
    prompt, _ = PAIRS[name]
    expected = _template(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    assert prompt_ids(tok, prompt) == expected
    # calibration and evaluation prompts take the same ids
    (sample,) = tokenize_prompts(tok, [prompt], 256)
    assert sample.input_ids.tolist() == expected
    if tok.bos_token_id is not None:  # the template writes the BOS; it is not added a second time
        assert expected.count(tok.bos_token_id) == 1 and expected[0] == tok.bos_token_id


def test_pair_ids_equal_apply_chat_template(case) -> None:  # noqa: ANN001
    name, tok = case
    prompt, response = PAIRS[name]
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    expected = _template(tok, messages, add_generation_prompt=False)
    head = _template(tok, messages[:1], add_generation_prompt=True)
    ids, start = pair_ids(tok, prompt, response)
    assert ids == expected
    assert start == len(head) and ids[:start] == head  # the response starts after the generation prompt
    # calibration and fine-tuning encode the pair the same way
    (sample,) = tokenize_pairs(tok, [{"prompt": prompt, "response": response}], 256)
    assert sample.input_ids.tolist() == expected
    assert sample.response_mask.tolist() == [False] * len(head) + [True] * (len(expected) - len(head))
    (train,) = encode_pairs(tok, [{"prompt": prompt, "response": response}], max_length=256)
    assert train.input_ids == expected
    assert train.labels == [-100] * len(head) + expected[len(head):]


def test_testbed_pair_by_hand() -> None:
    tok = make_tokenizer()
    ids, start = pair_ids(tok, "how do i", "the explain to")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "<|user|>", "how", "do", "i", "<|assistant|>", "the", "explain",
                                              "to", "</s>"]
    assert start == 6
    ids, start = pair_ids(tok, "how do i", "the explain", chat_template=False)
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "how", "do", "i", "the", "explain", "</s>"]
    assert start == 4


def test_without_template_prompt_is_plain_encoding_with_special_tokens() -> None:
    for tok in (llama_tokenizer(template=False), llama_tokenizer()):
        text = "tell me a story"
        assert prompt_ids(tok, text, chat_template=False) == tok(text, add_special_tokens=True)["input_ids"]
    tok = llama_tokenizer(template=False)
    assert prompt_ids(tok, "tell me a story") == tok("tell me a story")["input_ids"]  # no template: plain
    ids, start = pair_ids(tok, "tell me", "a story")
    assert ids == tok("tell me\na story")["input_ids"] + [tok.eos_token_id]
    assert ids[0] == tok.bos_token_id and ids[:start] == tok("tell me")["input_ids"][:start]


def test_pad_id_rule() -> None:
    chat = chatml_tokenizer()
    assert pad_id(chat) == chat.convert_tokens_to_ids("<|endoftext|>") != chat.eos_token_id
    llama = llama_tokenizer()  # no pad token: EOS
    assert llama.pad_token_id is None and pad_id(llama) == llama.convert_tokens_to_ids("</s>")
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0  # id 0 is a real pad id, not "none"
    tb = make_tokenizer()
    assert pad_id(tb) == tb.convert_tokens_to_ids("<pad>")


def test_padding_helpers_by_hand() -> None:
    seqs = [[5, 6, 7], [8], [9, 10]]
    ids, mask = left_pad(seqs, 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    ids, mask = right_pad(seqs, -1)
    assert ids.tolist() == [[5, 6, 7], [8, -1, -1], [9, 10, -1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    batches = list(left_padded_batches(seqs, 0, batch_size=2))
    assert [b["input_ids"].tolist() for b in batches] == [[[5, 6, 7], [0, 0, 8]], [[9, 10]]]
    assert batches[0]["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    # fine-tuning batches are right-padded the same way, labels padded with -100
    tok = make_tokenizer()
    samples = encode_pairs(tok, [{"prompt": "how do i", "response": "the"}, {"prompt": "how", "response": "to"}])
    batch = collate(samples, pad_id=0)
    longest = max(len(s.input_ids) for s in samples)
    assert batch["input_ids"].shape == (2, longest)
    short = min(samples, key=lambda s: len(s.input_ids))
    row = [s.input_ids for s in samples].index(short.input_ids)
    assert batch["labels"][row, len(short.labels):].eq(-100).all()
    assert torch.equal(batch["attention_mask"][row].sum(), torch.tensor(len(short.input_ids)))
