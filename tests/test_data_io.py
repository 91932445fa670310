"""Reading every accepted input (tiltlm.data.io through load_pairs): round trips through each file type,
written here with the standard library or pyarrow, and an error that names file, line and field for each
kind of bad input."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from tiltlm.data import DataError, Pair, load_pairs

TEXT_ROWS = [
    {"prompt": "\n\nHuman: Hi, \"friend\", how are you?\n\nAssistant:", "chosen": " Fine, thanks.",
     "rejected": " Go away."},
    {"prompt": "Café, 日本, 🙂", "chosen": "42", "rejected": ""},  # number-like and empty cells stay strings
    {"prompt": "NA", "chosen": "null", "rejected": "  leading spaces\r\nand a CRLF"},  # pandas NA spellings
]
CHAT_ROWS = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, \"there\""}],
     "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "What?"}]},
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5\n"}]},
]


def expected(rows: list[dict], where) -> list[Pair]:
    return [Pair(r["prompt"], r["chosen"], r["rejected"], where(n)) for n, r in enumerate(rows, start=1)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_jsonl_gz(path: Path, rows: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# round trips


@pytest.mark.parametrize("rows", [TEXT_ROWS, CHAT_ROWS], ids=["text", "chat"])
def test_jsonl_round_trip_numbers_lines(tmp_path, rows):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert load_pairs(str(path)) == expected(rows, lambda n: f"{path}:{n}")


@pytest.mark.parametrize("rows", [TEXT_ROWS, CHAT_ROWS], ids=["text", "chat"])
def test_jsonl_gz_round_trip(tmp_path, rows):
    path = write_jsonl_gz(tmp_path / "pairs.jsonl.gz", rows)
    assert load_pairs(str(path)) == expected(rows, lambda n: f"{path}:{n}")


def test_jsonl_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n" + json.dumps(TEXT_ROWS[0]) + "\n  \n" + json.dumps(TEXT_ROWS[1]) + "\r\n")
    assert [pair.source for pair in load_pairs(str(path))] == [f"{path}:2", f"{path}:4"]


@pytest.mark.parametrize("rows", [TEXT_ROWS, CHAT_ROWS], ids=["text", "chat"])
@pytest.mark.parametrize("wrap", [lambda rows: rows, lambda rows: {"train": rows, "test": []},
                                  lambda rows: {"data": rows}], ids=["list", "train-key", "data-key"])
def test_json_round_trip(tmp_path, rows, wrap):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(wrap(rows), indent=2))
    assert load_pairs(str(path)) == expected(rows, lambda n: f"{path}:row {n}")


def test_json_split_picks_the_key(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"train": TEXT_ROWS, "test": TEXT_ROWS[:1]}))
    assert load_pairs(str(path), split="test") == expected(TEXT_ROWS[:1], lambda n: f"{path}:row {n}")


def test_json_file_holding_json_lines_is_read_as_such(tmp_path):
    path = write_jsonl(tmp_path / "pairs.json", TEXT_ROWS)
    assert load_pairs(str(path)) == expected(TEXT_ROWS, lambda n: f"{path}:{n}")


def test_csv_round_trip_keeps_every_cell_a_string(tmp_path):
    path = write_csv(tmp_path / "pairs.csv", TEXT_ROWS)
    assert load_pairs(str(path)) == expected(TEXT_ROWS, lambda n: f"{path}:row {n}")


@pytest.mark.parametrize("writer, suffix", [(write_jsonl, ".jsonl"), (write_csv, ".csv")])
def test_utf8_byte_order_mark_is_ignored(tmp_path, writer, suffix):
    path = writer(tmp_path / f"bom{suffix}", TEXT_ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [(p.prompt, p.chosen, p.rejected) for p in load_pairs(str(path))] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in TEXT_ROWS]


def test_csv_columns_of_numbers_stay_strings(tmp_path):
    rows = [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}, {"prompt": "1+1=", "chosen": "2", "rejected": "3.0"}]
    path = write_csv(tmp_path / "sums.csv", rows)
    assert load_pairs(str(path)) == expected(rows, lambda n: f"{path}:row {n}")


@pytest.mark.parametrize("rows", [TEXT_ROWS, CHAT_ROWS], ids=["text", "chat"])
def test_parquet_round_trip(tmp_path, rows):
    path = write_parquet(tmp_path / "pairs.parquet", rows)
    assert load_pairs(str(path)) == expected(rows, lambda n: f"{path}:row {n}")


@pytest.mark.parametrize("rows", [TEXT_ROWS, CHAT_ROWS], ids=["text", "chat"])
def test_save_to_disk_round_trip(tmp_path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_pairs(str(tmp_path / "saved")) == expected(rows, lambda n: f"{tmp_path / 'saved'}:row {n}")


def test_saved_dataset_dict_uses_split_default_train(tmp_path):
    import datasets

    directory = str(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT_ROWS),
                          "test": datasets.Dataset.from_list(TEXT_ROWS[1:])}).save_to_disk(directory)
    assert load_pairs(directory) == expected(TEXT_ROWS, lambda n: f"{directory}[train]:row {n}")
    assert load_pairs(directory, split="test") == expected(TEXT_ROWS[1:], lambda n: f"{directory}[test]:row {n}")
    with pytest.raises(DataError, match=r"no split 'dev'; the saved DatasetDict has \['test', 'train'\]"):
        load_pairs(directory, split="dev")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_limit_takes_the_first_rows(tmp_path, suffix):
    writer = {".jsonl": write_jsonl, ".csv": write_csv, ".parquet": write_parquet}[suffix]
    path = writer(tmp_path / f"pairs{suffix}", TEXT_ROWS)
    assert [(p.prompt, p.chosen, p.rejected) for p in load_pairs(str(path), limit=2)] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in TEXT_ROWS[:2]]


# bad input


def error_of(source: str, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        load_pairs(source, **kwargs)
    return str(error.value)


def test_malformed_json_line_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TEXT_ROWS[0]) + "\n" + json.dumps(TEXT_ROWS[1]) + '\n{"prompt": "q", "chosen" "a"}\n')
    # column 26 is where the ':' is missing: after {"prompt": "q", "chosen" (25 characters)
    assert error_of(str(path)) == f"{path}:3: invalid JSON at column 26: Expecting ':' delimiter"


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TEXT_ROWS[0]) + "\n[1, 2]\n")
    message = error_of(str(path))
    assert message.startswith(f"{path}:2: expected a JSON object") and "got list" in message


def test_missing_column_names_line_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [TEXT_ROWS[0], {"prompt": "q", "chosen": "a", "answer": "b"}])
    message = error_of(str(path))
    assert message.startswith(f"{path}:2: missing field 'rejected'")
    assert "['answer', 'chosen', 'prompt']" in message and "accepted layouts" in message


def test_wrong_type_names_line_and_field(tmp_path):
    rows = [TEXT_ROWS[0], TEXT_ROWS[1], {"prompt": "q", "chosen": 7, "rejected": "b"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert error_of(str(path)) == f"{path}:3: field 'chosen': expected a string or a list of messages, got int"


def test_message_without_role_names_row_field_and_message(tmp_path):
    rows = [CHAT_ROWS[0], {"prompt": [{"content": "hi"}], "chosen": [], "rejected": []}]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    message = error_of(str(path))
    assert message.startswith(f"{path}:row 2: field 'prompt', message 1: missing 'role'")


def test_csv_wrong_row_names_the_row(tmp_path):
    path = write_csv(tmp_path / "bad.csv", [{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b"}])
    message = error_of(str(path))
    assert message.startswith(f"{path}:row 1: fields 'chosen' and 'rejected': no shared prompt")


@pytest.mark.parametrize("name, content", [("empty.jsonl", b""), ("blank.jsonl", b"\n \n"), ("empty.csv", b""),
                                           ("header.csv", b"prompt,chosen,rejected\n"), ("empty.json", b"[]"),
                                           ("empty.jsonl.gz", gzip.compress(b""))])
def test_empty_input(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    message = error_of(str(path))
    assert message.startswith(f"{path}: empty")


def test_empty_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({name: pa.array([], pa.string()) for name in ("prompt", "chosen", "rejected")}), path)
    assert error_of(str(path)) == f"{path}: empty, no rows found"


def test_damaged_parquet(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", TEXT_ROWS)
    path.write_bytes(path.read_bytes()[:-20])
    assert error_of(str(path)).startswith(f"{path}: cannot read as Parquet")


def test_unknown_extension_lists_the_accepted_ones(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("hello")
    message = error_of(str(path))
    assert message.startswith(f"{path}: unknown file type '.txt'") and ".jsonl.gz" in message and ".parquet" in message


def test_truncated_gzip(tmp_path):
    whole = gzip.compress(("".join(json.dumps(r) + "\n" for r in TEXT_ROWS * 50)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    assert error_of(str(path)).startswith(f"{path}: truncated gzip file")


def test_not_gzip_at_all(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl.gz", TEXT_ROWS)
    assert error_of(str(path)).startswith(f"{path}: not a valid gzip file")


@pytest.mark.parametrize("name", ["latin.jsonl", "latin.csv", "latin.json"])
def test_non_utf8_names_the_line_and_column(tmp_path, name):
    header = b"prompt,chosen,rejected\n" if name.endswith(".csv") else b""
    good = b'"q","a","b"\n' if name.endswith(".csv") else json.dumps(TEXT_ROWS[0]).encode() + b"\n"
    bad = (b'"caf\xe9","a","b"\n' if name.endswith(".csv")
           else b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    path = tmp_path / name
    path.write_bytes(header + good + bad)
    line = 3 if name.endswith(".csv") else 2
    column = 5 if name.endswith(".csv") else 16  # the 0xe9 byte, counted from 1
    assert error_of(str(path)) == (f"{path}:{line}: not valid UTF-8: byte 0xe9 at column {column} "
                                   f"(save the file as UTF-8)")


def test_json_with_an_unexpected_top_level(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"rows": TEXT_ROWS}))
    assert error_of(str(path)) == (f"{path}: expected a JSON list of objects, or an object with a list under "
                                   f"'train' or 'data'; found keys ['rows']")


def test_invalid_json_document_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "q",\n   "chosen": }\n]')
    assert error_of(str(path)).startswith(f"{path}: invalid JSON at line 3 column 14")


def test_directory_not_written_by_save_to_disk(tmp_path):
    assert "not one written by datasets' save_to_disk" in error_of(str(tmp_path))


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    assert error_of(str(tmp_path / "nope.jsonl")).startswith(f"{tmp_path / 'nope.jsonl'}: no such file or directory;")


@pytest.mark.parametrize("name", ["data/explict", "./explicit", "data/a/b", "~/no-such-data-1234"])
def test_mistyped_local_names_fail_at_once_without_the_hub(name, tmp_path, monkeypatch):
    """issue 15, item 12: ``data/explict`` where ``data/`` is a local directory is a path, not a hub id."""
    import time

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.perf_counter()
    assert f"{name}: no such file or directory" in error_of(name)
    assert time.perf_counter() - started < 2


def test_hub_name_without_network_says_not_found_locally(monkeypatch):
    # Offline mode makes the hub attempt fail at once, as a missing network does (after retries).
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = error_of("someone/no-such-dataset-here")
    assert message.startswith("someone/no-such-dataset-here: not found locally")
    assert "hub" in message


def test_limit_must_be_positive(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", TEXT_ROWS)
    assert "limit = 0" in error_of(str(path), limit=0)


# issue 15, item 14: CSV errors name the line


@pytest.mark.parametrize("content, line, what", [
    (b'prompt,chosen,rejected\nq1,a,b\nq2,"unclosed,b\nq3,c,d\n', 3, "never closed"),
    (b'prompt,chosen,rejected\n"q1\nstill q1",a,b\nq2,"x"y,b\n', 4, "quote"),
    (b'prompt,chosen,rejected\nq1,a,b\n\nq2,a,b,extra\n', 4, "4 cells, the header has 3"),
    (b'prompt,chosen,rejected\nq1,a\n', 2, "2 cells, the header has 3"),
])
def test_csv_errors_name_the_line(tmp_path, content, line, what):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    message = error_of(str(path))
    assert message.startswith(f"{path}:{line}: ") and what in message and "\n" not in message


def test_csv_quoted_cells_span_lines_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_bytes(b'prompt,chosen,rejected\r\n"two\nlines","a, b",""""\r\n\r\nq,,c\n')
    pairs = load_pairs(str(path))
    assert [(p.prompt, p.chosen, p.rejected, p.source) for p in pairs] == [
        ("two\nlines", "a, b", '"', f"{path}:row 1"), ("q", "", "c", f"{path}:row 2")]


@pytest.mark.parametrize("writer, suffix", [(write_jsonl, ".jsonl"), (write_csv, ".csv"), (write_parquet, ".parquet")])
def test_reading_a_local_file_prints_nothing(tmp_path, capfd, writer, suffix):
    """issue 15, item 18, of its kind: no upstream progress bar ("Generating train split") while reading."""
    path = writer(tmp_path / f"pairs{suffix}", TEXT_ROWS)
    assert len(load_pairs(str(path))) == len(TEXT_ROWS)
    assert capfd.readouterr() == ("", "")
