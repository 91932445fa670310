"""From a raw row to a :class:`Pair`: which layout the row uses, checking its fields, and finding the
prompt of layouts that do not state it.

Layouts, decided per row from its fields (a ``prompt`` field makes the row explicit; extra fields are
ignored):

* explicit text: ``prompt``, ``chosen``, ``rejected`` strings.
* explicit conversational: any of the three is a message list (``[{"role", "content"}, ...]``). A string
  prompt becomes one user message and a string completion one assistant message; completions that
  repeat the prompt's turns before their own (whole conversations) have those turns removed.
* implicit text: only ``chosen`` and ``rejected``, whole dialogues in the Anthropic HH-RLHF layout
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. The prompt is their longest common prefix, cut back to end
  right after the last ``"\\n\\nAssistant:"`` in it; the completions are the rest, leading space
  included (``" Sure..."``), so ``prompt + completion`` gives back the original text exactly.
* implicit conversational: only ``chosen`` and ``rejected``, whole message lists. The prompt is their
  longest common run of leading messages, cut back so that it does not end with an assistant message
  (the completions then start with the assistant turn where the two differ).

Empty completions and identical completions are valid here; tokenisation skips and counts them.

Beyond pairs (:func:`example_from_row` decides the kind from the fields):

* ranked list: ``prompt``, ``completions`` (a list of K >= 2 texts) and either ``ranking`` (completion
  indices, best first, a permutation of 0..K-1) or ``scores`` (K numbers, higher is better, ties
  allowed). Texts are strings or message lists, normalised as for explicit pairs.
* unpaired: ``prompt``, ``completion`` and ``label`` (true: desirable, false: undesirable).
* any row, pairs included, may carry ``weight``: a finite number >= 0 (default 1) multiplying its loss.
"""

from __future__ import annotations

import os
import math
from typing import Any

from tiltlm.data.types import DataError, Messages, Pair, RankedList, Text, Unpaired

ASSISTANT_MARKER = "\n\nAssistant:"

LAYOUTS = ("accepted layouts: 'prompt' + 'chosen' + 'rejected' (strings or message lists), or 'chosen' + "
           "'rejected' only (whole dialogues: HH-RLHF text '\\n\\nHuman: ...\\n\\nAssistant: ...' or "
           "message lists)")


def pair_from_row(row: dict[str, Any], source: str) -> Pair:
    """The :class:`Pair` a row describes; a :class:`DataError` naming ``source`` and the field if it cannot."""
    missing = [name for name in ("chosen", "rejected") if name not in row]
    if missing:
        raise DataError(f"{source}: missing field {missing[0]!r}; found columns {sorted(row)}; {LAYOUTS}")
    if "prompt" in row:
        prompt, (chosen, rejected) = _checked_texts(row["prompt"], [row["chosen"], row["rejected"]],
                                                    ["chosen", "rejected"], source)
    else:
        prompt, chosen, rejected = _implicit(row, source)
    return Pair(prompt, chosen, rejected, source, checked_weight(row, source))


def example_from_row(row: dict[str, Any], source: str) -> Pair | RankedList | Unpaired:
    """The example a row describes: a :class:`RankedList` when it has ``completions``, an
    :class:`Unpaired` one when it has ``completion``, else a :class:`Pair` (:func:`pair_from_row`)."""
    if "completions" in row:
        return ranked_from_row(row, source)
    if "completion" in row:
        return unpaired_from_row(row, source)
    return pair_from_row(row, source)


def _is_number(value: Any) -> bool:
    """A finite int or float (JSON's true and false are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def checked_weight(row: dict[str, Any], source: str) -> float:
    """The row's ``weight``: absent or null means 1; else a finite number >= 0."""
    weight = row.get("weight")
    if weight is None:
        return 1.0
    if not _is_number(weight) or weight < 0:
        raise DataError(f"{source}: field 'weight': expected a finite number >= 0, got {weight!r}")
    return float(weight)


