"""Sampling completions from a policy, and scoring completions under any model.

:func:`sample` shows what the tuned policy writes now (batched ancestral sampling with the KV cache);
:func:`score_logps` measures how far it moved from the reference: ``log pi(y|x) = sum_t log pi(y_t | x,
y_<t)`` under any model sharing the tokenizer, from the token ids exactly as sampled (decoding and encoding
again need not give the same ids back). The KL divergence is an expectation under the policy,

    KL(pi || pi_ref) = E_{x, y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)],

so its Monte Carlo estimate is the mean of ``logp_policy - logp_ref`` over samples drawn *from pi*; scores
are log-probs under the model itself, so it is unbiased only for samples drawn at temperature 1, top_p 1.

Prompts are encoded as training encodes them: plain strings as they are (sampling from the text the policy
was tuned on shows what tuning did; ``chat=True`` wraps them as one user message instead), chat messages
through the chat template.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2 import TemplateError
from tqdm.auto import tqdm

from tiltlm.config import check_options, option
from tiltlm.data.collate import PromptCompletions, collate_prompt_completions
from tiltlm.data.formats import checked_text, pair_from_row
from tiltlm.data.io import read_rows
from tiltlm.data.tokenize import adds_bos
from tiltlm.data.types import DataError, Text
from tiltlm.logprobs import CompletionLogps
from tiltlm.models import (ModelError, adapter_base, eval_mode, is_adapter, load_model, load_tokenizer,
                           refusing_pickles)


@dataclass
class SamplingConfig:
    """The options of sampling, as ``tiltlm generate`` and ``tiltlm compare`` take them."""

    samples: int = option(1, "completions per prompt", at_least=1)
    max_new_tokens: int = option(64, "most tokens sampled per completion", at_least=1)
    temperature: float = option(1.0, "softmax temperature; 0 decodes greedily (1: the policy itself)", at_least=0)
    top_p: float = option(1.0, "nucleus sampling mass (1: off)", above=0, at_most=1)
    seed: int = option(0, "seed of the sampling RNG", at_least=0)
    batch_size: int = option(8, "sequences per generate call", at_least=1)
    chat: bool = option(False, "wrap plain-string prompts as a user message in the chat template too")


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


def read_prompts(source: str | Path) -> list[Text]:
    """The ``prompt`` of every row of ``source`` (any input :mod:`tiltlm.data` reads); of a preference row, the
    one training reads (implicit ones too, as in HH-RLHF), so an eval split of training data serves as it is."""
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
    """The ids training gives a prompt (:mod:`tiltlm.data.tokenize`): BOS first exactly when the tokenizer's
    default encoding adds one; messages rendered by the chat template (which writes its own special tokens)."""
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


def stop_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS (what training appends to completions) and
    any EOS the model's generation config names (chat models often list their end-of-turn token)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return sorted({tokenizer.eos_token_id, *configured} - {None})


@contextmanager
def plain_sampling(model, max_new_tokens: int, temperature: float, top_p: float, stop: list[int], pad_id: int):
    """The GenerationConfig of plain ancestral sampling from ``softmax(logits / temperature)``, top-p
    filtered (greedy for temperature 0), with the model's own generation config hidden meanwhile: ``generate``
    fills options left unset from it (a hub model's often sets top-k, repetition penalties or suppressed
    tokens, and new such options appear), and samples from anything but the model break the KL estimate.
    Library defaults fill the rest; they are neutral except top-k 50, switched off here."""
    from transformers import GenerationConfig

    common = dict(max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id, num_beams=1, top_k=0)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature else dict(do_sample=False)
    own, model.generation_config = model.generation_config, GenerationConfig()
    try:
        yield GenerationConfig(**sampling, **common)
    finally:
        model.generation_config = own


def cut_at_stop(new_ids: list[int], stop: list[int]) -> tuple[list[int], bool]:
    """The tokens up to and including the first stop token, and whether there was one. ``generate``
    pads finished rows (with the pad id, which may be EOS itself); all of that comes after the stop."""
    end = next((position for position, token in enumerate(new_ids) if token in stop), None)
    return (new_ids, False) if end is None else (new_ids[:end + 1], True)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with padding on the left: a decoder continues from the last column,
    so each row's prompt must end there. ``generate`` derives position ids from the mask."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
    return ids, torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])


def sample(model, tokenizer, prompts: list[Text], n: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
           chat: bool = False, progress: bool = False) -> list[Sample]:
    """``n`` completions of every prompt, prompt by prompt (all samples of prompt 0, then prompt 1, ...);
    ``temperature = 0`` decodes greedily. Torch's RNG is seeded with ``seed`` inside
    :func:`torch.random.fork_rng` (the caller's RNG state is left as it was): the same seed, batch size and
    model give the same samples, a different batch size different ones."""
    check_options(SamplingConfig(samples=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed, batch_size=batch_size))  # a ConfigError names the option
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = stop_token_ids(model, tokenizer)
    encoded = [encode_prompt(tokenizer, prompt, chat) for prompt in prompts]
    for index, ids in enumerate(encoded):
        if not ids:
            raise DataError(f"prompt {index} is empty after tokenisation; a model needs at least one "
                            f"token to continue")
    rows = [(index, k) for index in range(len(prompts)) for k in range(n)]
    device = model.device
    samples: list[Sample] = []
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.inference_mode(), plain_sampling(model, max_new_tokens, temperature, top_p, stop, pad_id) as config:
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(rows), batch_size), desc="sampling", unit="batch", disable=not progress):
            chunk = rows[start:start + batch_size]
            ids, mask = left_pad([encoded[index] for index, _ in chunk], pad_id)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for (index, k), new_ids in zip(chunk, out[:, ids.shape[1]:].tolist()):
                completion_ids, finished = cut_at_stop(new_ids, stop)
                completion = tokenizer.decode(completion_ids, skip_special_tokens=True)
                samples.append(Sample(prompts[index], completion, list(encoded[index]), completion_ids, index=index,
                                      sample=k, finished=finished))
    return samples


def score_logps(model, tokenizer, samples: list[Sample], batch_size: int = 8, progress: bool = False) -> list[float]:
    """``log p(completion_ids | prompt_ids)`` of each sample under ``model`` at temperature 1, summed over its
    tokens (EOS included when it ended with one), scored as training scores completions (CompletionLogps)."""
    for s in samples:
        if not s.prompt_ids:
            raise ValueError(f"sample {s.index}/{s.sample} has no prompt tokens; the first completion "
                             f"token would have nothing to be predicted from")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scorer = CompletionLogps(model)
    scores: list[float] = []
    with eval_mode(model), torch.inference_mode():
        for start in tqdm(range(0, len(samples), batch_size), desc="scoring", unit="batch", disable=not progress):
            examples = [PromptCompletions(s.prompt_ids, [s.completion_ids], [i])
                        for i, s in enumerate(samples[start:start + batch_size])]
            logps, _ = scorer(collate_prompt_completions(examples, pad_id).to(model.device))
            scores += logps.tolist()
    return scores


def load_policy(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                base: str | None = None, trust_remote_code: bool = False):
    """``(model, tokenizer)`` for a model name, path or alias, or for a peft LoRA adapter directory: then
    the adapter is applied to its base (``base``, default: the one it records) and merged into the
    weights (one matmul per layer instead of three while sampling)."""
    if not is_adapter(name):
        return load_model(name, dtype, trust_remote_code).to(device), load_tokenizer(name, trust_remote_code)
    from peft import PeftModel

    base_name = base or adapter_base(name)
    try:
        with refusing_pickles(name):
            model = PeftModel.from_pretrained(load_model(base_name, dtype, trust_remote_code), name).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"cannot apply the LoRA adapter in {name} to {base_name!r}: {error}") from error
    has_tokenizer = any((Path(name) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return model.to(device), load_tokenizer(name if has_tokenizer else base_name, trust_remote_code)


