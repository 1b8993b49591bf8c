"""Tiny tokenizers, models and prompt files built in-process for tests (nothing is downloaded)."""

from __future__ import annotations

import json
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHARS = list("0123456789+=abcdefghij ")
SPECIALS = ["<pad>", "<eos>"]


def make_tokenizer(extra_tokens: int = 0) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS + [f"<x{i}>" for i in range(extra_tokens)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", padding_side="left")
    return tok


def make_model(vocab_size: int, hidden: int = 32, layers: int = 1, seed: int = 0, eos_id: int = 1, pad_id: int = 0,
               bias_scale: float = 0.0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=eos_id,
                         pad_token_id=pad_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model


def save_pair(root: str, student_vocab: int | None = None, teacher_vocab: int | None = None, teacher_hidden=48):
    """Save a tiny student/teacher pair with the shared tokenizer; returns (student_dir, teacher_dir)."""
    tok = make_tokenizer()
    n = len(tok)
    paths = []
    for name, vocab, hidden, seed in (("student", student_vocab or n, 32, 0),
                                      ("teacher", teacher_vocab or n, teacher_hidden, 1)):
        path = os.path.join(root, name)
        make_model(vocab, hidden=hidden, seed=seed).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return tuple(paths)


def write_prompts(path: str, n: int = 8, conversational: bool = False) -> str:
    with open(path, "w") as f:
        for i in range(n):
            text = f"{i}+{i + 1}="
            prompt = [{"role": "user", "content": text}] if conversational else text
            f.write(json.dumps({"prompt": prompt, "answer": str(2 * i + 1)}) + "\n")
    return path
