"""Layouts of a row and the prompt of implicit layouts (tiltlm.data.formats), on hand-made rows, generated
dialogues, and the real HH-RLHF harmless-base test split."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiltlm.data import DataError, Pair, load_pairs
from tiltlm.data.formats import pair_from_row, split_conversations, split_dialogues

HH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
SRC = "pairs.jsonl:7"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


# explicit layouts


def test_explicit_text_row_becomes_the_same_strings():
    row = {"prompt": "Q?", "chosen": " yes", "rejected": " no", "id": 3}  # extra fields are ignored
    assert pair_from_row(row, SRC) == Pair("Q?", " yes", " no", SRC)


def test_explicit_conversational_row_keeps_the_messages():
    row = {"prompt": [user("hi")], "chosen": [bot("hello")], "rejected": [bot("go away")]}
    assert pair_from_row(row, SRC) == Pair([user("hi")], [bot("hello")], [bot("go away")], SRC)


def test_string_parts_of_a_conversational_row_become_messages():
    row = {"prompt": "hi", "chosen": [bot("hello")], "rejected": "go away"}
    assert pair_from_row(row, SRC) == Pair([user("hi")], [bot("hello")], [bot("go away")], SRC)


def test_completions_that_repeat_the_prompt_turns_lose_them():
    # UltraFeedback-style: prompt string, completions whole conversations starting with that prompt.
    row = {"prompt": "hi", "chosen": [user("hi"), bot("hello")], "rejected": [user("hi"), bot("go away")]}
    assert pair_from_row(row, SRC) == Pair([user("hi")], [bot("hello")], [bot("go away")], SRC)


def test_arrow_null_keys_are_dropped_from_messages():
    row = {"prompt": [{"role": "user", "content": "hi", "name": None}], "chosen": [bot("a")], "rejected": [bot("b")]}
    assert pair_from_row(row, SRC).prompt == [user("hi")]


# implicit text (HH-RLHF layout)


def test_hh_prompt_ends_after_the_last_shared_assistant_marker():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Goodbye, friend."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Go away."
    pair = pair_from_row({"chosen": chosen, "rejected": rejected}, SRC)
    assert pair == Pair("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:",
                        " Goodbye, friend.", " Go away.", SRC)


def test_hh_completions_sharing_their_first_words_still_split_at_the_marker():
    row = {"chosen": "\n\nHuman: Q\n\nAssistant: Sure, yes", "rejected": "\n\nHuman: Q\n\nAssistant: Sure, no"}
    pair = pair_from_row(row, SRC)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("\n\nHuman: Q\n\nAssistant:", " Sure, yes", " Sure, no")


def test_hh_dialogues_diverging_at_an_earlier_turn_split_there():
    chosen = "\n\nHuman: A\n\nAssistant: x\n\nHuman: B\n\nAssistant: y"
    rejected = "\n\nHuman: A\n\nAssistant: z\n\nHuman: B\n\nAssistant: y"
    assert split_dialogues(chosen, rejected) == ("\n\nHuman: A\n\nAssistant:", " x\n\nHuman: B\n\nAssistant: y",
                                                 " z\n\nHuman: B\n\nAssistant: y")


def test_hh_marker_cut_by_the_divergence_is_not_used():
    # The texts differ inside the second "\n\nAssistant:", so only the first one is shared.
    chosen = "\n\nHuman: A\n\nAssistant: x\n\nAssistant: y"
    rejected = "\n\nHuman: A\n\nAssistant: x\n\nAssistance"
    assert split_dialogues(chosen, rejected) == ("\n\nHuman: A\n\nAssistant:", " x\n\nAssistant: y", " x\n\nAssistance")


def test_hh_empty_response_is_kept_for_tokenisation_to_skip():
    pair = pair_from_row({"chosen": "\n\nHuman: Q\n\nAssistant: ", "rejected": "\n\nHuman: Q\n\nAssistant: No."}, SRC)
    assert (pair.chosen, pair.rejected) == (" ", " No.")


def test_hh_rows_without_a_shared_assistant_marker_are_errors():
    with pytest.raises(DataError) as error:
        pair_from_row({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: x"}, SRC)
    assert SRC in str(error.value) and "'chosen'" in str(error.value) and "\\n\\nAssistant:" in str(error.value)


turn_text = st.text(alphabet="abc ?.\n", min_size=0, max_size=8)


@settings(max_examples=200, deadline=None)
@given(shared=st.lists(st.tuples(turn_text, turn_text), min_size=1, max_size=3), last=turn_text,
       tail_a=turn_text, tail_b=turn_text)
def test_hh_split_gives_back_both_dialogues(shared, last, tail_a, tail_b):
    # Dialogues built from turns: the shared ones, a last human turn, then two replies.
    head = "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in shared) + f"\n\nHuman: {last}\n\nAssistant:"
    chosen, rejected = head + tail_a, head + tail_b
    # The replies' alphabet cannot spell the marker, so the prompt is exactly the shared head, whatever
    # the replies have in common.
    assert split_dialogues(chosen, rejected) == (head, tail_a, tail_b)


# implicit conversational


def test_message_lists_split_at_the_last_shared_non_assistant_turn():
    chosen = [user("a"), bot("x"), user("b"), bot("y")]
    rejected = [user("a"), bot("x"), user("b"), bot("z")]
    pair = pair_from_row({"chosen": chosen, "rejected": rejected}, SRC)
    assert pair == Pair([user("a"), bot("x"), user("b")], [bot("y")], [bot("z")], SRC)


def test_message_lists_sharing_an_assistant_turn_do_not_put_it_in_the_prompt():
    chosen = [user("a"), bot("x")]
    rejected = [user("a"), bot("x"), user("b"), bot("z")]
    assert split_conversations(chosen, rejected) == ([user("a")], [bot("x")], [bot("x"), user("b"), bot("z")])


def test_message_lists_with_a_system_turn_keep_it_in_the_prompt():
    system = {"role": "system", "content": "be nice"}
    assert split_conversations([system, user("a"), bot("x")], [system, user("a"), bot("y")]) == (
        [system, user("a")], [bot("x")], [bot("y")])


def test_message_lists_without_a_shared_opening_are_errors():
    with pytest.raises(DataError) as error:
        pair_from_row({"chosen": [user("a"), bot("x")], "rejected": [user("b"), bot("x")]}, SRC)
    assert SRC in str(error.value) and "'chosen'" in str(error.value)


# bad rows


def test_missing_column_lists_the_columns_and_the_layouts():
    with pytest.raises(DataError) as error:
        pair_from_row({"prompt": "q", "chosen": "a", "rejceted": "b"}, SRC)
    message = str(error.value)
    assert SRC in message and "'rejected'" in message and "'rejceted'" in message and "layouts" in message


@pytest.mark.parametrize("value, kind", [(3, "int"), (None, "null"), ({"role": "user"}, "dict"), (1.5, "float")])
def test_wrong_type_names_the_field_and_what_was_expected(value, kind):
    with pytest.raises(DataError) as error:
        pair_from_row({"prompt": "q", "chosen": value, "rejected": "b"}, SRC)
    assert str(error.value) == (f"{SRC}: field 'chosen': expected a string or a list of messages, got {kind}")


@pytest.mark.parametrize("message, missing", [({"content": "hi"}, "'role'"), ({"role": "assistant"}, "'content'")])
def test_message_missing_role_or_content_names_field_and_message(message, missing):
    with pytest.raises(DataError) as error:
        pair_from_row({"prompt": [user("q")], "chosen": [message], "rejected": [bot("b")]}, SRC)
    message_text = str(error.value)
    assert all(part in message_text for part in (SRC, "'chosen'", "message 1", missing))


def test_message_that_is_not_an_object_is_an_error():
    with pytest.raises(DataError, match=r"field 'prompt', message 2: expected an object"):
        pair_from_row({"prompt": [user("q"), "hi"], "chosen": [bot("a")], "rejected": [bot("b")]}, SRC)


def test_message_content_must_be_a_string():
    with pytest.raises(DataError, match=r"field 'rejected', message 1: 'content': expected a string, got list"):
        pair_from_row({"prompt": [user("q")], "chosen": [bot("a")],
                       "rejected": [{"role": "assistant", "content": []}]}, SRC)


def test_completion_must_start_with_an_assistant_message():
    with pytest.raises(DataError, match=r"field 'rejected': expected the completion to start with an assistant"):
        pair_from_row({"prompt": [user("q")], "chosen": [bot("a")], "rejected": [user("b")]}, SRC)


def test_implicit_rows_must_have_two_dialogues_of_the_same_kind():
    with pytest.raises(DataError) as error:
        pair_from_row({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": [user("q"), bot("b")]}, SRC)
    assert SRC in str(error.value) and "field 'rejected'" in str(error.value)


# the real HH-RLHF harmless-base test split


@pytest.fixture(scope="module")
def hh_rows() -> list[dict]:
    if not HH.is_file():
        pytest.skip(f"{HH} not present")
    with gzip.open(HH, "rt", encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


# Failures report row numbers only: the texts are red-team dialogues and are not to be printed.


def test_hh_split_rebuilds_every_row_exactly(hh_rows):
    pairs = load_pairs(str(HH))
    assert len(pairs) == len(hh_rows) == 2312
    assert [pair.source for pair in pairs] == [f"{HH}:{n}" for n in range(1, 2313)]
    wrong = [n for n, (pair, row) in enumerate(zip(pairs, hh_rows), start=1)
             if pair.prompt + pair.chosen != row["chosen"] or pair.prompt + pair.rejected != row["rejected"]
             or not pair.prompt.endswith("\n\nAssistant:")]
    assert wrong == []


def test_hh_known_counts(hh_rows):
    """Counted a second way, from each dialogue alone: the prompt up to its own last "\\n\\nAssistant:"."""
    pairs = load_pairs(str(HH))

    def own_prompt(text: str) -> str:
        return text[:text.rindex("\n\nAssistant:") + len("\n\nAssistant:")]

    same_own_prompt = [own_prompt(row["chosen"]) == own_prompt(row["rejected"]) for row in hh_rows]
    assert sum(same_own_prompt) == 2307
    # Where each dialogue's own last turn gives the same prompt, the shared-prefix rule finds that prompt.
    assert [n for n, (pair, row, same) in enumerate(zip(pairs, hh_rows, same_own_prompt), start=1)
            if same and pair.prompt != own_prompt(row["chosen"])] == []
    # In the 5 others one reply itself contains "\n\nAssistant:"; the shared-prefix rule still splits them
    # at the last turn the two dialogues share, so the completion holds that extra text.
    others = [pair for pair, same in zip(pairs, same_own_prompt) if not same]
    assert len(others) == 5
    assert [pair.source for pair in others if "\n\nAssistant:" not in pair.chosen + pair.rejected] == []
    assert sum(not pair.chosen.strip() for pair in pairs) == 4
    assert sum(not pair.rejected.strip() for pair in pairs) == 0
