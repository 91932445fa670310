"""Rewards: one interface for scoring completions, and the ways to name one on the command line.

A reward is any ``Reward = Callable[[prompts, completions], list[float]]``: a whole batch in, one float per
completion out (a neural reward model scores many texts per forward pass). :func:`load_reward` builds one
from a spec:

``vader``
    The VADER compound sentiment score of the completion, in [-1, 1] (Hutto & Gilbert 2014, "VADER: A
    Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text"). The prompt is ignored.
``module:function`` or ``path/to/file.py:function``
    Your ``f(prompt, completion) -> float``, from that file when the name ends in ``.py`` or holds a path
    separator, else imported with the current directory searched first (``my_rewards:score`` finds
    ``./my_rewards.py``).
a directory
    A sequence-classification model and its tokenizer, reading the prompt then the completion (a chat
    prompt rendered with the completion as the assistant's reply by the chat template). The reward is the
    logit of a one-output model (a reward model), or ``logit[1] - logit[0]`` of a two-class one: the
    log-odds of class 1, "positive" or "preferred" by the usual convention. A reward model saved by
    ``tiltlm reward train`` reads its texts exactly as it was trained on them.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from tiltlm.data.types import Text

Reward = Callable[[list[Text], list[str]], list[float]]


class RewardError(ValueError):
    """A reward spec that cannot be loaded, or a reward function that misbehaves, naming the spec."""


def load_reward(spec: str, device: torch.device | str = "cpu", batch_size: int = 16) -> Reward:
    """The reward a spec names (module docstring); ``device`` and ``batch_size`` concern classifiers only."""
    if spec == "vader":
        return vader
    if Path(spec).is_dir():
        return classifier_reward(spec, device, batch_size)
    if ":" in spec:
        return function_reward(spec)
    raise RewardError(f"reward {spec!r}: not a known reward, a module:function or an existing directory; "
                      f"expected 'vader', 'module:function', 'file.py:function', or a sequence-classification "
                      f"model directory")


@lru_cache(maxsize=1)
def _vader_analyzer():
    # Reading VADER's lexicon takes a moment; one analyzer serves every call.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader(prompts: list[Text], completions: list[str]) -> list[float]:
    """VADER's compound score of each completion, in [-1, 1]; prompts are ignored."""
    return [float(_vader_analyzer().polarity_scores(text)["compound"]) for text in completions]


def function_reward(spec: str) -> Reward:
    """A batch reward around the user's ``f(prompt, completion) -> float`` named by ``module:function``."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise RewardError(f"reward {spec!r}: expected module:function, e.g. my_rewards.py:score or pkg.mod:fn")
    function = getattr(_import(module_name, spec), function_name, None)
    if function is None:
        raise RewardError(f"reward {spec!r}: {module_name} has no function {function_name!r}")
    if not callable(function):
        raise RewardError(f"reward {spec!r}: {module_name}.{function_name} is not callable")

    def reward(prompts: list[Text], completions: list[str]) -> list[float]:
        scores = []
        for index, (prompt, completion) in enumerate(zip(prompts, completions)):
            try:
                value = function(prompt, completion)
            except Exception as error:  # the user's code: say which reward and which completion failed
                raise RewardError(f"reward {spec!r} failed on completion {index} ({completion!r:.60}): "
                                  f"{type(error).__name__}: {error}") from error
            scores.append(_as_number(value, spec, index))
        return scores

    return reward


def _import(module_name: str, spec: str):
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: file {path} not found")
        name = f"tiltlm_reward_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # registered before running, as an import would (dataclasses need it)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as error:  # the user's file: report any failure with its name
            del sys.modules[name]
            raise RewardError(f"reward {spec!r}: running {path} failed: {type(error).__name__}: {error}") from error
        return module
    # The console script's sys.path does not hold the working directory, where a user's module lives.
    here = os.getcwd()
    sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise RewardError(f"reward {spec!r}: no module named {module_name!r} (looked in the current "
                              f"directory and the installed packages)") from None
        raise RewardError(f"reward {spec!r}: importing {module_name} failed: {error}") from error
    except Exception as error:
        raise RewardError(f"reward {spec!r}: importing {module_name} failed: {type(error).__name__}: {error}") from error
    finally:
        sys.path.remove(here)


def _as_number(value: Any, spec: str, index: int) -> float:
    """``value`` as a float, if it is a finite real number (Python, NumPy, or a one-element tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise RewardError(f"reward {spec!r} returned {type(value).__name__} ({value!r:.60}) for completion "
                          f"{index}; expected a number")
    if not math.isfinite(value):
        raise RewardError(f"reward {spec!r} returned {value} for completion {index}; expected a finite number")
    return float(value)


def classifier_reward(directory: str, device: torch.device | str = "cpu", batch_size: int = 16) -> Reward:
    """A batch reward from a sequence-classification model directory (see the module docstring); one that
    ``tiltlm reward train`` saved scores as it was trained (:func:`tiltlm.reward_model.trained_reward`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tiltlm.models import refusing_pickles
    from tiltlm.reward_model import read_mark, trained_reward

    if read_mark(directory):
        try:
            return trained_reward(directory, device, batch_size)
        except (OSError, ValueError) as error:
            raise RewardError(f"reward {directory!r}: cannot load the reward model: {error}") from error

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        with refusing_pickles(f"reward {directory}"):
            model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise RewardError(f"reward {directory!r}: cannot load a sequence-classification model and its "
                          f"tokenizer: {error}") from error
    labels = model.config.num_labels
    if labels not in (1, 2):
        raise RewardError(f"reward {directory!r}: the model has {labels} outputs; expected 1 (a reward "
                          f"model) or 2 (negative, positive). Wrap it in a module:function reward")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RewardError(f"reward {directory!r}: the tokenizer has neither a pad nor an EOS token to pad "
                              f"batches with")
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder classifiers read the score at the last non-pad token, which they find by the pad id.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None

    def reward(prompts: list[Text], completions: list[str]) -> list[float]:
        encoded = [encode_for_classifier(tokenizer, prompt, completion, directory, limit)
                   for prompt, completion in zip(prompts, completions)]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                batch = tokenizer.pad({"input_ids": encoded[start:start + batch_size]}, return_tensors="pt")
                logits = model(**batch.to(device)).logits.float()
                scores += (logits[:, 0] if labels == 1 else logits[:, 1] - logits[:, 0]).tolist()
        return scores

    return reward


def encode_for_classifier(tokenizer, prompt: Text, completion: str, name: str, limit: int | None) -> list[int]:
    """Prompt then completion with the tokenizer's special tokens (a BERT classifier needs its [CLS]), or the
    chat with the completion as the assistant's reply, by the chat template (which writes its own)."""
    if isinstance(prompt, str):
        text, specials = prompt + completion, True
    elif getattr(tokenizer, "chat_template", None):
        messages = prompt + [{"role": "assistant", "content": completion}]
        text, specials = tokenizer.apply_chat_template(messages, tokenize=False), False
    else:
        raise RewardError(f"reward {name!r}: a chat prompt needs a tokenizer with a chat template, and this "
                          f"one has none")
    return tokenizer(text, add_special_tokens=specials, truncation=limit is not None, max_length=limit)["input_ids"]
