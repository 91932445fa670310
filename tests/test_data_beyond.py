"""Data beyond pairs: ranked lists and unpaired rows (reading, checking, tokenising), per-row weights,
expanding a ranking to pairs. Tokenised ids are checked against the pair path (a second code path that
tests/test_tokenize.py checks against the tokenizers themselves) and against the tokenizer directly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiltlm.data import (DataError, Pair, RankedList, TokenizedList, TokenizedPair, TokenizedUnpaired, Unpaired,
                         expand_ranking_to_pairs, load_examples, tokenize_examples, tokenize_pair, tokenize_pairs)
from tiltlm.data.formats import example_from_row
from tiltlm.data.tokenize import mismatched_unpaired
from tiltlm.data.types import ranks_of

BIG = 10_000
SRC = "data.jsonl:3"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


PROMPT = "Human: What is the capital of France? Assistant:"
ANSWERS = [" Paris is the capital of France.", " I do not know, sorry.", " Sure, what is the question?"]


# --- reading and checking -----------------------------------------------------------------------------


def test_ranked_row_with_a_ranking():
    example = example_from_row({"prompt": PROMPT, "completions": ANSWERS, "ranking": [2, 0, 1]}, SRC)
    assert example == RankedList(PROMPT, ANSWERS, ranking=[2, 0, 1], scores=None, source=SRC)
    assert example.ranks() == [1, 2, 0]


def test_ranked_row_with_scores_and_a_weight():
    row = {"prompt": PROMPT, "completions": ANSWERS, "scores": [7, 3.5, 7], "weight": 2}
    example = example_from_row(row, SRC)
    assert example == RankedList(PROMPT, ANSWERS, ranking=None, scores=[7.0, 3.5, 7.0], source=SRC, weight=2.0)
    assert example.ranks() == [0, 1, 0]


def test_ranks_are_dense_and_best_first():
    assert ranks_of(4, None, [3.0, 7.0, 7.0, 1.0]) == [1, 0, 0, 2]
    assert ranks_of(3, [1, 2, 0], None) == [2, 0, 1]


def test_conversational_ranked_row_normalises_like_a_pair():
    prompt = [user("Capital of France?")]
    row = {"prompt": prompt, "completions": ["Paris.", [user("Capital of France?"), bot("Lyon.")], [bot("No idea.")]],
           "ranking": [0, 2, 1]}
    example = example_from_row(row, SRC)
    assert example.prompt == prompt
    assert example.completions == [[bot("Paris.")], [bot("Lyon.")], [bot("No idea.")]]
    # a string prompt with message completions becomes a user message, as for pairs
    example = example_from_row({"prompt": "Hi", "completions": [[bot("a")], "b"], "scores": [1, 0]}, SRC)
    assert example.prompt == [user("Hi")] and example.completions == [[bot("a")], [bot("b")]]


def test_unpaired_row():
    example = example_from_row({"prompt": PROMPT, "completion": ANSWERS[0], "label": False}, SRC)
    assert example == Unpaired(PROMPT, ANSWERS[0], False, SRC, 1.0)
    example = example_from_row({"prompt": [user("Hi")], "completion": "Hello!", "label": True, "weight": 0.5}, SRC)
    assert example == Unpaired([user("Hi")], [bot("Hello!")], True, SRC, 0.5)


def test_pairs_read_as_before_and_take_a_weight():
    row = {"prompt": PROMPT, "chosen": ANSWERS[0], "rejected": ANSWERS[1]}
    assert example_from_row(row, SRC) == Pair(PROMPT, ANSWERS[0], ANSWERS[1], SRC, 1.0)
    assert example_from_row({**row, "weight": 0}, SRC).weight == 0.0
    assert example_from_row({**row, "weight": None}, SRC).weight == 1.0


RANKED = {"prompt": PROMPT, "completions": ANSWERS, "ranking": [0, 1, 2]}
UNPAIRED = {"prompt": PROMPT, "completion": ANSWERS[0], "label": True}
BAD_ROWS = [
    ({**RANKED, "ranking": [0, 1, 1]}, "field 'ranking'", "permutation of 0..2"),
    ({**RANKED, "ranking": [0, 1]}, "field 'ranking'", "permutation"),
    ({**RANKED, "ranking": [0, 1, 3]}, "field 'ranking'", "permutation"),
    ({**RANKED, "ranking": [0.0, 1, 2]}, "field 'ranking'", "permutation"),
    ({**RANKED, "ranking": [True, False, 2]}, "field 'ranking'", "permutation"),
    ({**RANKED, "ranking": "0,1,2"}, "field 'ranking'", "permutation"),
    ({**RANKED, "scores": [1, 2, 3]}, "exactly one of 'ranking'", "both"),
    ({"prompt": PROMPT, "completions": ANSWERS}, "exactly one of 'ranking'", "neither"),
    ({"prompt": PROMPT, "completions": ANSWERS, "scores": [1, 2]}, "field 'scores'", "expected 3 numbers"),
    ({"prompt": PROMPT, "completions": ANSWERS, "scores": [1, "2", 3]}, "field 'scores', item 1", "finite number"),
    ({"prompt": PROMPT, "completions": ANSWERS, "scores": [1, float("nan"), 3]}, "field 'scores', item 1", "finite"),
    ({"prompt": PROMPT, "completions": ANSWERS[:1], "ranking": [0]}, "field 'completions'", "at least 2"),
    ({"prompt": PROMPT, "completions": "text", "ranking": [0]}, "field 'completions'", "got str"),
    ({"prompt": PROMPT, "completions": [ANSWERS[0], 5], "ranking": [0, 1]}, "field 'completions[1]'", "got int"),
    ({"completions": ANSWERS, "ranking": [0, 1, 2]}, "missing field 'prompt'", "ranked list"),
    ({"prompt": [user("Hi")], "completions": [[user("x")], "b"], "ranking": [0, 1]},
     "field 'completions[0]'", "assistant"),
    ({**UNPAIRED, "label": 1}, "field 'label'", "true (desirable) or false"),
    ({**UNPAIRED, "label": "true"}, "field 'label'", "true (desirable) or false"),
    ({"prompt": PROMPT, "completion": ANSWERS[0]}, "missing field 'label'", "unpaired"),
    ({"completion": ANSWERS[0], "label": True}, "missing field 'prompt'", "unpaired"),
    ({**UNPAIRED, "completion": None}, "field 'completion'", "got null"),
    ({**UNPAIRED, "weight": -1}, "field 'weight'", ">= 0"),
    ({**RANKED, "weight": "2"}, "field 'weight'", ">= 0"),
    ({**RANKED, "weight": True}, "field 'weight'", ">= 0"),
    ({"prompt": PROMPT, "chosen": "a", "rejected": "b", "weight": float("inf")}, "field 'weight'", "finite"),
]


@pytest.mark.parametrize("row, field, expected", BAD_ROWS)
def test_bad_rows_are_one_line_errors_naming_the_place_and_field(row, field, expected):
    with pytest.raises(DataError) as error:
        example_from_row(row, SRC)
    message = str(error.value)
    assert message.startswith(f"{SRC}: ") and field in message and expected in message and "\n" not in message


def test_load_examples_reads_every_kind_with_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": PROMPT, "chosen": ANSWERS[0], "rejected": ANSWERS[1]}, RANKED, UNPAIRED]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples = load_examples(str(path))
    assert [type(e) for e in examples] == [Pair, RankedList, Unpaired]
    assert [e.source for e in examples] == [f"{path}:{n}" for n in (1, 2, 3)]
    path.write_text(json.dumps(RANKED) + "\n" + json.dumps({**UNPAIRED, "label": "yes"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: field 'label'"):
        load_examples(str(path))


# --- tokenising ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bpe", "sp"])
@pytest.mark.parametrize("limits", [(BIG, BIG), (14, 6), (9, 4)])
def test_ranked_list_tokenises_like_each_of_its_pairs(name, limits, request):
    tokenizer = request.getfixturevalue(name)
    texts = [ANSWERS, [[bot(a.strip())] for a in ANSWERS]]
    for prompt, completions in ((PROMPT, texts[0]), ([user("Capital of France?")], texts[1])):
        example = RankedList(prompt, completions, ranking=[1, 0, 2], source="s", weight=3.0)
        (got,), summary = tokenize_examples([example], tokenizer, *limits)
        assert isinstance(got, TokenizedList) and got.ranking == [1, 0, 2] and got.weight == 3.0
        for a, b in ((0, 1), (1, 2), (0, 2)):
            pair = tokenize_pair(Pair(prompt, completions[a], completions[b]), tokenizer, *limits)
            assert (got.prompt_ids, got.completions[a], got.completions[b]) == (
                pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)
        assert got.truncated == (limits != (BIG, BIG))
        assert summary.kinds == {"ranked lists": 1}


def test_completion_ids_are_the_tokenizers_own_plus_eos(bpe):
    (got,), _ = tokenize_examples([RankedList(PROMPT, ANSWERS, scores=[1.0, 2.0, 0.0])], bpe, BIG, BIG)
    assert got.prompt_ids == bpe(PROMPT, add_special_tokens=False)["input_ids"]
    assert got.completions == [bpe(a, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id] for a in ANSWERS]
    assert got.scores == [1.0, 2.0, 0.0] and got.ranks() == [1, 0, 2]


def test_unpaired_tokenises_like_a_chosen_completion(sp):
    example = Unpaired(PROMPT, ANSWERS[1], False, "u", 0.5)
    (got,), _ = tokenize_examples([example], sp, 12, 5)
    pair = tokenize_pair(Pair(PROMPT, ANSWERS[1], ANSWERS[0]), sp, 12, 5)
    assert got == TokenizedUnpaired(pair.prompt_ids, pair.chosen_ids, False, True, "u", 0.5)


def test_pairs_come_out_as_the_tokenizer_encodes_them(bpe):
    """Pairs and lists share one path now (tokenize_pairs is tokenize_examples), so a text pair is checked
    against the tokenizer itself: the prompt by its default encoding, each completion plus EOS."""
    pairs = [Pair(PROMPT, ANSWERS[0], ANSWERS[1], "a", 2.0), Pair(PROMPT, ANSWERS[2], ANSWERS[2], "b"),
             Pair([user("Hi")], [bot("Hello")], [bot("Go away")], "c")]
    kept, _ = tokenize_examples(pairs, bpe, BIG, BIG)
    plain = lambda text: bpe(text, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]  # noqa: E731
    assert (kept[0].prompt_ids, kept[0].chosen_ids, kept[0].rejected_ids) == (
        bpe(PROMPT)["input_ids"], plain(ANSWERS[0]), plain(ANSWERS[1]))
    kept, _ = tokenize_pairs(pairs, bpe, 12, 6)
    assert [p.weight for p in kept] == [2.0, 1.0]


def test_skips_and_the_summary_count_each_kind(bpe):
    examples = [
        RankedList(PROMPT, ANSWERS, ranking=[0, 1, 2]),
        RankedList(PROMPT, [ANSWERS[0], "  ", ANSWERS[1]], ranking=[0, 1, 2]),  # empty completion
        RankedList(PROMPT, [ANSWERS[0], ANSWERS[1], ANSWERS[0]], scores=[1, 2, 3]),  # duplicate
        # " Paris is ..." and " Paris was ..." share their first tokens: identical once cut to 1 token
        RankedList("Hi", [" Paris is the capital.", " Paris was the capital."], ranking=[0, 1]),
        Unpaired(PROMPT, ANSWERS[0], True),
        Unpaired(PROMPT, "", True),
        Pair(PROMPT, ANSWERS[0], ANSWERS[1]),
    ]
    prompt_len = len(bpe("Hi", add_special_tokens=False)["input_ids"])
    kept, summary = tokenize_examples(examples, bpe, BIG, BIG)
    assert [type(k) for k in kept] == [TokenizedList, TokenizedList, TokenizedUnpaired, TokenizedPair]
    assert summary.kinds == {"ranked lists": 2, "unpaired": 1, "pairs": 1}
    assert summary.skipped == {"empty completion": 2, "duplicate completions in a list": 1}
    assert (summary.rows, summary.kept) == (7, 4)
    assert len(summary.completion_lengths) == 3 + 2 + 1 + 2
    assert summary.format().splitlines()[0] == (
        "rows read 7, kept 4 (pairs 1, ranked lists 2, unpaired 1), skipped 3 "
        "(duplicate completions in a list: 1, empty completion: 2)")
    _, summary = tokenize_examples(examples[3:4], bpe, prompt_len + 1, BIG)
    assert summary.skipped == {"duplicate completions in a list after truncation": 1}
    _, summary = tokenize_examples(examples[4:5], bpe, 2, 2)
    assert summary.skipped == {"no completion token left": 1}


# --- expanding and mismatching --------------------------------------------------------------------------


def test_expand_a_strict_ranking_to_every_pair_best_first():
    ranked = TokenizedList([1], [[10], [11], [12]], ranking=[2, 0, 1], source="s", weight=0.5)
    pairs = expand_ranking_to_pairs(ranked)
    # order 2 > 0 > 1: (2,0), (2,1), (0,1)
    assert [(p.chosen_ids, p.rejected_ids) for p in pairs] == [([12], [10]), ([12], [11]), ([10], [11])]
    assert all(p.prompt_ids == [1] and p.weight == 0.5 and p.source == "s" for p in pairs)


def test_expand_scores_with_ties_makes_no_pair_within_a_tie():
    ranked = TokenizedList([1], [[10], [11], [12], [13]], scores=[1.0, 3.0, 3.0, 0.0])
    pairs = expand_ranking_to_pairs(ranked)
    assert {(p.chosen_ids[0], p.rejected_ids[0]) for p in pairs} == {(11, 10), (12, 10), (11, 13), (12, 13), (10, 13)}
    assert len(pairs) == 5


def test_mismatched_unpaired_pairs_each_prompt_with_the_next_completion():
    rows = [TokenizedUnpaired([1, 2], [10, 11, 12], True, source="a"),
            TokenizedUnpaired([3], [20], False, source="b"),
            TokenizedUnpaired([4, 5, 6], [30, 31], True, source="c")]
    got = mismatched_unpaired(rows, max_length=4)
    assert [(m.prompt_ids, m.completion_ids) for m in got] == [([1, 2], [20]), ([3], [30, 31]), ([4, 5, 6], [10])]
    assert [m.truncated for m in got] == [False, False, True]
    assert all(m.weight == 0.0 for m in got) and got[0].source == "a x b"
    with pytest.raises(ValueError, match="at least 2"):
        mismatched_unpaired(rows[:1], 4)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 5) | st.floats(allow_nan=True) | st.text(max_size=5),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(
                        st.sampled_from(["role", "content", "x"]), children, max_size=3), max_leaves=8)
FIELDS = ["prompt", "completions", "completion", "ranking", "scores", "label", "weight", "chosen", "rejected"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6))
def test_any_row_is_an_example_or_a_one_line_data_error(row):
    try:
        example = example_from_row(row, SRC)
    except DataError as error:
        assert str(error).startswith(f"{SRC}: ") and "\n" not in str(error)
        return
    assert isinstance(example, (Pair, RankedList, Unpaired)) and example.weight >= 0
    if isinstance(example, RankedList):
        assert sorted(example.ranks())[0] == 0 and len(example.ranks()) == len(example.completions) >= 2