def ranked_from_row(row: dict[str, Any], source: str) -> RankedList:
    """A :class:`RankedList` from ``prompt``, ``completions`` and ``ranking`` or ``scores``."""
    if "prompt" not in row:
        raise DataError(f"{source}: missing field 'prompt' (a row with 'completions' is a ranked list: "
                        f"'prompt', 'completions', and 'ranking' or 'scores')")
    completions = row["completions"]
    if not isinstance(completions, list) or len(completions) < 2:
        got = f"{len(completions)} item(s)" if isinstance(completions, list) else _kind_name(completions)
        raise DataError(f"{source}: field 'completions': expected a list of at least 2 completions, got {got}")
    names = [f"completions[{k}]" for k in range(len(completions))]
    prompt, texts = _checked_texts(row["prompt"], completions, names, source)
    ranking, scores = _ranking_or_scores(row, len(texts), source)
    return RankedList(prompt, texts, ranking, scores, source, checked_weight(row, source))


def _ranking_or_scores(row: dict[str, Any], count: int, source: str) -> tuple[list[int] | None, list[float] | None]:
    has_ranking, has_scores = row.get("ranking") is not None, row.get("scores") is not None
    if has_ranking == has_scores:
        raise DataError(f"{source}: a ranked list needs exactly one of 'ranking' (indices, best first) and "
                        f"'scores' (one number per completion), got {'both' if has_ranking else 'neither'}")
    if has_ranking:
        ranking = row["ranking"]
        if (not isinstance(ranking, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ranking)
                or sorted(ranking) != list(range(count))):
            raise DataError(f"{source}: field 'ranking': expected a permutation of 0..{count - 1} (completion "
                            f"indices, best first), got {ranking!r}")
        return list(ranking), None
    scores = row["scores"]
    if not isinstance(scores, list) or len(scores) != count:
        got = f"{len(scores)} scores" if isinstance(scores, list) else _kind_name(scores)
        raise DataError(f"{source}: field 'scores': expected {count} numbers (one per completion), got {got}")
    for k, score in enumerate(scores):
        if not _is_number(score):
            raise DataError(f"{source}: field 'scores', item {k}: expected a finite number, got {score!r}")
    return None, [float(score) for score in scores]


def unpaired_from_row(row: dict[str, Any], source: str) -> Unpaired:
    """An :class:`Unpaired` example from ``prompt``, ``completion`` and a boolean ``label``."""
    for name in ("prompt", "label"):
        if name not in row:
            raise DataError(f"{source}: missing field {name!r} (a row with 'completion' is unpaired: "
                            f"'prompt', 'completion', 'label')")
    label = row["label"]
    if not isinstance(label, bool):
        raise DataError(f"{source}: field 'label': expected true (desirable) or false (undesirable), "
                        f"got {label!r}")
    prompt, (completion,) = _checked_texts(row["prompt"], [row["completion"]], ["completion"], source)
    return Unpaired(prompt, completion, label, source, checked_weight(row, source))


def _checked_texts(prompt: Any, completions: list, names: list[str], source: str) -> tuple[Text, list[Text]]:
    """The checked prompt and completions of an explicit row: all strings as they are; else all
    conversational (see the module docstring)."""
    prompt = checked_text(prompt, "prompt", source)
    completions = [checked_text(c, name, source) for c, name in zip(completions, names)]
    if isinstance(prompt, str) and all(isinstance(c, str) for c in completions):
        return prompt, completions
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    replies = []
    for completion, name in zip(completions, names):
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        elif completion[:len(prompt)] == prompt:  # a whole conversation: its turns after the prompt's
            completion = completion[len(prompt):]
        replies.append(_starting_with_assistant(completion, name, source))
    return prompt, replies


