"""A huge calibration line is tokenized only up to a bound derived from --max-length; results are unchanged."""

from __future__ import annotations

import json
import logging
import random

import pytest

import surgery.calib.data as data
import surgery.model.encoding as encoding
from surgery.calib.data import chars_per_token, tokenize_pairs, tokenize_prompts
from surgery.errors import DataError
from surgery.model.encoding import pair_ids as _pair_ids
from surgery.model.encoding import prompt_ids
from surgery.testbed.tokenizer import make_tokenizer

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE tokenizer (GPT-2's scheme) trained in code, with an EOS token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "safety", "model", "weights", "the", "of", "and"]
    corpus = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(200)]
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(corpus, vocab_size=400, min_frequency=2, special_tokens=["</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=trained._tokenizer, eos_token="</s>")


@pytest.fixture(params=["bpe", "word"])
def tok(request, bpe):
    return bpe if request.param == "bpe" else make_tokenizer()


def _text(n_chars: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "safety", "model", "weights", "zebra!", "x", "ÿé", "12"]
    out: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


@pytest.fixture(scope="module")
def huge() -> str:
    """A 50 MB line (a 100 kB stretch of text repeated)."""
    return (_text(100_000) + " ") * 500


@pytest.fixture
def calls(monkeypatch):
    """The length of every string the tokenizer is asked to encode."""
    seen: list[int] = []
    encode = encoding.text_ids

    def recording(tokenizer, text, add_special_tokens=False):
        seen.append(len(text))
        return encode(tokenizer, text, add_special_tokens)

    monkeypatch.setattr(encoding, "text_ids", recording)
    return seen


def test_chars_per_token_is_the_longest_vocabulary_entry(bpe):
    assert chars_per_token(bpe) == max(len(t) for t in bpe.get_vocab())
    ids = bpe(_text(5000))["input_ids"]
    assert max(len(bpe.decode([i])) for i in ids) <= chars_per_token(bpe)


@pytest.mark.parametrize("template", [True, False])
def test_50mb_response_is_cut_before_tokenizing(tok, calls, template, huge):
    assert len(huge) > 50_000_000
    bound = (MAX_LENGTH + 16) * chars_per_token(tok) + 200  # the cut plus the template's own text
    (s,) = tokenize_pairs(tok, [{"prompt": "the model", "response": huge}], MAX_LENGTH, chat_template=template)
    assert calls and max(calls) <= bound, calls
    assert len(s) == MAX_LENGTH
    full, start = _pair_ids(tok, "the model", huge[:200_000], template)  # far past the cut: the reference
    assert s.input_ids.tolist() == full[:MAX_LENGTH]
    assert s.response_mask.tolist() == [i >= start for i in range(MAX_LENGTH)]


def test_50mb_prompt_is_refused_or_cut_without_tokenizing_it(tok, calls, huge):
    bound = (MAX_LENGTH + 16) * chars_per_token(tok) + 200
    with pytest.raises(DataError, match=f"sample 1: the prompt takes more than [0-9]+ tokens, more than the limit "
                                        f"of {MAX_LENGTH}"):
        tokenize_pairs(tok, [{"prompt": huge, "response": "ok"}], MAX_LENGTH)
    assert max(calls) <= bound
    calls.clear()
    (s,) = tokenize_pairs(tok, [{"prompt": huge, "response": "ok"}], MAX_LENGTH, on_overflow="truncate")
    assert max(calls) <= bound and len(s) == MAX_LENGTH and not s.response_mask.any()
    assert s.input_ids.tolist() == prompt_ids(tok, huge[:200_000])[:MAX_LENGTH]
    calls.clear()
    (p,) = tokenize_prompts(tok, [huge], MAX_LENGTH, on_overflow="truncate")
    assert max(calls) <= bound and p.input_ids.tolist() == prompt_ids(tok, huge[:200_000])[:MAX_LENGTH]
    with pytest.raises(DataError, match="the prompt takes more than"):
        tokenize_prompts(tok, [huge], MAX_LENGTH)


@pytest.mark.parametrize("n_chars", [10, 300, 5000])
def test_ordinary_lines_tokenize_as_before(tok, calls, n_chars):
    """Below the bound nothing is cut; just above it the kept tokens equal the uncut tokenization's."""
    prompt, response = _text(40, seed=2), _text(n_chars, seed=3)
    (s,) = tokenize_pairs(tok, [{"prompt": prompt, "response": response}], MAX_LENGTH)
    full, start = _pair_ids(tok, prompt, response, True)
    assert s.input_ids.tolist() == full[:MAX_LENGTH]
    assert s.response_mask.tolist() == [i >= start for i in range(min(len(full), MAX_LENGTH))]


def test_a_tokenizer_packing_more_than_the_bound_widens_the_cut(calls):
    """The word-level tokenizer maps any unknown word, however long, to one token: a cut at the
    bound would then fall short, so it widens until the text really overflows (or ends)."""
    tok = make_tokenizer()
    long_word = "q" * (40 * (MAX_LENGTH + 16) * chars_per_token(tok))
    (s,) = tokenize_pairs(tok, [{"prompt": long_word + " the", "response": "the model"}], MAX_LENGTH)
    full, start = _pair_ids(tok, long_word + " the", "the model", True)
    assert s.input_ids.tolist() == full and s.response_mask.tolist() == [i >= start for i in range(len(full))]


def test_warns_when_max_length_exceeds_positions(tmp_path, caplog):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    with caplog.at_level(logging.WARNING, logger="surgery.calib.data"):
        data.warn_beyond_positions(tmp_path, 64)
        assert not caplog.records
        data.warn_beyond_positions(tmp_path, 65)
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: --max-length 65 exceeds the model's max_position_embeddings 64 ({tmp_path}); samples are cut "
        "at 65 tokens, but positions past 64 were never trained"
    ]
