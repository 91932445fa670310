"""Bad data, fuzzed: whatever is in a preference file, reading it (``load_pairs``) and tokenising it
(``tokenize_pairs``) ends in pairs, skips counted by reason, or a :class:`DataError` that names the
file; never another exception, never a hang.

Hypothesis writes files of every accepted kind (.jsonl, .jsonl.gz, .json, .csv, .parquet) from rows with
missing and extra fields, wrong types, message lists with bad roles and contents, empty, huge and odd
Unicode text (lone surrogates, NUL, BOM, RTL marks, combining marks), then damages some of them:
truncated, invalid UTF-8, a byte flipped in the gzip stream, JSON nested too deep, ragged CSV rows.
Examples are derandomized (the same every run) and bounded in number and time.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import signal
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tiltlm.data import DataError, Pair, load_pairs, tokenize_pairs

HANG = 30  # seconds: an example that takes this long is a hang

FAST = settings(max_examples=120, deadline=timedelta(seconds=10), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(FAST, max_examples=40)  # CSV and Parquet go through datasets: ~0.1 s a file


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizer_builders import byte_bpe_tokenizer

    import datasets  # noqa: F401  (imported once here, not inside the first timed example)

    return byte_bpe_tokenizer()  # with a chat template, so message lists are rendered too


# --- what goes into a file -----------------------------------------------------------------------------

ODD = st.sampled_from(["", " ", "\x00", "\ud800", "\udfff", "\ufeff", "\u202e", "\u2028", "\r\n", "\t", "é",
                       "e\u0301", "🙂", "\U0010ffff", "\\", '"', ",", "\n\nHuman: hi", "\n\nAssistant:", "<|end|>",
                       "<|endoftext|>", "{{ x }}", "{% if %}"])
HUGE = st.sampled_from([4_000, 40_000]).map(lambda n: "good " * n)  # up to 200,000 characters
SMALL = st.one_of(st.text(max_size=30), st.lists(ODD, max_size=6).map("".join))
TEXT = st.one_of(SMALL, SMALL, SMALL, HUGE)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)
ROLE = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", ""]), SCALAR)
MESSAGE = st.one_of(st.fixed_dictionaries({"role": ROLE, "content": st.one_of(TEXT, SCALAR)},
                                          optional={"name": TEXT}), VALUE)
FIELD = st.one_of(TEXT, st.lists(MESSAGE, max_size=4), VALUE)
NAMES = st.sampled_from(["prompt", "chosen", "rejected", "extra", "", "Chosen"])
# Rows of the right shape with fuzzed text, so that many files get past reading into tokenisation.
TURN = st.builds(lambda role, text: {"role": role, "content": text}, st.sampled_from(["user", "system"]), TEXT)
REPLY = st.builds(lambda text: [{"role": "assistant", "content": text}], TEXT)
SHAPED = st.one_of(
    st.fixed_dictionaries({"prompt": TEXT, "chosen": TEXT, "rejected": TEXT}),
    st.fixed_dictionaries({"prompt": st.lists(TURN, min_size=1, max_size=2), "chosen": REPLY, "rejected": REPLY}),
    st.builds(lambda human, a, b: {"chosen": f"\n\nHuman: {human}\n\nAssistant: {a}",
                                   "rejected": f"\n\nHuman: {human}\n\nAssistant: {b}"}, TEXT, TEXT, TEXT),
)
ROW = st.one_of(
    SHAPED, SHAPED, SHAPED,
    st.fixed_dictionaries({"chosen": FIELD, "rejected": FIELD}, optional={"prompt": FIELD, "score": VALUE}),
    st.dictionaries(NAMES | st.text(max_size=6), FIELD, max_size=4),
    VALUE,  # not an object at all
)


@st.composite
def damaged(draw, raw: bytes) -> bytes:
    """``raw``, or ``raw`` cut short, with a byte that is not UTF-8, with a BOM, or with junk after it."""
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "bad-utf8", "bom", "junk"]))
    if damage == "truncate":
        return raw[:draw(st.integers(0, len(raw)))]
    if damage == "bad-utf8":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + raw[at:]
    if damage == "bom":
        return b"\xef\xbb\xbf" + raw
    if damage == "junk":
        return raw + draw(st.binary(max_size=20))
    return raw


def encode(value, ascii_only: bool) -> bytes:
    """JSON bytes; non-ASCII written raw (a lone surrogate then becomes bytes that are not UTF-8)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def clean(draw) -> bool:
    """A third of the files: every row of the right shape and the file undamaged, so that fuzzed text
    reaches tokenisation (one bad row stops a whole file)."""
    return draw(st.integers(0, 2)) == 0


