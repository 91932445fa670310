"""Reading preference data into raw rows: ``(source, fields)`` with ``source`` naming the file and line or row.

Each reader turns one kind of input into the same thing, a list of ``(source, dict)``, and turns every
failure into a :class:`DataError` that names the file and, where there is one, the line or row. What
the fields mean is decided later (``formats.py``); here we only get the records out intact.

Accepted inputs, chosen by the path:

* ``.jsonl`` / ``.jsonl.gz``: one JSON object a line; blank lines are allowed and still counted, so
  ``source`` is ``"data.jsonl:12"`` with the 1-based line number an editor shows.
* ``.json``: a list of objects, or an object holding that list under the key ``split`` (when given),
  else ``"train"``, else ``"data"``. A ``.json`` file that is really JSON Lines is read as such.
  ``source`` is ``"data.json:row 3"`` (1-based position in the list).
* ``.csv``: a header line, then one pair a row, read with Python's ``csv`` module: every cell is the
  string written (empty cells are ``""``), blank lines are skipped, a row must have as many cells as
  the header. Cells are text, so CSV holds the text formats only. ``source`` is ``"data.csv:row 3"``,
  rows counted from 1 after the header; errors name the line (``"data.csv:7: ..."``).
* ``.parquet``: through pyarrow; ``"data.parquet:row 3"``.
* a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``split``, default
  ``"train"``, picks the split of a DatasetDict); ``"dir:row 3"`` or ``"dir[test]:row 3"``.
* anything else that does not exist locally and does not look like a local path (``tiltlm.paths``
  says what does) is taken as a hub dataset name for ``datasets.load_dataset`` (``split`` default
  ``"train"``); ``"name[train]:row 3"``.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Any

from tiltlm.data.types import DataError
from tiltlm.paths import looks_like_path, missing_path_message

Row = tuple[str, dict[str, Any]]

FILE_TYPES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
ACCEPTED = ", ".join(FILE_TYPES) + ", a datasets save_to_disk directory, or a hub dataset name"


def read_rows(source: str, split: str | None = None, limit: int | None = None) -> list[Row]:
    """All rows of ``source`` (at most ``limit``), each with the label that names where it came from."""
    if limit is not None and limit < 1:
        raise DataError(f"{source}: limit = {limit}: expected a positive number of rows, or None for all")
    path = Path(source).expanduser()
    if path.is_dir():
        rows = _read_saved(path, source, split)
    elif path.is_file():
        rows = _read_file(path, source, split, limit)
    elif looks_like_path(source, FILE_TYPES):
        raise DataError(missing_path_message(source))
    else:
        rows = _read_hub(source, split)
    if not rows:
        raise DataError(f"{source}: empty, no rows found")
    return rows if limit is None else rows[:limit]


def _read_file(path: Path, source: str, split: str | None, limit: int | None) -> list[Row]:
    name = path.name.lower()
    if path.stat().st_size == 0:
        raise DataError(f"{source}: empty file, no rows found")
    if name.endswith(".jsonl.gz"):
        return _parse_jsonl(_without_bom(_gunzip(path, source)), source, limit)
    if name.endswith(".jsonl"):
        return _parse_jsonl(_without_bom(path.read_bytes()), source, limit)
    if name.endswith(".json"):
        return _parse_json(_without_bom(path.read_bytes()), source, split, limit)
    if name.endswith(".csv"):
        return _read_csv(path, source)
    if name.endswith(".parquet"):
        return _read_parquet(path, source)
    raise DataError(f"{source}: unknown file type {''.join(path.suffixes) or '(no extension)'!r}; "
                    f"expected one of {ACCEPTED}")


def _gunzip(path: Path, source: str) -> bytes:
    """The decompressed bytes; a truncated or corrupt archive is an error, not a silently short file."""
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except EOFError as error:
        raise DataError(f"{source}: truncated gzip file (the compressed stream ends early): {error}") from error
    except (gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{source}: not a valid gzip file: {error}") from error


def _without_bom(raw: bytes) -> bytes:
    """``raw`` without the UTF-8 byte-order mark some Windows editors write first (JSON forbids it)."""
    return raw.removeprefix(codecs.BOM_UTF8)


def _decode(raw: bytes, source: str, line_offset: int = 0) -> str:
    """UTF-8 text of ``raw``; invalid bytes are reported with their line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = line_offset + raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{source}:{line}: not valid UTF-8: byte 0x{raw[error.start]:02x} at column {column} "
                        f"(save the file as UTF-8)") from error


