"""Tokenizers with real chat templates, built in code (never downloaded), for the model-layer tests.

`chatml_tokenizer()`: a byte-level BPE (GPT-2 / Qwen style, no BOS) with Qwen2's ChatML template,
whose end of turn `<|im_end|>` is the EOS. `llama_tokenizer()`: the same BPE with a BOS that plain
encoding adds (Llama's post-processor) and a Llama-2 style template that writes `{{ bos_token }}`
itself, so adding special tokens to the rendered text would give two BOS.
"""

from __future__ import annotations

from typing import Any

CORPUS = [
    "how do i bake a cake", "the quick brown fox jumps over the lazy dog", "sure, here is how:",
    "i cannot help with that.", "step one: mix flour and water", "what is the capital of france?",
    "paris is the capital of france.", "tell me a story about a robot",
] * 4

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def _bpe(special: list[str], bos: str | None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def chatml_tokenizer(pad: bool = True) -> Any:
    """Qwen2-style: no BOS, EOS `<|im_end|>`, pad `<|endoftext|>` (none with `pad=False`)."""
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None)
    extra = {"pad_token": "<|endoftext|>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CHATML, **extra)


def llama_tokenizer(template: bool = True) -> Any:
    """Llama-2-style: plain encoding adds BOS `<s>`, EOS `</s>`, no pad token; the template writes the BOS."""
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(["<unk>", "<s>", "</s>"], bos="<s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=LLAMA2 if template else None)