@st.composite
def jsonl_bytes(draw) -> bytes:
    ascii_only = draw(st.booleans())
    if clean(draw):
        return b"\n".join(encode(row, ascii_only) for row in draw(st.lists(SHAPED, min_size=1, max_size=4)))
    row = ROW.map(lambda row: encode(row, ascii_only))
    lines = draw(st.lists(st.one_of(row, row, row, st.binary(max_size=10), st.just(b""), st.just(b"[" * 50_000)),
                          min_size=1, max_size=6))
    return draw(damaged(b"\n".join(lines)))


@st.composite
def json_bytes(draw) -> bytes:
    if clean(draw):
        return encode(draw(st.lists(SHAPED, min_size=1, max_size=4)), draw(st.booleans()))
    rows = draw(st.lists(ROW, max_size=5))
    document = draw(st.sampled_from(["list", "train", "data", "other", "scalar", "deep"]))
    value = {"list": rows, "train": {"train": rows}, "data": {"data": rows}, "other": {"rows": rows},
             "scalar": draw(SCALAR), "deep": None}[document]
    raw = b"[" * 50_000 + b"]" * 50_000 if document == "deep" else encode(value, draw(st.booleans()))
    return draw(damaged(raw))


@st.composite
def gzip_bytes(draw) -> bytes:
    packed = bytearray(gzip.compress(draw(jsonl_bytes())))
    damage = draw(st.sampled_from(["none", "truncate", "flip", "junk"]))
    if damage == "truncate":
        return bytes(packed[:draw(st.integers(0, len(packed) - 1))])
    if damage == "flip":
        at = draw(st.integers(0, len(packed) - 1))
        packed[at] ^= draw(st.integers(1, 255))
    if damage == "junk":
        packed += draw(st.binary(min_size=1, max_size=20))
    return bytes(packed)


@st.composite
def csv_bytes(draw) -> bytes:
    if clean(draw):
        rows = draw(st.lists(st.lists(TEXT, min_size=3, max_size=3), min_size=1, max_size=4))
        return _csv_text([["prompt", "chosen", "rejected"], *rows])
    header = draw(st.one_of(st.just(["prompt", "chosen", "rejected"]), st.just(["chosen", "rejected"]),
                            st.lists(NAMES | st.text(max_size=6), min_size=1, max_size=4)))
    cells = st.one_of(TEXT, SCALAR.map(str))
    width = st.one_of(st.just(len(header)), st.integers(0, len(header) + 1))  # ragged rows too
    rows = draw(st.lists(width.flatmap(lambda n: st.lists(cells, min_size=n, max_size=n)), max_size=5))
    raw = _csv_text([header, *rows])
    if draw(st.integers(0, 3)) == 0:
        raw += b'"unbalanced,' + draw(st.binary(max_size=5))
    return draw(damaged(raw))


def _csv_text(rows: list[list[str]]) -> bytes:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue().encode("utf-8", "surrogatepass")


