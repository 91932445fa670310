"""Bradley-Terry reward models: scoring a :class:`~tiltlm.data.collate.Batch`'s completions, loading the model.

A reward model is an ``AutoModelForSequenceClassification`` with ``num_labels = 1``: a transformer body and a
linear "score" head from the last hidden state to one number, the reward ``r(x, y)`` of prompt + completion
once trained with :func:`tiltlm.losses.bradley_terry_reward_loss` (Ouyang et al. 2022, Section 3.5).

Scoring reads the hidden state at each sequence's *last* completion token, which the batch's attention mask
lets see exactly its own prompt and completion: every collate layout (concatenated, prefix-shared, packed)
gives the score of the sequence run alone, with the body run once.

Hugging Face's own forward (what a user of the saved ``final/`` calls) reads the score at the rightmost token
that is not ``config.pad_token_id``. Completions end with EOS, so when pad *is* EOS (tiltlm's default for
tokenizers without one) it reads the token before the one trained at: :func:`prepare_reward_model` warns.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import torch
from torch import Tensor, nn

from tiltlm.data.collate import Batch, PromptCompletions, collate_prompt_completions
from tiltlm.data.tokenize import _encode, _eos, _head, adds_bos, fit_completions, fit_prompt, render_texts, with_eos
from tiltlm.logprobs import backbone_states
from tiltlm.models import ModelError, load_tokenizer, plain_after_gguf, resolve


def last_token_positions(batch: Batch, sequences: int | None = None) -> tuple[Tensor, Tensor]:
    """``(rows, cols)``, shape [sequences] each: where each sequence (``batch.target_seq``, ``0 ..
    sequences - 1``, every one present) has its last completion token.

    Each token is predicted from the column before it, so a sequence's last token sits one column after its
    last predictor column. Except at a branch point of the prefix-shared layout, the prompt's last column,
    which predicts the first token of every completion of that prompt: there a one-token completion sits
    right after the sibling laid out before it (:func:`tiltlm.data.collate.collate_shared` lays them out
    one after another, in the order of their targets), not one column after."""
    count = sequences if sequences is not None else int(batch.target_seq.max()) + 1
    seq, tcols = batch.target_seq, batch.target_cols
    last = torch.full((count,), -1, dtype=torch.long, device=tcols.device).scatter_reduce(0, seq, tcols, reduce="amax")
    if bool((last < 0).any()):
        raise ValueError(f"sequence(s) {(last < 0).nonzero().flatten().tolist()} have no completion token")
    rows = torch.zeros(count, dtype=torch.long, device=tcols.device).scatter(0, seq, batch.target_rows)
    cols = (last + 1).tolist()
    # walk the sequences predicted from each column in target order: a one-token one sits right after the
    # previous one's last token (every other sequence's last column is already right)
    targets = Counter(seq.tolist())
    siblings: dict[tuple[int, int], dict[int, None]] = {}  # (row, predictor column) -> its sequences, in order
    for row, col, s in zip(batch.target_rows.tolist(), tcols.tolist(), seq.tolist()):
        siblings.setdefault((row, col), {})[s] = None
    for (_, col), group in siblings.items():
        start = col + 1
        for s in group:
            if targets[s] == 1:
                cols[s] = start
            start = cols[s] + 1
    return rows, torch.tensor(cols, dtype=torch.long, device=tcols.device)


def score_sequences(model: nn.Module, batch: Batch, sequences: int | None = None) -> Tensor:
    """One reward per sequence of ``batch`` (shape [sequences], float32 or wider): the score head
    applied to the hidden state at the sequence's last completion token, the body run once. Under peft
    the head is a ``ModulesToSaveWrapper``, which runs the trained copy when called."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if not isinstance(head, nn.Module) or not isinstance(getattr(head, "weight", None), Tensor):
        raise ModelError(f"{type(base).__name__} has no linear 'score' head; a reward model must be an "
                         f"AutoModelForSequenceClassification of a decoder architecture (Llama, Qwen, ...)")
    body = base.base_model
    # the same attention as the policy's log-probs: segment metadata to tiltlm's kernels, else the dense
    # mask of the segment rule (a 2D padding mask would let a shared prompt's completions see each other)
    hidden = backbone_states(body, body.config, batch, head.weight.dtype)
    rows, cols = last_token_positions(batch, sequences)
    scores = head(hidden[rows, cols]).squeeze(-1)
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