def _implicit(row: dict[str, Any], source: str) -> tuple[Text, Text, Text]:
    chosen = checked_text(row["chosen"], "chosen", source)
    rejected = checked_text(row["rejected"], "rejected", source)
    if isinstance(chosen, str) != isinstance(rejected, str):
        expected = "a string" if isinstance(chosen, str) else "a list of messages"
        raise DataError(f"{source}: field 'rejected': expected {expected} like 'chosen' (no 'prompt' field, "
                        f"so both must be whole dialogues of the same kind), got {_kind_name(row['rejected'])}")
    if isinstance(chosen, str):
        split = split_dialogues(chosen, rejected)
        if split is None:
            raise DataError(f"{source}: fields 'chosen' and 'rejected': no shared prompt: their common "
                            f"beginning contains no {ASSISTANT_MARKER!r} (no 'prompt' field, so both must be "
                            f"HH-RLHF dialogues sharing their turns up to an assistant reply)")
        return split
    split = split_conversations(chosen, rejected)
    if split is None:
        raise DataError(f"{source}: fields 'chosen' and 'rejected': no shared prompt: the conversations do "
                        f"not begin with the same non-assistant message(s) (no 'prompt' field, so the "
                        f"prompt must be their shared opening turns)")
    for name, completion in zip(("chosen", "rejected"), split[1:]):
        _starting_with_assistant(completion, name, source)
    return split


def split_dialogues(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """``(prompt, chosen_completion, rejected_completion)`` of two HH-RLHF dialogues, or None when their
    common beginning holds no ``"\\n\\nAssistant:"``. The prompt ends with that marker; the completions
    keep the text after it as is (usually a leading space)."""
    shared = len(os.path.commonprefix([chosen, rejected]))
    marker = chosen.rfind(ASSISTANT_MARKER, 0, shared)
    if marker < 0:
        return None
    end = marker + len(ASSISTANT_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


def split_conversations(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages] | None:
    """``(prompt, chosen_completion, rejected_completion)`` of two message lists, or None when they share
    no leading non-assistant message. The prompt is the shared leading messages without any trailing
    assistant ones."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if shared == 0:
        return None
    return chosen[:shared], chosen[shared:], rejected[shared:]


def checked_text(value: Any, name: str, source: str) -> Text:
    """``value`` if it is a string or a well-formed message list (keys set to None, which Arrow adds for
    fields other messages have, are dropped); else a :class:`DataError` naming the field."""
    if isinstance(value, str):
        return _unicode(value, f"{source}: field {name!r}")
    if not isinstance(value, list):
        raise DataError(f"{source}: field {name!r}: expected a string or a list of messages, "
                        f"got {_kind_name(value)}")
    return [_checked_message(message, name, index, source) for index, message in enumerate(value, start=1)]


def _checked_message(message: Any, name: str, index: int, source: str) -> dict[str, Any]:
    where = f"{source}: field {name!r}, message {index}"
    if not isinstance(message, dict):
        raise DataError(f"{where}: expected an object with 'role' and 'content' strings, got {_kind_name(message)}")
    message = {key: value for key, value in message.items() if value is not None}
    for key in ("role", "content"):
        if key not in message:
            raise DataError(f"{where}: missing {key!r} (a message needs 'role' and 'content' strings); "
                            f"found keys {sorted(message)}")
        if not isinstance(message[key], str):
            raise DataError(f"{where}: {key!r}: expected a string, got {_kind_name(message[key])}")
        _unicode(message[key], f"{where}: {key!r}")
    return message


def _unicode(text: str, where: str) -> str:
    """``text`` if it is valid Unicode. JSON's escapes can spell a lone surrogate (``"\\ud800"``), which
    Python strings hold but no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(f"{where}: not valid Unicode: an unpaired surrogate U+{ord(text[error.start]):04X} at "
                        f"character {error.start + 1}") from None
    return text


def _starting_with_assistant(completion: Messages, name: str, source: str) -> Messages:
    """A completion is the assistant's reply: its first message (if any) must have role ``assistant``."""
    if completion and completion[0]["role"] != "assistant":
        raise DataError(f"{source}: field {name!r}: expected the completion to start with an assistant "
                        f"message, got role {completion[0]['role']!r}")
    return completion


def _kind_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
