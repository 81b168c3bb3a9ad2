"""Tiny models and tokenizers built locally, for the demo, tests and benchmarks (no downloads)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[EOS]"]
CHAT_WORDS = ["user", "assistant", "system", ":"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"


def word_tokenizer(texts: Iterable[str], chat: bool = False, max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer whose vocabulary is every word and punctuation mark in `texts`."""
    pre = pre_tokenizers.Whitespace()
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIALS)}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    if chat:
        for word in CHAT_WORDS:
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", model_max_length=max_length)
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_gpt2(vocab_size: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 128) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 small enough to train on a CPU in a minute."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)
