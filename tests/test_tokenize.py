"""Tokenising pairs (tiltlm.data.tokenize) with three tokenizers: a byte-level BPE, a sentencepiece Llama
tokenizer (BOS by default, "▁" word starts) and SmolLM2's real one with its chat template. Expectations
come from the tokenizers themselves (their own encoding of the prompt, their decoding of our ids), from
hand-derived slices, and from the templates' known shapes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiltlm.data import DataError, DataSummary, Pair, TokenizedPair, load_pairs, tokenize_pair, tokenize_pairs
from tiltlm.data.formats import pair_from_row
from tiltlm.data.tokenize import summarize

HH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
BIG = 10_000  # limits that never truncate here


@pytest.fixture(scope="module")
def smol():
    from tiltlm.models import ModelError, load_tokenizer

    try:
        return load_tokenizer("smollm2-135m")
    except ModelError as error:
        pytest.skip(str(error))


@pytest.fixture(params=["bpe", "sp", "smol"])
def named(request):
    return request.param, request.getfixturevalue(request.param)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


ROWS = {
    "explicit": {"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:",
                 "chosen": " Paris is the capital of France.", "rejected": " I do not know, sorry."},
    "conversational": {"prompt": [user("What is the capital of France?")],
                       "chosen": [bot("Paris is the capital of France.")], "rejected": [bot("I do not know.")]},
    "implicit text": {
        "chosen": "\n\nHuman: Tell me a joke.\n\nAssistant: No.\n\nHuman: Please?\n\nAssistant: Sure, the fox jumps.",
        "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant: No.\n\nHuman: Please?\n\nAssistant: No, sorry."},
    "implicit conversational": {
        "chosen": [user("Tell me a joke."), bot("No."), user("Please?"), bot("Sure, the fox jumps.")],
        "rejected": [user("Tell me a joke."), bot("No."), user("Please?"), bot("No, sorry.")]},
}


@pytest.fixture(params=list(ROWS))
def pair(request) -> Pair:
    return pair_from_row(ROWS[request.param], f"rows.jsonl:{list(ROWS).index(request.param) + 1}")


# How each test template ends an assistant turn, and so what the scored completion must end with:
# bpe: "<|end|>\n" then our appended EOS; sp: "</s>" which is EOS; smol: "<|im_end|>" (EOS), "\n" cut.
TEMPLATE_TURN_END = {"bpe": "<|end|>\n", "sp": "</s>", "smol": "<|im_end|>\n"}
SCORED_END = {"bpe": "<|end|>\n<|endoftext|>", "sp": "</s>", "smol": "<|im_end|>"}


def expected_prompt_ids(tokenizer, pair: Pair) -> list[int]:
    """The prompt as the tokenizer encodes it by itself: default special tokens for text, the template's
    own tokenisation for messages."""
    if isinstance(pair.prompt, str):
        return tokenizer(pair.prompt)["input_ids"]
    return tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=True)["input_ids"]


# the prefix property, rendering and EOS, over every tokenizer and format


def test_prompt_ids_are_the_tokenizers_own_encoding_of_the_prompt(named, pair):
    _, tokenizer = named
    result = tokenize_pair(pair, tokenizer, BIG, BIG)
    assert result.prompt_ids == expected_prompt_ids(tokenizer, pair)
    assert result.truncated is False and result.source == pair.source


def test_prompt_and_completion_decode_to_the_rendered_pair(named, pair):
    name, tokenizer = named
    result = tokenize_pair(pair, tokenizer, BIG, BIG)
    for completion, ids in ((pair.chosen, result.chosen_ids), (pair.rejected, result.rejected_ids)):
        if isinstance(pair.prompt, str):
            # HH layout: completions start with a space, which every tokenizer here keeps on decoding.
            assert tokenizer.decode(result.prompt_ids + ids, skip_special_tokens=True) == pair.prompt + completion
            assert ids[-1] == tokenizer.eos_token_id
        else:
            full = tokenizer.apply_chat_template(pair.prompt + completion, tokenize=False)
            assert full.endswith(TEMPLATE_TURN_END[name])
            scored = full[: -len(TEMPLATE_TURN_END[name])] + SCORED_END[name]
            assert tokenizer.decode(result.prompt_ids + ids, skip_special_tokens=False) == scored


def test_completions_end_with_exactly_one_eos(named, pair):
    _, tokenizer = named
    result = tokenize_pair(pair, tokenizer, BIG, BIG)
    eos = tokenizer.eos_token_id
    for ids in (result.chosen_ids, result.rejected_ids):
        assert ids[-1] == eos and ids.count(eos) == 1


def test_whitespace_after_the_final_eos_is_cut(bpe, monkeypatch):
    # A template that ends turns with EOS then a newline, as SmolLM2's does: the newline is not scored.
    monkeypatch.setattr(bpe, "chat_template", "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                                              "<|endoftext|>\n{% endfor %}{% if add_generation_prompt %}"
                                              "<|assistant|>{% endif %}")
    result = tokenize_pair(Pair([user("hi")], [bot("the dog")], [bot("the sun")], "x"), bpe, BIG, BIG)
    assert bpe.decode(result.chosen_ids) == "the dog<|endoftext|>"
    assert bpe.decode(result.rejected_ids) == "the sun<|endoftext|>"


def test_text_completion_already_ending_with_eos_keeps_one(named):
    _, tokenizer = named
    pair = Pair("Q:", " yes" + tokenizer.eos_token, " no", "x")
    result = tokenize_pair(pair, tokenizer, BIG, BIG)
    assert result.chosen_ids == tokenizer(" yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert result.rejected_ids == tokenizer(" no", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_sentencepiece_completion_without_leading_space_decodes_close_to_the_text(sp):
    # Tokenised alone, "Paris" gets sentencepiece's word-start "▁": joined it reads " Paris". The prompt
    # stays an exact prefix; only that one space differs.
    result = tokenize_pair(Pair("Capital of France?", "Paris.", "Rome.", "x"), sp, BIG, BIG)
    assert result.prompt_ids == sp("Capital of France?")["input_ids"]
    assert sp.decode(result.prompt_ids + result.chosen_ids, skip_special_tokens=True) == "Capital of France? Paris."


def test_batched_and_single_paths_agree(named):
    _, tokenizer = named
    pairs = [pair_from_row(row, f"rows.jsonl:{n}") for n, row in enumerate(ROWS.values(), start=1)]
    pairs.append(Pair("q", " ", " a", "empty"))
    for max_length, max_prompt_length in ((BIG, BIG), (20, 12), (9, 8)):
        batched, summary = tokenize_pairs(pairs, tokenizer, max_length, max_prompt_length)
        single = [tokenize_pair(p, tokenizer, max_length, max_prompt_length) for p in pairs]
        assert batched == [r for r in single if isinstance(r, TokenizedPair)]
        assert summary.rows == len(pairs) and summary.kept == len(batched)


# truncation


def reference_ids(tokenizer, pair: Pair) -> tuple[list[int], list[int], list[int]]:
    """Untruncated ids of a text pair straight from the tokenizer: the prompt by default encoding, each
    completion without special tokens plus EOS."""
    eos = [tokenizer.eos_token_id]
    plain = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return tokenizer(pair.prompt)["input_ids"], plain(pair.chosen) + eos, plain(pair.rejected) + eos


LONG = Pair("\n\nHuman: How do I bake bread? Tell me about the flour, water, salt and yeast.\n\nAssistant:",
            " Mix flour, water, salt and yeast, then bake it in the sun.",
            " I do not know any good jokes, sorry, but the fox jumps over the dog.", "long.jsonl:1")


def test_bpe_truncation_keeps_prompt_end_and_completion_start(bpe):
    prompt, chosen, rejected = reference_ids(bpe, LONG)
    assert len(prompt) > 12 and len(chosen) > 7 and len(rejected) > 7
    result = tokenize_pair(LONG, bpe, max_length=19, max_prompt_length=12)
    assert result == TokenizedPair(prompt[-12:], chosen[:7], rejected[:7], truncated=True, source="long.jsonl:1")


def test_sentencepiece_truncation_keeps_bos_then_the_prompt_end(sp):
    prompt, chosen, rejected = reference_ids(sp, LONG)
    assert prompt[0] == sp.bos_token_id and len(prompt) > 12
    result = tokenize_pair(LONG, sp, max_length=19, max_prompt_length=12)
    assert result.prompt_ids == [sp.bos_token_id] + prompt[-11:]
    assert (result.chosen_ids, result.rejected_ids, result.truncated) == (chosen[:7], rejected[:7], True)


def test_only_the_longer_completion_is_cut(bpe):
    prompt, chosen, rejected = reference_ids(bpe, LONG)
    room = len(chosen) + 1  # chosen fits whole (EOS kept), rejected is longer
    assert len(rejected) > room
    result = tokenize_pair(LONG, bpe, max_length=len(prompt) + room, max_prompt_length=len(prompt))
    assert result == TokenizedPair(prompt, chosen, rejected[:room], truncated=True, source="long.jsonl:1")


def test_exact_fit_is_not_truncated(bpe):
    prompt, chosen, rejected = reference_ids(bpe, LONG)
    longest = max(len(chosen), len(rejected))
    result = tokenize_pair(LONG, bpe, max_length=len(prompt) + longest, max_prompt_length=len(prompt))
    assert result == TokenizedPair(prompt, chosen, rejected, truncated=False, source="long.jsonl:1")


@settings(max_examples=150, deadline=None)
@given(max_length=st.integers(2, 60), max_prompt_length=st.integers(1, 40), use_sp=st.booleans())
def test_truncation_rules_hold_for_any_limits(bpe, sp, max_length, max_prompt_length, use_sp):
    tokenizer = sp if use_sp else bpe
    prompt, chosen, rejected = reference_ids(tokenizer, LONG)
    head = prompt[:1] if use_sp else []  # the BOS that survives prompt truncation
    result = tokenize_pair(LONG, tokenizer, max_length, max_prompt_length)
    kept_end = max_prompt_length - len(head)
    expected_prompt = prompt if len(prompt) <= max_prompt_length else head + prompt[len(prompt) - kept_end:]
    room = max_length - len(expected_prompt)
    if room <= 0:
        assert result == "no completion token left"
        return
    if chosen[:room] == rejected[:room]:
        assert result == "identical after truncation"
        return
    assert result.prompt_ids == expected_prompt and len(result.prompt_ids) <= max_prompt_length
    assert result.chosen_ids == chosen[:room] and result.rejected_ids == rejected[:room]
    assert len(result.prompt_ids) + max(len(result.chosen_ids), len(result.rejected_ids)) <= max_length
    assert result.truncated == (len(prompt) > max_prompt_length or max(len(chosen), len(rejected)) > room)


# skips and the summary


def test_every_skip_reason_is_counted(bpe):
    pairs = [
        Pair("q", " sun", " dog", "a.jsonl:1"),  # kept
        Pair("q", "", " dog", "a.jsonl:2"),  # empty completion
        Pair("q", " sun", " \n ", "a.jsonl:3"),  # whitespace only: empty completion
        Pair([user("q")], [bot("")], [bot("x")], "a.jsonl:4"),  # empty assistant turn
        Pair([user("q")], [], [bot("x")], "a.jsonl:5"),  # no assistant turn at all
        Pair("q", " same", " same", "a.jsonl:6"),  # identical
        Pair([user("q")], [bot("same")], [bot("same")], "a.jsonl:7"),  # identical messages
        Pair("the quick brown fox jumps over the lazy dog " * 3, " sun", " dog", "a.jsonl:8"),  # no room
        Pair("q", " the quick brown fox jumps over the lazy dog", " the quick brown fox jumps over the cat",
             "a.jsonl:9"),  # the same first tokens
    ]
    # max_length 6 with a 6-token prompt budget: pair 8's prompt takes every position.
    kept, summary = tokenize_pairs(pairs, bpe, max_length=6, max_prompt_length=6)
    assert [p.source for p in kept] == ["a.jsonl:1"]
    assert summary.skipped == {"empty completion": 4, "chosen identical to rejected": 2,
                               "no completion token left": 1, "identical after truncation": 1}
    assert (summary.rows, summary.kept, summary.truncated) == (9, 1, 0)
    assert [tokenize_pair(p, bpe, 6, 6) for p in pairs[1:]] == [
        "empty completion"] * 4 + ["chosen identical to rejected"] * 2 + ["no completion token left",
                                                                           "identical after truncation"]


def test_summary_counts_lengths_of_kept_pairs():
    results = [TokenizedPair([1] * n, [2] * (n + 1), [3] * (2 * n), truncated=n > 8, source=str(n))
               for n in range(1, 11)]
    summary = summarize(results + ["empty completion", "empty completion", "no completion token left"])
    assert summary == DataSummary(rows=13, kept=10, skipped={"empty completion": 2, "no completion token left": 1},
                                  truncated=2, prompt_lengths=list(range(1, 11)),
                                  completion_lengths=[x for n in range(1, 11) for x in (n + 1, 2 * n)])
    # Nearest rank over 10 values: p50 is the 5th smallest, p90 the 9th. Completions: 2..11 and 2,4,..,20
    # sorted: 2 2 3 4 4 5 6 6 7 8 8 9 10 10 11 12 14 16 18 20 -> 10th is 8, 18th is 16.
    assert summary.format() == (
        "rows read 13, kept 10, skipped 3 (empty completion: 2, no completion token left: 1)\n"
        "truncated 2 of 10 kept pairs\n"
        "prompt tokens: p50 5, p90 9, max 10\n"
        "completion tokens (chosen and rejected): p50 8, p90 16, max 20")


def test_percentile_is_nearest_rank():
    from tiltlm.data.types import percentile

    # rank = ceil(p/100 * n): 5 values -> p50 is the 3rd (2.5 rounds up), p90 the 5th, p20 the 1st.
    values = [50, 10, 40, 20, 30]
    assert [percentile(values, p) for p in (20, 50, 90, 100)] == [10, 30, 50, 50]
    assert percentile([7], 50) == 7


def test_empty_summary_formats():
    assert DataSummary().format() == ("rows read 0, kept 0, skipped 0\ntruncated 0 of 0 kept pairs\n"
                                      "prompt tokens: none\ncompletion tokens (chosen and rejected): none")


# errors


def test_template_whose_generation_prompt_is_not_a_prefix_is_an_error(bpe, monkeypatch):
    monkeypatch.setattr(bpe, "chat_template", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                              "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    with pytest.raises(DataError) as error:
        tokenize_pairs([Pair([user("hi")], [bot("a")], [bot("b")], "chat.jsonl:4")], bpe, BIG, BIG)
    assert str(error.value).startswith("chat.jsonl:4: the chat template renders the prompt")


def test_conversational_pair_without_a_chat_template_is_an_error(bpe, monkeypatch):
    monkeypatch.setattr(bpe, "chat_template", None)
    with pytest.raises(DataError) as error:
        tokenize_pair(Pair([user("hi")], [bot("a")], [bot("b")], "chat.jsonl:2"), bpe, BIG, BIG)
    assert str(error.value).startswith("chat.jsonl:2: cannot render this conversational pair")


def test_limits_must_leave_room(bpe):
    with pytest.raises(ValueError, match="max_prompt_length >= 1"):
        tokenize_pairs([], bpe, max_length=10, max_prompt_length=0)


# the real HH-RLHF harmless-base test split


def test_hh_loads_and_tokenises_quickly_with_smollm2(smol):
    if not HH.is_file():
        pytest.skip(f"{HH} not present")
    start = time.perf_counter()
    pairs = load_pairs(str(HH))
    kept, summary = tokenize_pairs(pairs, smol, max_length=1024, max_prompt_length=512)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"{elapsed:.1f} s"  # about 2 s alone on 2 cores; generous for a loaded machine
    assert summary.rows == 2312 and summary.skipped == {"empty completion": 4} and summary.kept == 2308
    by_source = {p.source: p for p in pairs}
    eos = smol.eos_token_id
    wrong = []  # sources only: the texts are red-team dialogues and are not to be printed
    for result in kept:
        pair = by_source[result.source]
        longest = max(len(result.chosen_ids), len(result.rejected_ids))
        if result.truncated:
            fits = len(result.prompt_ids) <= 512 and len(result.prompt_ids) + longest <= 1024
            wrong += [] if fits else [result.source]
            continue
        # SmolLM2's byte-level BPE adds no BOS to text: the ids decode back to the exact dialogue + EOS.
        exact = (smol.decode(result.prompt_ids + result.chosen_ids) == pair.prompt + pair.chosen + "<|im_end|>"
                 and smol.decode(result.prompt_ids + result.rejected_ids) == pair.prompt + pair.rejected + "<|im_end|>"
                 and result.chosen_ids.count(eos) == 1 and result.rejected_ids.count(eos) == 1)
        wrong += [] if exact else [result.source]
    assert wrong == []
    assert summary.truncated == sum(r.truncated for r in kept) > 0


# issue 15, item 1: an empty prompt leaves the first completion token without a token to predict it from


def test_empty_text_prompt_gets_bos_when_the_tokenizer_has_one(bpe):
    # bpe adds no BOS by default but has one: the first completion token is then scored after BOS
    assert bpe("a")["input_ids"][:1] != [bpe.bos_token_id]
    pair = Pair("", " sun", " dog", "a.jsonl:1")
    kept, summary = tokenize_pairs([pair], bpe, BIG, BIG - 1)
    assert [p.prompt_ids for p in kept] == [[bpe.bos_token_id]]
    assert tokenize_pair(pair, bpe, BIG, BIG - 1).prompt_ids == [bpe.bos_token_id]
    assert tokenize_pair(pair, bpe, BIG, 1).prompt_ids == [bpe.bos_token_id]  # BOS survives prompt truncation


def test_empty_prompt_without_bos_is_skipped_and_counted(bpe):
    import copy

    no_bos = copy.deepcopy(bpe)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    pairs = [Pair("", " sun", " dog", "a.jsonl:1"), Pair("q", " sun", " dog", "a.jsonl:2")]
    kept, summary = tokenize_pairs(pairs, no_bos, BIG, BIG - 1)
    assert [p.source for p in kept] == ["a.jsonl:2"]
    assert summary.skipped == {"empty prompt (no BOS token to start from)": 1}
    assert tokenize_pair(pairs[0], no_bos, BIG, BIG - 1) == "empty prompt (no BOS token to start from)"


# issue 15, item 7: the work per row is bounded by the limits, not by the row's length


WORDS = st.sampled_from(["the", " quick", " brown", " fox", "!", " ", "\n", "Human:", " Paris", "é", "日本",
                         "  ", "####", "123", "<|end|>", "\t"])


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.lists(WORDS, max_size=400).map("".join), min_size=3, max_size=3),
       max_length=st.integers(2, 24), prompt_share=st.floats(0.05, 0.95), use_sp=st.booleans())
def test_cutting_text_to_the_budget_never_changes_the_kept_ids(bpe, sp, texts, max_length, prompt_share, use_sp):
    """Texts are cut to a character budget before tokenising; the ids kept equal those of tokenising the
    whole text and then truncating (small limits, so long texts are cut)."""
    from tiltlm.data.tokenize import fit, with_eos

    tokenizer = sp if use_sp else bpe
    prompt, chosen, rejected = texts[0], texts[1] + " a", texts[2] + " b"
    max_prompt_length = max(1, min(max_length - 1, round(prompt_share * max_length)))
    result = tokenize_pair(Pair(prompt, chosen, rejected, "x"), tokenizer, max_length, max_prompt_length)

    def whole(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    head = [tokenizer.bos_token_id] if use_sp or not whole(prompt) else []
    eos = tokenizer.eos_token_id
    expected = fit(Pair(prompt, chosen, rejected, "x"), head, whole(prompt),
                   [with_eos(whole(chosen), eos), with_eos(whole(rejected), eos)], max_length, max_prompt_length)
    assert result == expected


def test_a_huge_row_costs_what_the_limits_allow(bpe):
    """One row of 12 MB of text with max_length 128: tokenising it whole took ~13 s and 1.3 GB."""
    import time

    row = Pair("the quick brown fox " * 300_000, " yes" * 1_000_000, " no" * 1_000_000, "big.jsonl:1")
    started = time.perf_counter()
    kept, summary = tokenize_pairs([row], bpe, 128, 64)
    assert time.perf_counter() - started < 1.0
    assert summary.truncated == 1 and len(kept[0].prompt_ids) == 64
    assert len(kept[0].chosen_ids) == 64 and len(kept[0].rejected_ids) == 64


# issue 15, item 20: control tokens written in the data's text


def test_control_strings_in_text_are_counted_and_kept_by_default(bpe):
    end = bpe.convert_tokens_to_ids("<|end|>")
    pairs = [Pair("q", " sun <|end|> more", " dog", "a.jsonl:1"), Pair("q", " sun", " dog", "a.jsonl:2"),
             Pair([user("say <|endoftext|>")], [bot("ok")], [bot("no")], "a.jsonl:3")]
    kept, summary = tokenize_pairs(pairs, bpe, BIG, BIG - 1)
    assert summary.control_text == 2
    assert "2 pairs hold control tokens written as text (<|endoftext|>, <|end|>)" in summary.format()
    assert "special_tokens_in_text=split" in summary.format()
    assert end in kept[0].chosen_ids  # keep: the string became the control token


def test_split_reads_control_strings_as_text(bpe, sp):
    for tokenizer, control in ((bpe, "<|end|>"), (sp, "</s>")):
        control_id = tokenizer.convert_tokens_to_ids(control)
        text = Pair("q " + control, " sun " + control + " more", " dog", "a.jsonl:1")
        kept, summary = tokenize_pairs([text], tokenizer, BIG, BIG - 1, special_tokens="split")
        assert summary.control_text == 1 and "read as text" in summary.format()
        pair = kept[0]
        assert control_id not in pair.prompt_ids and control_id not in pair.chosen_ids[:-1]
        assert tokenizer.decode(pair.chosen_ids[:-1]).strip() == "sun " + control + " more"
        assert tokenize_pair(text, tokenizer, BIG, BIG - 1, special_tokens="split") == pair


def test_split_keeps_the_templates_own_control_tokens(named):
    """A conversational pair whose messages hold control strings: with split, the template's control
    tokens stay control tokens and the user's become text. Expectation from the same pair with a plain
    word in place of the string, tokenised the usual way: as many control ids (the template's), and the
    decoded text holds the string once more (the user's, as text)."""
    name, tokenizer = named
    control = {"bpe": "<|end|>", "sp": "</s>", "smol": "<|im_end|>"}[name]
    written = Pair([user(f"say {control} now")], [bot(f"I say {control} ok")], [bot("no")], "a.jsonl:1")
    plain = Pair([user("say WORD now")], [bot("I say WORD ok")], [bot("no")], "a.jsonl:1")
    if name == "sp":  # sentencepiece adds "▁" to the first piece only: cutting at control tokens would differ
        with pytest.raises(DataError, match="a.jsonl:1: .*special_tokens_in_text=keep"):
            tokenize_pairs([written], tokenizer, BIG, BIG - 1, special_tokens="split")
        return
    split, summary = tokenize_pairs([written], tokenizer, BIG, BIG - 1, special_tokens="split")
    usual, _ = tokenize_pairs([plain], tokenizer, BIG, BIG - 1)
    assert summary.control_text == 1
    control_id = tokenizer.convert_tokens_to_ids(control)
    for got, want in ((split[0].prompt_ids, usual[0].prompt_ids), (split[0].chosen_ids, usual[0].chosen_ids)):
        assert got.count(control_id) == want.count(control_id)  # only the template's
        assert tokenizer.decode(got).count(control) == tokenizer.decode(want).count(control) + 1


def test_pairs_without_control_strings_are_the_same_in_both_modes(named, pair):
    name, tokenizer = named
    split = tokenize_pair(pair, tokenizer, BIG, BIG - 1, special_tokens="split")
    assert split == tokenize_pair(pair, tokenizer, BIG, BIG - 1)


def test_protected_encoding_equals_the_tokenizers_own_where_the_user_wrote_no_control_string(named):
    """The split path cuts a rendering at the template's control tokens and tokenises the pieces; on a
    rendering with no user control strings that equals tokenising it whole."""
    from tiltlm.data.specials import control_strings, encode_protected, segments_faithful
    from tiltlm.data.tokenize import render_texts

    name, tokenizer = named
    strings = control_strings(tokenizer)
    assert segments_faithful(tokenizer, strings) == (name != "sp")  # sp: "▁" only at the start of the text
    if name == "sp":
        return
    for row in ("conversational", "implicit conversational"):
        pair = pair_from_row(ROWS[row], "x")
        prompt, completions, _ = render_texts(pair.prompt, [pair.chosen, pair.rejected], tokenizer, "x")
        for text in (prompt, *completions):
            assert encode_protected(tokenizer, text, strings) == tokenizer(text, add_special_tokens=False)["input_ids"]
