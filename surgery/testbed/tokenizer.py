"""The testbed's word-level tokenizer, saved in the standard Hugging Face format.

One token per whitespace-separated word of the synthetic world (the data is written with
spaces around punctuation), so that a tiny model learns fast and every id means a word.
A chat template (`<s><|user|> ... <|assistant|> ... </s>`) makes eval and fine-tuning take
the same code path as on a real chat model.
"""

from __future__ import annotations

from pathlib import Path

from surgery.testbed.world import all_words

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} {{ eos_token }} "
    "{% elif message['role'] == 'system' %}{{ message['content'] }} "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer():  # -> PreTrainedTokenizerFast
    """Build the word-level tokenizer over the world's vocabulary (special tokens first)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + all_words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    # plain (non-chat) encoding starts with BOS; the chat template writes its own BOS
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE, padding_side="left", model_max_length=128,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(out: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (and the chat template) into `out`."""
    make_tokenizer().save_pretrained(str(out))
