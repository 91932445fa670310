"""Small tokenizers built offline for tests: a GPT-2-style byte-level BPE and a sentencepiece model
loaded as a Llama tokenizer. Each carries a chat template, so conversational data can be rendered.

(This module is not called ``tokenizers.py``: pytest puts ``tests/`` first on ``sys.path``, where that
name would hide the ``tokenizers`` library itself.)
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Human: What is the capital of France? Assistant: Paris is the capital of France.",
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then bake it.",
    "Human: Tell me a joke. Assistant: I do not know any good jokes, sorry.",
    "Human: Can you help me with my homework? Assistant: Sure, what is the question?",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Thanks for asking! I think the answer is no, but let me check the facts first.",
    "User: hello there. Bot: hi, how can I help you today with your question?",
]

# GPT-2 style: no BOS added by default, turns end with <|end|>, which is not EOS: EOS gets appended.
BPE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Llama-2 style: BOS before each user turn, an assistant turn ends with EOS (</s>) and nothing after it.
SP_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{% else %}<<SYS>>{{ m['content'] }}<</SYS>>{% endif %}{% endfor %}"
)


def byte_bpe_tokenizer():
    """A byte-level BPE trained on ``CORPUS`` (GPT-2's scheme: every byte is representable, spaces belong
    to the following word), wrapped for transformers with BOS, EOS and pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|end|>"]
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<|startoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        additional_special_tokens=["<|end|>"])
    tokenizer.chat_template = BPE_CHAT_TEMPLATE
    return tokenizer


def sentencepiece_tokenizer(directory: Path):
    """A sentencepiece BPE model trained on ``CORPUS`` into ``directory`` (with byte fallback, so any text
    round-trips), loaded as a Llama tokenizer that adds BOS by default and marks word starts with "▁"."""
    import sentencepiece
    from transformers import LlamaTokenizer

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(directory / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2,
    )
    tokenizer = LlamaTokenizer.from_pretrained(str(directory), add_bos_token=True)
    tokenizer.chat_template = SP_CHAT_TEMPLATE
    return tokenizer
