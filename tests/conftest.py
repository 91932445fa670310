"""Shared fixtures: a tiny random Llama with a small trained BPE tokenizer, saved as a model directory
(no download), preference files in every format, and the real HH-RLHF file where ../shared has it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and where other processes share the cores, thread
# hand-offs cost more than the arithmetic (seen: kernels on tiny tensors hundreds of times slower).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
# precomputed reference tables go to a directory of this session, never the user's ~/.cache
os.environ.setdefault("TILTLM_CACHE", tempfile.mkdtemp(prefix="tiltlm-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"

CORPUS = [
    "The film was wonderful and the acting superb.",
    "I hated every minute of this boring movie.",
    "What a lovely day for a walk in the park.",
    "The service was slow and the food was cold.",
    "Tell me about the weather today.",
    "Human: How do I bake bread? Assistant: Mix flour, water, yeast and salt, then knead.",
    "Human: Can you help me? Assistant: Of course, what do you need?",
    "great awful good bad happy sad love hate nice terrible fine poor best worst",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z",
]

PAIRS = [
    {"prompt": "Review: the film was", "chosen": " wonderful and superb.", "rejected": " boring and awful."},
    {"prompt": "Describe the day:", "chosen": " a lovely day for a walk.", "rejected": " cold, slow and sad."},
    {"prompt": "The food was", "chosen": " good and the service nice.", "rejected": " terrible, the worst."},
    {"prompt": "Tell me about the weather today.", "chosen": " It is fine and happy.", "rejected": " It is bad."},
    {"prompt": "How do I bake bread?", "chosen": " Mix flour, water and yeast.", "rejected": " I hate bread."},
    {"prompt": "Can you help me?", "chosen": " Of course, what do you need?", "rejected": " No."},
    {"prompt": "The acting was", "chosen": " superb, the best.", "rejected": " poor, the worst."},
    {"prompt": "A walk in the park is", "chosen": " lovely and nice.", "rejected": " boring."},
]


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on CORPUS, with BOS/EOS/PAD, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    from tiltlm.models import tiny_llama

    tokenizer = build_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), seed=seed)
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


@pytest.fixture
def hh_rlhf() -> Path:
    if not HH_RLHF.is_file():
        pytest.skip(f"{HH_RLHF} is absent (the shared data set is optional)")
    return HH_RLHF


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (SmolLM2-style), built in code."""
    from tokenizer_builders import byte_bpe_tokenizer

    return byte_bpe_tokenizer()


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """A sentencepiece tokenizer (Llama-2-style), trained in code."""
    from tokenizer_builders import sentencepiece_tokenizer

    return sentencepiece_tokenizer(tmp_path_factory.mktemp("sentencepiece"))
