"""The benchmark's workload, built once and cached in ``benchmarks/.cache``: models saved as plain
transformers directories, and the tokenized pairs each model trains on, as JSON.

Everything downstream (tiltlm's configurations and TRL's, in another virtual environment) reads these
files, so every configuration sees the same weights, the same token ids and the same batches.

Models:

``tiny20m``   a random Llama-architecture model with a 32,000-token vocabulary and an untied head
              (hidden 256, 4 layers, 4 heads, intermediate 1024: 20,580,608 parameters), with a
              32,000-token byte-level BPE trained on the HH-RLHF texts themselves.
``smollm2``   SmolLM2-135M (the GGUF weights tiltlm ships, de-quantized to float32) with its tokenizer.

Pairs: the HH-RLHF harmless-base test split (implicit prompt layout), tokenized by tiltlm; kept when
the prompt has at least 100 tokens and both completions at least 50; then the prompt is cut to its
last 300 tokens and each completion to its first 150 (so every sequence fits max_length 512 and no
later truncation applies). Without the data file: synthetic random-token pairs with prompts of
100-300 tokens and completions of 50-150.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
HH = HERE.parents[1] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
MODELS = ("tiny20m", "smollm2")

MAX_LENGTH = 512
PROMPT_RANGE = (100, 300)  # tokens: shorter prompts are dropped, longer ones keep their end
COMPLETION_RANGE = (50, 150)  # tokens: shorter completions are dropped, longer ones keep their start
VOCAB = 32_000


def model_dir(name: str) -> Path:
    return CACHE / name


def pairs_file(name: str) -> Path:
    return CACHE / f"{name}-pairs.json"


def hh_texts() -> list[str]:
    """Every chosen and rejected dialogue of the HH file (training text for the BPE; never printed)."""
    import gzip

    with gzip.open(HH, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [row[key] for row in rows for key in ("chosen", "rejected")]


def train_bpe(directory: Path):
    """A 32,000-token byte-level BPE trained on the HH texts (or, without them, on random words), with
    BOS/EOS/pad specials, saved with the model. Seconds to train."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if HH.is_file():
        corpus = hh_texts()
    else:
        rng = random.Random(0)
        letters = "abcdefghijklmnopqrstuvwxyz"
        corpus = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(200))
                  for _ in range(5000)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.save_pretrained(directory)
    return wrapped


def build_tiny20m(directory: Path) -> None:
    from tiltlm.models import tiny_llama

    tokenizer = train_bpe(directory)
    model = tiny_llama(vocab_size=VOCAB, hidden_size=256, layers=4, heads=4, kv_heads=4, intermediate_size=1024,
                       seed=0, tie=False)
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)


def build_smollm2(directory: Path) -> None:
    """SmolLM2-135M from the GGUF file tiltlm's alias loads, saved as float32 safetensors so that the
    TRL environment (which has no GGUF reader) loads the very same weights."""
    from tiltlm.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def select_pairs(tokenizer) -> tuple[list[dict], str]:
    """The benchmark's pairs as ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` dicts, and where they
    came from (see the module docstring for the filter)."""
    lo_p, hi_p = PROMPT_RANGE
    lo_c, hi_c = COMPLETION_RANGE
    if not HH.is_file():
        rng = random.Random(0)
        ids = lambda n: [rng.randrange(3, len(tokenizer)) for _ in range(n)]  # noqa: E731
        pairs = [{"prompt_ids": ids(rng.randint(lo_p, hi_p)), "chosen_ids": ids(rng.randint(lo_c, hi_c)),
                  "rejected_ids": ids(rng.randint(lo_c, hi_c))} for _ in range(600)]
        return pairs, "synthetic (HH-RLHF file absent)"
    from tiltlm.data import load_pairs, tokenize_pairs

    tokenized, _ = tokenize_pairs(load_pairs(str(HH)), tokenizer, 10**6, 10**6 - 1)  # no truncation yet
    pairs = []
    for pair in tokenized:
        if len(pair.prompt_ids) < lo_p or min(len(pair.chosen_ids), len(pair.rejected_ids)) < lo_c:
            continue
        chosen, rejected = pair.chosen_ids[:hi_c], pair.rejected_ids[:hi_c]
        if chosen == rejected:
            continue
        pairs.append({"prompt_ids": pair.prompt_ids[-hi_p:], "chosen_ids": chosen, "rejected_ids": rejected})
    return pairs, f"HH-RLHF harmless-base test: {len(pairs)} of {len(tokenized)} tokenized pairs pass the filter"


def prepare(name: str) -> None:
    """Build (once) the model directory and the pairs file of ``name``."""
    from transformers import AutoTokenizer

    directory = model_dir(name)
    if not (directory / "config.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        (build_tiny20m if name == "tiny20m" else build_smollm2)(directory)
    if not pairs_file(name).is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory)
        pairs, origin = select_pairs(tokenizer)
        random.Random(1).shuffle(pairs)  # one fixed order for every configuration
        pairs_file(name).write_text(json.dumps({"origin": origin, "pad_id": tokenizer.pad_token_id,
                                                "eos_id": tokenizer.eos_token_id, "pairs": pairs}))


def load_workload(name: str) -> dict:
    return json.loads(pairs_file(name).read_text())


if __name__ == "__main__":
    for model_name in sys.argv[1:] or MODELS:
        prepare(model_name)
        data = load_workload(model_name)
        lengths = [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in data["pairs"]]
        print(f"{model_name}: {data['origin']}; mean pair length {sum(lengths) / len(lengths):.0f} tokens")
