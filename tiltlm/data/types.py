"""The records data takes on its way to a batch: a Pair as read, a TokenizedPair as the model sees it.

Beyond pairs: a :class:`RankedList` (K completions of one prompt, ranked or scored) and an
:class:`Unpaired` completion (labelled desirable or not), with their tokenised forms. Every row may
carry a non-negative ``weight`` (default 1) that multiplies its loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

# A message list in the Hugging Face chat format: [{"role": "user", "content": "..."}, ...]
Messages = list[dict[str, str]]
Text = Union[str, Messages]


class DataError(ValueError):
    """Bad input data. The message names the file, the line (or row) and the field, and what was expected."""


@dataclass
class Pair:
    """One preference: for ``prompt``, ``chosen`` is preferred to ``rejected``. All three are strings
    (explicit format) or all are message lists (conversational format: ``prompt`` the conversation so
    far, ``chosen``/``rejected`` the assistant turn(s) that follow). ``source`` is where the pair came
    from, ``"file.jsonl:12"``, for messages and diagnostics."""

    prompt: Text
    chosen: Text
    rejected: Text
    source: str = ""
    weight: float = 1.0


@dataclass
class TokenizedPair:
    """Token ids of one pair. ``prompt_ids + chosen_ids`` is exactly what the model scores for the chosen
    completion (likewise for rejected); the completions end with EOS unless truncation cut it."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    source: str = ""
    weight: float = 1.0


class _Ranked:
    def ranks(self) -> list[int]:
        """Each completion's rank, see :func:`ranks_of` (for RankedList and TokenizedList)."""
        return ranks_of(len(self.completions), self.ranking, self.scores)


@dataclass
class RankedList(_Ranked):
    """K >= 2 completions of one prompt, ordered by ``ranking`` (completion indices, best first: a strict
    order) or by ``scores`` (one per completion, higher is better, ties allowed); exactly one is set.
    Texts are all strings or all message lists, as in :class:`Pair`."""

    prompt: Text
    completions: list[Text]
    ranking: list[int] | None = None
    scores: list[float] | None = None
    source: str = ""
    weight: float = 1.0


@dataclass
class Unpaired:
    """One completion of a prompt, labelled desirable (``label`` True) or undesirable: KTO's data."""

    prompt: Text
    completion: Text
    label: bool
    source: str = ""
    weight: float = 1.0


@dataclass
class TokenizedList(_Ranked):
    """Token ids of a :class:`RankedList`: the prompt once, each completion separately (ending with EOS
    unless truncation cut it); ``prompt_ids + completions[k]`` is what the model scores."""

    prompt_ids: list[int]
    completions: list[list[int]]
    ranking: list[int] | None = None
    scores: list[float] | None = None
    truncated: bool = False
    source: str = ""
    weight: float = 1.0


@dataclass
class TokenizedUnpaired:
    """Token ids of an :class:`Unpaired` row."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    truncated: bool = False
    source: str = ""
    weight: float = 1.0


Example = Union[Pair, RankedList, Unpaired]
TokenizedExample = Union[TokenizedPair, TokenizedList, TokenizedUnpaired]


def ranks_of(count: int, ranking: list[int] | None, scores: list[float] | None) -> list[int]:
    """Each of ``count`` completions' rank: 0 for the best, larger for worse, equal for ties (dense:
    scores 3, 7, 7, 1 give ranks 2, 0, 0, 1). From a ``ranking`` (best first) completion
    ``ranking[k]`` has rank ``k``. This is the form :func:`tiltlm.losses.plackett_luce` takes."""
    if ranking is not None:
        return [ranking.index(k) for k in range(count)]
    if scores is None:
        raise ValueError("a ranked list needs a ranking or scores")
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(score) for score in scores]


@dataclass
class DataSummary:
    """What tokenisation kept and dropped, printed before training. ``skipped`` counts dropped rows by
    reason; ``truncated`` kept rows that lost tokens. Lengths are in tokens, of kept rows: one prompt
    length per row, one per completion (chosen, then rejected, for a pair), EOS included."""

    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    prompt_lengths: list[int] = field(default_factory=list)
    completion_lengths: list[int] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)  # kept rows by kind; empty when all are pairs
    control_text: int = 0  # pairs whose own text holds control-token strings (data/specials.py)
    control_found: list[str] = field(default_factory=list)  # which strings
    special_tokens: str = "keep"  # how those strings were read: keep (as control tokens) or split (as text)

    def format(self) -> str:
        """A few lines for the log: rows read, kept, skipped by reason, truncations, and the p50/p90/max of
        prompt and completion lengths, so a bad max_length or a mostly skipped file shows before training."""
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
        skipped = f"skipped {sum(self.skipped.values())}" + (f" ({reasons})" if reasons else "")
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.kinds.items()))
        lines = [
            f"rows read {self.rows}, kept {self.kept}{f' ({kinds})' if kinds else ''}, {skipped}",
            f"truncated {self.truncated} of {self.kept} kept {'rows' if kinds else 'pairs'}",
            f"prompt tokens: {spread(self.prompt_lengths)}",
            f"completion tokens ({'every completion' if kinds else 'chosen and rejected'}): "
            f"{spread(self.completion_lengths)}",
        ]
        if self.control_text:
            how = ("read as control tokens; set special_tokens_in_text=split to read them as text"
                   if self.special_tokens == "keep" else "read as text (special_tokens_in_text=split)")
            lines.append(f"warning: {self.control_text} pairs hold control tokens written as text "
                         f"({', '.join(self.control_found)}), {how}")
        return "\n".join(lines)


def percentile(values: list[int], percent: float) -> int:
    """Nearest-rank percentile: the smallest value with at least ``percent`` % of ``values`` at or below it."""
    return sorted(values)[max(1, math.ceil(percent / 100 * len(values))) - 1]


def spread(values: list[int]) -> str:
    """``"p50 a, p90 b, max c"`` of ``values``, or ``"none"`` when there are none."""
    return f"p50 {percentile(values, 50)}, p90 {percentile(values, 90)}, max {max(values)}" if values else "none"
