"""The records data takes on its way to a batch: a Pair as read, a TokenizedPair as the model sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

# A message list in the Hugging Face chat format: [{"role": "user", "content": "..."}, ...]
Messages = list[dict[str, str]]
Text = Union[str, Messages]


class DataError(ValueError):
    """Bad input data. The message names the file, the line (or row) and the field, and what was expected."""


@dataclass
class Pair:
    """One preference: for ``prompt``, ``chosen`` is preferred to ``rejected``.

    All three are plain strings (explicit format) or all are message lists (conversational format:
    ``prompt`` the conversation so far, ``chosen``/``rejected`` the assistant turn(s) that follow).
    ``source`` is where the pair came from, ``"file.jsonl:12"``, for messages and diagnostics.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    source: str = ""


@dataclass
class TokenizedPair:
    """Token ids of one pair. ``prompt_ids + chosen_ids`` is exactly what the model scores for the chosen
    completion (likewise for rejected); the completions end with EOS unless truncation cut it."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    source: str = ""


@dataclass
class DataSummary:
    """What tokenisation kept and dropped, printed before training."""

    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    prompt_lengths: list[int] = field(default_factory=list)
    completion_lengths: list[int] = field(default_factory=list)