def prepare_reward_model(model: nn.Module, tokenizer) -> str | None:
    """Set ``config.pad_token_id`` (Hugging Face's forward finds each sequence's last token in a padded batch
    by it, and saves it with the model); a warning when pad is EOS (module docstring), else ``None``."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None:
        raise ModelError("the tokenizer has no pad token: a reward model needs one in its config; "
                         "set tokenizer.pad_token")
    model.config.pad_token_id = pad
    if pad == eos:
        return ("the tokenizer's pad token is its EOS token: the reward is trained at each completion's final "
                "EOS, but Hugging Face's own forward of the saved model reads the last non-pad token, the "
                "one before EOS; score texts without their final EOS there, or use a tokenizer with its own "
                "pad token")
    return None


def load_reward_model(name: str, tokenizer, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """An ``AutoModelForSequenceClassification`` with one label from a model directory, hub id or alias:
    a saved reward model as it is, or a causal LM with a new, randomly initialised score head (the
    standard start of reward-model training). ``config.pad_token_id`` is set from ``tokenizer``."""
    from transformers import AutoModelForSequenceClassification

    path, extra = resolve(name)
    if not os.path.isdir(path) and os.path.exists(path):
        raise ModelError(f"model {name!r} is a file; expected a model directory, a hub id or an alias")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a sequence-classification (reward) model from {name!r}: {error}") from error
    if "gguf_file" in extra:
        plain_after_gguf(model)
    warning = prepare_reward_model(model, tokenizer)
    if warning:
        warnings.warn(warning, stacklevel=2)
    return model


# ``tiltlm reward train`` marks the saved config with ``tiltlm_reward`` (the run's max_length and
# max_prompt_length), so the model scores texts exactly as it was trained (:func:`encode_reward_input`, the
# score read at the last completion token by score_sequences, not at Hugging Face's "last non-pad token").
MARK = "tiltlm_reward"


def read_mark(directory: str) -> dict:
    """The ``tiltlm_reward`` mark of a saved model's config (max_length, max_prompt_length), or {}."""
    from transformers import AutoConfig

    try:
        mark = getattr(AutoConfig.from_pretrained(directory), MARK, None)
    except (OSError, ValueError):
        return {}
    return mark if isinstance(mark, dict) else {}


def encode_reward_input(tokenizer, prompt, completion: str, max_length: int,
                        max_prompt_length: int) -> tuple[list[int], list[int]]:
    """``(prompt ids, completion ids)`` as the trainer makes them (tiltlm.data.tokenize): a chat prompt
    rendered with the completion as the assistant's reply; an empty completion is EOS alone."""
    reply = completion if isinstance(prompt, str) else [{"role": "assistant", "content": completion}]
    prompt_text, (completion_text,), chat = render_texts(prompt, [reply], tokenizer, "reward input")
    prompt_ids, completion_ids = _encode(tokenizer, [prompt_text, completion_text])
    head = _head(tokenizer, adds_bos(tokenizer), chat, prompt_ids)
    if head is None:
        raise ValueError("an empty prompt, and the tokenizer has no BOS to score the completion after")
    full_prompt, _ = fit_prompt(head, prompt_ids, max_prompt_length)
    completion_ids = with_eos(completion_ids, _eos(tokenizer))
    fitted = fit_completions(len(full_prompt), [completion_ids], max_length)
    if isinstance(fitted, str):  # the prompt filled max_length: keep its end and one completion token
        return full_prompt[-(max_length - 1):], completion_ids[:1]
    return full_prompt, fitted[0][0]


def trained_reward(directory: str, device: torch.device | str = "cpu", batch_size: int = 16):
    """A ``tiltlm.rewards.Reward`` (prompts, completions -> floats) from a model ``tiltlm reward train`` saved."""
    tokenizer = load_tokenizer(directory)
    model = load_reward_model(directory, tokenizer).to(device).eval()
    limits = getattr(model.config, MARK)

    def reward(prompts: list, completions: list[str]) -> list[float]:
        encoded = [encode_reward_input(tokenizer, p, c, limits["max_length"], limits["max_prompt_length"])
                   for p, c in zip(prompts, completions)]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start:start + batch_size]
                batch = collate_prompt_completions(
                    [PromptCompletions(p, [c], [i]) for i, (p, c) in enumerate(chunk)], tokenizer.pad_token_id)
                scores += score_sequences(model, batch.to(torch.device(device)), len(chunk)).tolist()
        return scores

    return reward


def evaluate_reward_model(model: str, data: str, batch_size: int = 8, max_length: int | None = None,
                          max_prompt_length: int | None = None, dtype: str = "auto", device: str = "auto",
                          trust_remote_code: bool = False, progress: bool = True) -> dict[str, float]:
    """Bradley-Terry loss, accuracy (ties half), mean margin and mean reward of a reward model on a file
    of pairs (or ranked lists: their pairs), as ``tiltlm eval`` measures a policy (the trainer's objective and
    eval kernel). Lengths default to those the model was trained with (its mark), else the trainer's."""
    from tiltlm.config import TrainConfig
    from tiltlm.evaluate import evaluate

    saved = read_mark(model)
    return evaluate(model, data, objective="reward-model", batch_size=batch_size, dtype=dtype, device=device,
                    trust_remote_code=trust_remote_code, progress=progress,
                    max_length=max_length or saved.get("max_length", TrainConfig.max_length),
                    max_prompt_length=max_prompt_length or saved.get("max_prompt_length",
                                                                     TrainConfig.max_prompt_length))
