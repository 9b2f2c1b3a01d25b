"""Tiny real assets for the train/eval/generate/CLI tests: a random Llama backbone with a
byte-level BPE tokenizer trained here (saved as a local backbone folder) and text data."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from model_worker import evaluate

WORDS = (
    "the memory bank holds keys and values of every segment read so far while a small side "
    "network learns to retrieve chunks that matter for the next token in a long stream"
).split()


def text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(0, n_words, 12):
        words = " ".join(rng.choice(WORDS) for _ in range(12))
        lines.append(f"{words} {rng.randint(0, 99999)}.")
    return "\n".join(lines) + "\n"


def make_backbone(path: Path, seed: int = 0, layers: int = 4) -> Path:
    """Save a tiny random Llama (GQA, rotary) and its tokenizer into folder `path`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    passkey = [evaluate.INTRO, evaluate.FILLER, evaluate.KEY, evaluate.QUESTION] * 50
    tok.train_from_iterator([text(3000, s) for s in range(3)] + passkey, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    config = LlamaConfig(
        vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, eos_token_id=fast.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def make_books(path: Path, n_docs: int = 3, n_words: int = 1500) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (path / f"book{i}.txt").write_text(text(n_words, 100 + i))
    return path