@st.composite
def parquet_bytes(draw) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = draw(st.integers(0, 4))
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    kinds = {
        "string": (pa.string(), st.none() | st.text(max_size=20) | st.lists(ODD, max_size=4).map("".join)),
        "int": (pa.int64(), st.none() | st.integers(-2**63, 2**63 - 1)),
        "float": (pa.float64(), st.none() | st.floats(allow_nan=True)),
        "messages": (pa.list_(message), st.none() | st.lists(st.none() | st.fixed_dictionaries(
            {"role": st.none() | st.sampled_from(["user", "assistant", "x"]),
             "content": st.none() | st.text(max_size=10)}), max_size=3)),
        "struct": (message, st.none() | st.fixed_dictionaries({"role": st.none() | st.text(max_size=5),
                                                               "content": st.none() | st.text(max_size=5)})),
        "binary": (pa.binary(), st.none() | st.binary(max_size=10)),
        "strings": (pa.list_(pa.string()), st.none() | st.lists(st.none() | st.text(max_size=5), max_size=3)),
    }
    tidy = clean(draw)
    names = ["prompt", "chosen", "rejected"] if tidy else draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    rows = max(rows, 1) if tidy else rows
    columns = {}
    for name in names:
        arrow_type, values = (pa.string(), SMALL) if tidy else kinds[draw(st.sampled_from(sorted(kinds)))]
        # surrogates cannot be stored in Arrow strings: they are not Unicode scalar values
        cells = [_without_surrogates(v) for v in draw(st.lists(values, min_size=rows, max_size=rows))]
        columns[name] = pa.array(cells, type=arrow_type)
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    raw = buffer.getvalue()
    return raw[:draw(st.integers(0, len(raw)))] if not tidy and draw(st.booleans()) else raw


def _without_surrogates(value):
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_surrogates(v) for k, v in value.items()}
    return value


# --- what must come out --------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail an example that runs for ``seconds`` (a hang) instead of waiting forever."""
    def hang(*_):
        raise AssertionError(f"no outcome within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_outcome(raw: bytes, suffix: str, tokenizer) -> None:
    """Write ``raw`` as a ``suffix`` file and read and tokenise it: pairs with every row accounted for,
    or a DataError naming the file. Any other exception fails the example."""
    with tempfile.TemporaryDirectory() as directory, time_limit(HANG):
        path = Path(directory) / f"fuzzed{suffix}"
        path.write_bytes(raw)
        try:
            pairs = load_pairs(str(path))
            assert pairs and all(isinstance(pair, Pair) and pair.source.startswith(str(path)) for pair in pairs)
            kept, summary = tokenize_pairs(pairs, tokenizer, 64, 32)
        except DataError as error:
            assert path.name in str(error), f"the error does not name the file: {error}"
            event(f"DataError: {str(error).split(': ', 1)[1][:40] if ': ' in str(error) else error}")
            return
        event(f"{summary.kept} kept, {sum(summary.skipped.values())} skipped")
        assert summary.rows == len(pairs) == summary.kept + sum(summary.skipped.values())
        assert len(kept) == summary.kept


@FAST
@given(raw=jsonl_bytes())
def test_jsonl(raw, tokenizer):
    check_outcome(raw, ".jsonl", tokenizer)


@FAST
@given(raw=gzip_bytes())
def test_jsonl_gz(raw, tokenizer):
    check_outcome(raw, ".jsonl.gz", tokenizer)


@FAST
@given(raw=json_bytes())
def test_json(raw, tokenizer):
    check_outcome(raw, ".json", tokenizer)


@SLOW
@given(raw=csv_bytes())
def test_csv(raw, tokenizer):
    check_outcome(raw, ".csv", tokenizer)


@SLOW
@given(raw=parquet_bytes())
def test_parquet(raw, tokenizer):
    check_outcome(raw, ".parquet", tokenizer)


def test_the_fuzzer_reaches_both_outcomes(tokenizer):
    """The properties above are not vacuous: a good file gives pairs, a bad one a DataError."""
    good = encode({"prompt": "Hi", "chosen": " good", "rejected": " bad"}, True)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzzed.jsonl"
        path.write_bytes(good)
        assert len(tokenize_pairs(load_pairs(str(path)), tokenizer, 64, 32)[0]) == 1
        path.write_bytes(b"[" * 50_000)
        with pytest.raises(DataError, match="fuzzed.jsonl"):
            load_pairs(str(path))
