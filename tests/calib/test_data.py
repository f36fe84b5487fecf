"""Calibration JSONL loading and tokenization: clear errors, correct response spans."""

from __future__ import annotations

import json

import pytest

from surgery.calib.data import load_pairs, load_prompts, tokenize_pairs, tokenize_prompts
from surgery.errors import DataError
from surgery.testbed.tokenizer import make_tokenizer


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_pairs_ok_and_limit(tmp_path):
    p = _write(tmp_path / "c.jsonl", [json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) for i in range(5)] + [""])
    assert [r["prompt"] for r in load_pairs(p)] == [f"p{i}" for i in range(5)]
    assert len(load_pairs(p, limit=2)) == 2
    assert load_prompts(p) == [f"p{i}" for i in range(5)]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "holds no records"),
        (["", "  "], "holds no records"),
        (['{"prompt": "a", "response": "b"}', "{not json"], ":2: not valid JSON"),
        (['{"prompt": "a"}'], ":1: missing field 'response'"),
        (['{"prompt": 3, "response": "b"}'], ":1: field 'prompt' must be a string"),
        (['["prompt", "response"]'], ":1: expected a JSON object"),
    ],
)
def test_load_pairs_errors(tmp_path, lines, message):
    p = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message) as info:
        load_pairs(p)
    assert "\n" not in str(info.value)


def test_load_pairs_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_tokenize_with_chat_template(tok):
    pair = {"prompt": "how do i", "response": "the explain to"}
    (s,) = tokenize_pairs(tok, [pair], 64)
    toks = tok.convert_ids_to_tokens(s.input_ids.tolist())
    assert toks == ["<s>", "<|user|>", "how", "do", "i", "<|assistant|>", "the", "explain", "to", "</s>"]
    assert s.response_mask.tolist() == [False] * 6 + [True] * 4
    (p,) = tokenize_prompts(tok, ["how do i"], 64)
    assert p.input_ids.tolist() == s.input_ids[:6].tolist() and not p.response_mask.any()


def test_tokenize_without_template(tok):
    pair = {"prompt": "how do i", "response": "the explain"}
    (s,) = tokenize_pairs(tok, [pair], 64, chat_template=False)
    assert tok.convert_ids_to_tokens(s.input_ids.tolist()) == ["<s>", "how", "do", "i", "the", "explain", "</s>"]
    assert s.response_mask.tolist() == [False] * 4 + [True] * 3


def test_tokenize_overflow(tok):
    pair = {"prompt": "how do i how do i how do i", "response": "the explain"}
    with pytest.raises(DataError, match="sample 1: the prompt takes 12 tokens, more than the limit of 8"):
        tokenize_pairs(tok, [pair], 8)
    (s,) = tokenize_pairs(tok, [pair], 8, on_overflow="truncate")
    assert len(s) == 8 and not s.response_mask.any()
    (s,) = tokenize_pairs(tok, [pair], 13)  # a long response is cut, not refused
    assert len(s) == 13 and s.response_mask.sum() == 1
