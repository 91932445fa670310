"""Sampling completions from a policy, and scoring completions under any model.

Two questions a DPO run leaves open are "what does the tuned policy write now?" and "how far has it
moved from the reference?". :func:`sample` answers the first: batched ancestral sampling with the KV
cache (``model.generate``, prompts left-padded so that every row's last prompt token sits in the last
column, where decoding continues). :func:`score_logps` answers the second: the summed log-probability
``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` of each sampled completion, under any model sharing the
tokenizer, from the token ids exactly as sampled (never re-tokenised text: decoding and encoding again
need not give the same ids back).

The KL divergence between the policy and the reference is an expectation under the policy,

    KL(pi || pi_ref) = E_{x, y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)],

so its Monte Carlo estimate is the mean of ``logp_policy - logp_ref`` over samples drawn *from pi*.
Scores are always log-probs under the model itself (temperature 1, no top-p). Sampling with another
temperature or top_p < 1 draws from a different distribution, and the mean is then not an unbiased KL
estimate; it is exact (in expectation) only for temperature 1 and top_p 1.

Prompts are read from a JSONL file (or any input :mod:`tiltlm.data` reads) with a ``prompt`` per row:
a string or a list of chat messages (``[{"role": "user", "content": "..."}]``). They are encoded as
training encodes them. Message lists go through the tokenizer's chat template with the assistant turn
opened (``add_generation_prompt=True``). Plain strings are used as they are, because that is how
training reads a plain-string prompt, and sampling from the text the policy was tuned on is what
shows what tuning did. ``--chat`` wraps plain strings as one user message instead, for chat models
prompted with bare questions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2 import TemplateError
from tqdm.auto import tqdm

from tiltlm.data.formats import checked_text, pair_from_row
from tiltlm.data.io import read_rows
from tiltlm.data.tokenize import adds_bos
from tiltlm.data.types import DataError, Text
from tiltlm.logprobs import backbone_and_head, chunked_token_logps, logit_modifiers
from tiltlm.models import ALIASES, ModelError, check_same_tokenizer, load_model, load_tokenizer, parse_dtype, resolve
from tiltlm.runtime import pick_device


@dataclass
class Sample:
    """One sampled completion. ``prompt_ids + completion_ids`` is exactly the sequence that was sampled
    (without padding); ``completion_ids`` ends with the stop token when ``finished``, else it was cut
    at ``max_new_tokens``."""

    prompt: Text
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]
    index: int = 0  # position of the prompt in the prompt list
    sample: int = 0  # which of the prompt's samples this is, 0..n-1
    finished: bool = False


# ----------------------------------------------------------------------------------------- prompts


def read_prompts(source: str | Path) -> list[Text]:
    """The prompt of every row of ``source``, in order.

    Any input :mod:`tiltlm.data` reads works (JSONL, JSON, CSV, Parquet, a saved dataset). A row needs a
    ``prompt`` (a string or a list of chat messages); a preference row (``chosen`` and ``rejected``)
    gives the prompt training reads from it, also where the prompt is implicit (HH-RLHF dialogues), so
    an eval split of the training data can be used as it is.
    """
    prompts: list[Text] = []
    for where, row in read_rows(str(source)):
        if "chosen" in row and "rejected" in row:
            prompts.append(pair_from_row(row, where).prompt)
        elif "prompt" in row:
            prompts.append(checked_text(row["prompt"], "prompt", where))
        else:
            raise DataError(f"{where}: missing field 'prompt'; found {sorted(row)}; expected a 'prompt' "
                            f"(a string or a list of messages) or a preference pair")
    return prompts


def encode_prompt(tokenizer, prompt: Text, chat: bool = False) -> list[int]:
    """Token ids of a prompt, the same ids training gives it (see :mod:`tiltlm.data.tokenize`).

    A plain string gets a BOS exactly when the tokenizer's default encoding adds one. Messages are
    rendered by the chat template with the assistant turn opened; the template writes its own special
    tokens, so the text is encoded without adding any.
    """
    if isinstance(prompt, str) and not chat:
        head = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        return head + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("a chat prompt (a list of messages, or --chat) needs a tokenizer with a chat "
                        "template, and this tokenizer has none; give plain-string prompts")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (ValueError, TemplateError) as error:
        raise DataError(f"cannot render the prompt {messages!r:.80} with the chat template: {error}") from error
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------- sampling


def stop_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS (what training appends to completions) and
    any EOS the model's generation config names (chat models often list their end-of-turn token)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(ids)


def sampling_config(max_new_tokens: int, temperature: float, top_p: float, stop: list[int], pad_id: int):
    """A GenerationConfig for plain ancestral sampling from ``softmax(logits / temperature)``, top-p
    filtered (greedy decoding for temperature 0). Use it under :func:`model_defaults_hidden`.

    ``generate`` fills every option left unset first from the model's own generation config and then
    from library defaults. Library defaults are neutral except top-k 50, switched off here.
    """
    from transformers import GenerationConfig

    common = dict(max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id, num_beams=1, top_k=0)
    if temperature == 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, **common)


@contextmanager
def model_defaults_hidden(model):
    """Give ``model`` a blank generation config for the duration, then restore its own.

    A hub model's ``generation_config.json`` often sets top-k, repetition penalties or suppressed
    tokens. ``generate`` would apply them to any option we leave unset, and the samples would then come
    from something other than the model, which breaks the KL estimate. Listing every such option with a
    neutral value is fragile (new ones appear), so the model's own defaults are hidden instead.
    """
    from transformers import GenerationConfig

    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield model
    finally:
        model.generation_config = own


def cut_at_stop(new_ids: list[int], stop: list[int]) -> tuple[list[int], bool]:
    """The tokens up to and including the first stop token, and whether there was one. ``generate``
    pads finished rows (with the pad id, which may be EOS itself); all of that comes after the stop."""
    for position, token in enumerate(new_ids):
        if token in stop:
            return new_ids[:position + 1], True
    return new_ids, False


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with padding on the left: a decoder continues from the last column,
    so each row's prompt must end there. ``generate`` derives position ids from the mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        if row:
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
    return ids, mask


def check_sampling_options(n: int, max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> None:
    if n < 1:
        raise ValueError(f"samples per prompt = {n}: expected at least 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: expected at least 1")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature = {temperature}: expected 0 (greedy) or a positive number")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p = {top_p}: expected 0 < top_p <= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: expected at least 1")


def sample(model, tokenizer, prompts: list[Text], n: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
           chat: bool = False, progress: bool = False) -> list[Sample]:
    """``n`` completions of every prompt, prompt by prompt (all samples of prompt 0, then prompt 1, ...).

    ``temperature = 0`` decodes greedily. Torch's RNG is seeded with ``seed`` before the first batch
    (inside :func:`torch.random.fork_rng`, so the caller's RNG state is left as it was): the same seed,
    batch size and model give the same samples. A different batch size draws different samples.
    """
    check_sampling_options(n, max_new_tokens, temperature, top_p, batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = stop_token_ids(model, tokenizer)
    config = sampling_config(max_new_tokens, temperature, top_p, stop, pad_id)
    encoded = [encode_prompt(tokenizer, prompt, chat) for prompt in prompts]
    for index, ids in enumerate(encoded):
        if not ids:
            raise DataError(f"prompt {index} is empty after tokenisation; a model needs at least one "
                            f"token to continue")
    rows = [(index, k) for index in range(len(prompts)) for k in range(n)]
    device = model.device
    samples: list[Sample] = []
    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices), torch.inference_mode(), model_defaults_hidden(model):
            torch.manual_seed(seed)
            starts = range(0, len(rows), batch_size)
            for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
                chunk = rows[start:start + batch_size]
                ids, mask = left_pad([encoded[index] for index, _ in chunk], pad_id)
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config)
                new = out[:, ids.shape[1]:].tolist()
                for (index, k), new_ids in zip(chunk, new):
                    completion_ids, finished = cut_at_stop(new_ids, stop)
                    samples.append(Sample(
                        prompt=prompts[index],
                        completion=tokenizer.decode(completion_ids, skip_special_tokens=True),
                        prompt_ids=list(encoded[index]), completion_ids=completion_ids,
                        index=index, sample=k, finished=finished,
                    ))
    finally:
        model.train(was_training)
    return samples


# ----------------------------------------------------------------------------------------- scoring


def score_logps(model, tokenizer, samples: list[Sample], batch_size: int = 8, progress: bool = False) -> list[float]:
    """``log p(completion_ids | prompt_ids)`` under ``model`` at temperature 1, summed over completion
    tokens (EOS included when the sample ended with it), one float per sample.

    Rows are right-padded, so every sequence's real tokens sit at positions 0..len-1 as they would
    alone; only hidden states that predict a completion token are projected to the vocabulary.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    backbone, head = backbone_and_head(model)
    softcap, scale = logit_modifiers(model.config)
    device = model.device
    scores: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            starts = range(0, len(samples), batch_size)
            for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress):
                chunk = samples[start:start + batch_size]
                scores += _score_chunk(backbone, head, chunk, pad_id, device, softcap, scale)
    finally:
        model.train(was_training)
    return scores


