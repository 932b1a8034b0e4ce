"""The output-format registry: one table, one entry per format.

An entry says everything ami needs to write and read back its rows: its name (``--format``), the
file suffixes that select it, the header a file or stream starts with, how rows are encoded, how an
existing file is scanned for resuming and split into records for compaction, and how a row reads
back as a dict. Every sink (a locked file, a stream such as ``-`` / a pipe / a FIFO, memory for the
Python API) writes through the same entry: a stream gets the same bytes a file would, and there is
no per-format branch anywhere else. A new format is one more entry in :data:`FORMATS`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import scan as _scan
from .cells import COLUMNS, csv_value, json_value
from .inputs import InputError


def _csv_header(columns: tuple) -> bytes:
    return (",".join(columns) + "\n").encode()


def _csv_encode(rows: list[tuple], columns: tuple) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for row in rows:
        w.writerow([csv_value(c, v) for c, v in zip(columns, row, strict=True)])
    return buf.getvalue()


def _jsonl_encode(rows: list[tuple], columns: tuple) -> str:
    return "".join("{" + ", ".join(f"{json.dumps(c)}: {json_value(c, v)}" for c, v in zip(columns, row, strict=True))
                   + "}\n" for row in rows)


@dataclass(frozen=True)
class Format:
    """One output format. ``header(columns)``: the bytes a file or stream starts with (b"" for none);
    ``encode(rows, columns)``: rows as text; ``scan(path, data, columns, n_key, scan)``: fill a
    :class:`~.scan.Scan` from an existing file's bytes; ``records(data, columns, n_key)``: (header,
    [(key, raw bytes)]) for compaction."""

    name: str
    suffixes: tuple[str, ...]
    header: Callable[[tuple], bytes]
    encode: Callable[[list, tuple], str]
    scan: Callable
    records: Callable[[bytes, tuple, int], tuple[bytes, list]]
    newline: str | None = None  # open(..., newline=) for reading it as text


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("csv", (".csv",), _csv_header, _csv_encode, _scan.scan_csv,
           lambda data, columns, n_key: _scan.csv_records(data, n_key), newline=""),
    Format("jsonl", (".jsonl", ".ndjson", ".json"), lambda columns: b"", _jsonl_encode, _scan.scan_jsonl,
           _scan.jsonl_records),
)}
DEFAULT_FORMAT = "csv"
FORMAT_NAMES = tuple(FORMATS)


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(f"unknown output format {name!r}; choose one of {', '.join(FORMATS)}") from None


def format_for(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The output format's name: explicit, else from the file's suffix (see :data:`FORMATS`), else csv."""
    if fmt:
        return get_format(fmt).name
    low = str(path).lower()
    for f in FORMATS.values():
        if low.endswith(f.suffixes):
            return f.name
    return DEFAULT_FORMAT


def format_rows(rows: list[tuple], fmt: str, columns: tuple = COLUMNS) -> str:
    """Rows as text of format ``fmt``; each row holds one value per column of ``columns`` (for crops:
    path, prob|None, label|None, status, error|None, note|None; other sources add their own key and
    extra columns)."""
    return get_format(fmt).encode(rows, columns)


def row_dicts(rows: list[tuple], columns: tuple = COLUMNS) -> list[dict]:
    """Rows as the dicts a JSON Lines reader gets back (the Python API's rows): the same values as
    the file would hold, without a file."""
    return [json.loads(line) for line in _jsonl_encode(rows, columns).splitlines()]


def scan_output(path: str | os.PathLike, fmt: str, columns: tuple = COLUMNS, n_key: int = 1, *,
                keep: bool = False) -> _scan.Scan:
    """Parse an ami-infer output file of format ``fmt`` (see :mod:`.scan`); ``keep``: also keep every
    row's values."""
    p = Path(path)
    sc = _scan.Scan(keep=keep)
    with open(p, "rb") as f:
        data = f.read()
    sc.size = len(data)
    if data:
        get_format(fmt).scan(p, data, tuple(columns), n_key, sc)
    return sc


def read_results(path: str | os.PathLike, fmt: str, columns: tuple = COLUMNS, n_key: int = 1) -> dict:
    """{key: (status, label)} of the complete rows of an ami-infer output file. The key is the first
    column (a crop's path) or, with ``n_key`` > 1, the tuple of the first ``n_key`` columns as text."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return {}
    return scan_output(p, fmt, tuple(columns), n_key).rows
