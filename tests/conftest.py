"""Shared fixtures: tiny random models (seeded) saved as Hugging Face folders
with a character-level tokenizer, so the whole pipeline runs in seconds."""

from __future__ import annotations

import string

import pytest
import torch


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "<s>", "</s>"] + list(string.printable)
    vocab = {c: i for i, c in enumerate(dict.fromkeys(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny Llama saved as a HF folder with a tokenizer; returns its path."""
    model = tiny_llama()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture
def text_file(tmp_path):
    from bitalloc.evaluate.text import wiki_text

    path = tmp_path / "eval.txt"
    path.write_text(wiki_text("eval")[:20000])
    return str(path)