def _score_chunk(backbone, head, chunk: list[Sample], pad_id: int, device, softcap, scale) -> list[float]:
    sequences = [s.prompt_ids + s.completion_ids for s in chunk]
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    rows, cols, targets, owner = [], [], [], []
    for r, (s, seq) in enumerate(zip(chunk, sequences)):
        if not s.prompt_ids:
            raise ValueError(f"sample {s.index}/{s.sample} has no prompt tokens; the first completion "
                             f"token would have nothing to be predicted from")
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        # the hidden state at position p predicts the token at p + 1
        first = len(s.prompt_ids)
        rows += [r] * len(s.completion_ids)
        cols += range(first - 1, first - 1 + len(s.completion_ids))
        targets += s.completion_ids
        owner += [r] * len(s.completion_ids)
    positions = torch.arange(width).unsqueeze(0).expand(len(chunk), -1)
    hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device),
                      position_ids=positions.to(device), use_cache=False).last_hidden_state
    selected = hidden[torch.tensor(rows, device=device, dtype=torch.long),
                      torch.tensor(cols, device=device, dtype=torch.long)]
    values = chunked_token_logps(selected, head, torch.tensor(targets, device=device, dtype=torch.long),
                                 softcap=softcap, scale=scale)
    sums = torch.zeros(len(chunk), dtype=torch.float32, device=device)
    sums.index_add_(0, torch.tensor(owner, device=device, dtype=torch.long), values.float())
    return sums.tolist()