def _parse_jsonl(raw: bytes, source: str, limit: int | None) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        text = _decode(line, source, number - 1)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{source}:{number}: invalid JSON at column {error.colno}: {error.msg}") from error
        except RecursionError:  # Python's parser recurses once per nesting level
            raise DataError(f"{source}:{number}: JSON nested too deeply to read") from None
        rows.append((f"{source}:{number}", _as_object(record, f"{source}:{number}")))
    return rows


def _parse_json(raw: bytes, source: str, split: str | None, limit: int | None) -> list[Row]:
    try:
        document = json.loads(_decode(raw, source))
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            return _parse_jsonl(raw, source, limit)
        raise DataError(f"{source}: invalid JSON at line {error.lineno} column {error.colno}: "
                        f"{error.msg}") from error
    except RecursionError:  # Python's parser recurses once per nesting level
        raise DataError(f"{source}: JSON nested too deeply to read") from None
    records = _json_records(document, source, split)
    return [(where, _as_object(record, where)) for where, record in _numbered(records, source)]


def _json_records(document: Any, source: str, split: str | None) -> list:
    """The list of records a .json document holds: itself, or the list under ``split``/"train"/"data"."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        keys = [split] if split else ["train", "data"]
        for key in keys:
            if isinstance(document.get(key), list):
                return document[key]
        raise DataError(f"{source}: expected a JSON list of objects, or an object with a list under "
                        f"{' or '.join(repr(k) for k in keys)}; found keys {sorted(document)}")
    raise DataError(f"{source}: expected a JSON list of objects, got {type(document).__name__}")


def _as_object(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with fields such as 'prompt', 'chosen', 'rejected', "
                        f"got {type(record).__name__}")
    return record


def _read_csv(path: Path, source: str) -> list[Row]:
    """Rows of a CSV file with a header line, read with Python's ``csv`` module, which knows the line
    each record starts on, so every error names it (pandas reports neither an unclosed quote's line nor
    a ragged row's). Cells are strings as written; blank lines are skipped."""
    text = _decode(_without_bom(path.read_bytes()), source)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[Row] = []
    header: list[str] | None = None
    line = 1  # the line the record being read starts on
    try:
        for cells in reader:
            if cells and header is None:
                header = cells
            elif cells and len(cells) != len(header):
                raise DataError(f"{source}:{line}: {len(cells)} cells, the header has {len(header)} "
                                f"({', '.join(header)}); quote cells that hold commas")
            elif cells:  # not a blank line
                rows.append((f"{source}:row {len(rows) + 1}", dict(zip(header, cells))))
            line = reader.line_num + 1
    except csv.Error as error:
        raise DataError(f"{source}:{line}: {_csv_problem(str(error))}") from None
    if not rows:
        raise DataError(f"{source}: empty, no rows found after the header line")
    return rows


def _csv_problem(message: str) -> str:
    """The csv module's complaint, said for a user who edits CSV files."""
    if "unexpected end of data" in message:
        return "a quoted cell opened on this line is never closed (no closing '\"' before the end of the file)"
    if "expected after" in message:  # "',' expected after '\"'"
        return "a quote inside a quoted cell must be doubled (\"\"), or the cell must end after its closing quote"
    return f"cannot read as CSV: {message}"


def _read_parquet(path: Path, source: str) -> list[Row]:
    """Rows of a Parquet file, through pyarrow (what ``datasets`` uses underneath, without its cache
    and its "Generating train split" progress bar)."""
    import pyarrow.parquet

    try:
        records = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as error:  # arrow raises many types for a damaged file
        raise DataError(f"{source}: cannot read as Parquet: {error}") from error
    return _numbered(records, source)


def _read_saved(path: Path, source: str, split: str | None) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(f"{source}: a directory, but not one written by datasets' save_to_disk "
                        f"(expected {ACCEPTED}): {error}") from error
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DataError(f"{source}: no split {name!r}; the saved DatasetDict has {sorted(loaded)}")
        return _numbered(loaded[name], f"{source}[{name}]")
    return _numbered(loaded, source)


def _read_hub(source: str, split: str | None) -> list[Row]:
    import datasets

    name = split or "train"
    try:
        table = datasets.load_dataset(source, split=name)
    except ConnectionError as error:
        raise DataError(f"{source}: not found locally, and the Hugging Face hub could not be reached to "
                        f"look for a dataset of that name ({error})") from error
    except Exception as error:  # the hub path raises many types (missing repo, split, config...)
        raise DataError(f"{source}: not found locally, and loading it as a hub dataset failed: {error}") from error
    return _numbered(table, f"{source}[{name}]")


def _numbered(table, label: str) -> list[Row]:
    """Rows of a list or a ``datasets.Dataset`` labelled ``"label:row N"``, N from 1."""
    return [(f"{label}:row {i}", row) for i, row in enumerate(table, start=1)]
