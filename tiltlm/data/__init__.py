"""Preference data: read pairs from files, directories or the hub, and tokenise them for the model.

``load_pairs`` reads and checks (``io.py`` reads, ``formats.py`` interprets the fields);
``tokenize_pairs`` renders, tokenises, truncates and counts what it keeps (``tokenize.py``).
"""

from __future__ import annotations

from tiltlm.data.formats import example_from_row, pair_from_row
from tiltlm.data.io import read_rows
from tiltlm.data.tokenize import expand_ranking_to_pairs, tokenize_examples, tokenize_pair, tokenize_pairs
from tiltlm.data.types import (DataError, DataSummary, Example, Pair, RankedList, TokenizedExample, TokenizedList,
                               TokenizedPair, TokenizedUnpaired, Unpaired)


def load_pairs(source: str, split: str | None = None, limit: int | None = None) -> list[Pair]:
    """The preference pairs in ``source`` (a file, a save_to_disk directory or a hub dataset name), at most
    ``limit`` of them, each with ``source`` set to ``"file:line"`` or ``"file:row N"``. Any problem with the
    input is a :class:`DataError` naming the file, the line or row, and the field."""
    return [pair_from_row(row, where) for where, row in read_rows(source, split, limit)]


def load_examples(source: str, split: str | None = None, limit: int | None = None) -> list[Example]:
    """Like :func:`load_pairs`, for files that may also hold ranked lists (``completions`` with
    ``ranking`` or ``scores``) and unpaired rows (``completion`` with ``label``); see
    :mod:`tiltlm.data.formats`."""
    return [example_from_row(row, where) for where, row in read_rows(source, split, limit)]


__all__ = ["DataError", "DataSummary", "Example", "Pair", "RankedList", "TokenizedExample", "TokenizedList",
           "TokenizedPair", "TokenizedUnpaired", "Unpaired", "expand_ranking_to_pairs", "load_examples", "load_pairs",
           "tokenize_examples", "tokenize_pair", "tokenize_pairs"]