# ---------------------------------------------------------------------------------- loading models


def adapter_base(adapter_dir: Path) -> str:
    """The base model a LoRA adapter directory was trained on, as :func:`load_model` can load it.

    peft records the base's ``name_or_path``; for a model loaded through an alias that is the
    directory of the alias's package, which only loads with the alias's extra arguments, so it is
    mapped back to the alias.
    """
    config_path = adapter_dir / "adapter_config.json"
    try:
        base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"{config_path}: cannot read the adapter config ({error})") from None
    if not base:
        raise ModelError(f"{config_path} names no base model (base_model_name_or_path); pass --base")
    for alias in ALIASES:
        try:
            if os.path.realpath(resolve(alias)[0]) == os.path.realpath(base):
                return alias
        except ModelError:
            continue
    return base


def load_policy(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                base: str | None = None, trust_remote_code: bool = False):
    """``(model, tokenizer)`` for a model name, path or alias, or for a directory holding a peft LoRA
    adapter (``adapter_config.json``): then the base is loaded, the adapter applied and merged into
    the weights (one matmul per layer instead of three while sampling)."""
    directory = Path(name)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        base_name = base or adapter_base(directory)
        model = load_model(base_name, dtype=dtype, trust_remote_code=trust_remote_code)
        try:
            model = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as error:
            raise ModelError(f"cannot apply the LoRA adapter in {directory} to {base_name!r}: {error}") from error
        has_tokenizer = any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = load_tokenizer(str(directory) if has_tokenizer else base_name, trust_remote_code)
    else:
        model = load_model(name, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(name, trust_remote_code)
    return model.to(device), tokenizer


# --------------------------------------------------------------------------------------------- CLI


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``tiltlm generate`` and ``tiltlm compare``."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=1.0,
                       help="softmax temperature; 0 decodes greedily (default 1: the policy itself)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    group.add_argument("--max-new-tokens", type=int, default=64)
    group.add_argument("--samples", type=int, default=1, help="completions per prompt")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--batch-size", type=int, default=8, help="sequences per generate call")
    group.add_argument("--chat", action="store_true",
                       help="wrap plain-string prompts as one user message in the chat template "
                            "(message-list prompts always use it)")
    group.add_argument("--dtype", default="auto", help="auto (float32 on CPU) | float32 | bfloat16 | float16")
    group.add_argument("--device", default="auto")
    group.add_argument("--trust-remote-code", action="store_true")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tiltlm generate``: sample completions and write them, with their log-probs, as JSONL."""
    parser.add_argument("--model", required=True, help="model directory, hub id, alias, or LoRA adapter directory")
    parser.add_argument("--base", default=None, help="base model of a LoRA adapter (default: from adapter_config.json)")
    parser.add_argument("--prompts", required=True, help="JSONL file, one {\"prompt\": ...} per line")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--ref", default=None, help="also score the samples under this model (KL estimate)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_sampling_arguments(parser)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write through a temporary file and rename, so the output is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def kl_summary(policy_logps: list[float], ref_logps: list[float], temperature: float, top_p: float) -> str:
    """The Monte Carlo KL estimate ``mean(log pi - log pi_ref)`` with its standard error."""
    differences = [p - r for p, r in zip(policy_logps, ref_logps)]
    count = len(differences)
    mean = sum(differences) / count
    spread = math.sqrt(sum((d - mean) ** 2 for d in differences) / (count - 1)) if count > 1 else float("nan")
    text = f"KL(policy || ref) estimate: {mean:.4f} nats per completion (standard error {spread / math.sqrt(count):.4f}, {count} samples)"
    if temperature != 1.0 or top_p != 1.0:
        text += (f"\n  note: temperature {temperature} / top_p {top_p} do not sample from the policy itself, "
                 f"so this is not an unbiased KL estimate (use --temperature 1 --top-p 1)")
    return text


def run(args: argparse.Namespace) -> int:
    """Entry point of ``tiltlm generate``; returns the exit code."""
    output = Path(args.output)
    try:
        if output.exists() and not args.overwrite:
            raise FileExistsError(f"output {output} exists; pass --overwrite to replace it")
        check_sampling_options(args.samples, args.max_new_tokens, args.temperature, args.top_p, args.batch_size)
        prompts = read_prompts(args.prompts)
        device = pick_device(args.device)
        dtype = parse_dtype(args.dtype, device)
        model, tokenizer = load_policy(args.model, dtype, device, args.base, args.trust_remote_code)
        progress = not args.no_progress
        samples = sample(model, tokenizer, prompts, n=args.samples, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         batch_size=args.batch_size, chat=args.chat, progress=progress)
        policy_logps = score_logps(model, tokenizer, samples, args.batch_size, progress)
        ref_logps = None
        if args.ref:
            del model  # one model in memory at a time
            ref_model, ref_tokenizer = load_policy(args.ref, dtype, device, None, args.trust_remote_code)
            check_same_tokenizer(tokenizer, ref_tokenizer, (args.model, args.ref))
            ref_logps = score_logps(ref_model, tokenizer, samples, args.batch_size, progress)
    except (DataError, ModelError, ValueError, FileExistsError) as error:
        print(f"tiltlm generate: error: {error}", file=sys.stderr)
        return 2
    rows = []
    for i, s in enumerate(samples):
        row = {"prompt": s.prompt, "sample": s.sample, "completion": s.completion,
               "completion_tokens": len(s.completion_ids), "finished": s.finished, "logp_policy": policy_logps[i]}
        if ref_logps is not None:
            row["logp_ref"] = ref_logps[i]
        rows.append(row)
    write_jsonl(output, rows)
    print(f"wrote {len(rows)} completions of {len(prompts)} prompts to {output}")
    if ref_logps is not None:
        print(kl_summary(policy_logps, ref_logps, args.temperature, args.top_p))
    return 0
