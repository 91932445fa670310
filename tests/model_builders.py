"""Small random models and data shared by several test files (built in code: no download)."""

from __future__ import annotations

import random

import torch

from tiltlm.data.types import TokenizedPair


def random_pairs(count: int, seed: int = 0, vocab: int = 300) -> list[TokenizedPair]:
    """``count`` pairs of random token ids in [3, vocab) with prompts of 1-14 and completions of 1-10 tokens."""
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    return [TokenizedPair(ids(rng.randint(1, 14)), ids(rng.randint(1, 10)), ids(rng.randint(1, 10)))
            for _ in range(count)]


def tiny_reward_model(seed: int = 0, vocab: int = 64, pad: int = 63):
    """A random two-layer Llama sequence classifier with one output (a Bradley-Terry reward model)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         num_labels=1, pad_token_id=pad, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()
