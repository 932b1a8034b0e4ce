"""Resume scanning: what an existing output file holds, parsed, never guessed.

One owner for partial-row detection (:func:`valid_row`, a cut last row): the CSV is parsed by the
csv module (a quoted path may hold a newline), JSON Lines line by line. A damaged *tail* (a run
killed mid-row) is measured: everything after the last complete, valid row. Damage with valid rows
after it, or a file that is not an ami-infer output, is refused (:class:`~.inputs.InputError`).
The per-format parsers here are registered in :mod:`.formats`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cells import COLUMNS, LEGACY_COLUMNS, csv_uncell
from .inputs import InputError


def valid_row(vals: list, columns: tuple = COLUMNS) -> bool:
    """Whether a parsed row is a complete ami row (a cut one is not): status ok with a probability in
    [0, 1] and a label, or error without a probability."""
    ix = columns.index
    path, prob, label, status = vals[0], vals[ix("prob_atypical")], vals[ix("label")], vals[ix("status")]
    if status not in ("ok", "error") or (len(columns) > 0 and columns[0] == "path" and path in ("", None)):
        return False
    if status == "error":
        return prob in ("", None)
    try:
        return 0.0 <= float(prob) <= 1.0 and bool(label)
    except (TypeError, ValueError):
        return False


@dataclass
class Scan:
    """What an existing output file holds: its complete rows and where its damage is."""
    rows: dict = field(default_factory=dict)  # path -> (status, label), the last row of a path wins
    n_rows: int = 0  # complete rows (a path may have several after --retry-errors)
    good_end: int = 0  # byte offset after the last complete row: a cut tail is removed from here
    size: int = 0
    legacy: bool = False  # a 5-column file from an ami-infer before the note column
    keep: bool = False  # also keep every row's values (``values``), e.g. for a summary of the whole file
    values: dict = field(default_factory=dict)  # key -> the row's values (names un-guarded), when ``keep``

    @property
    def tail_bytes(self) -> int:
        return self.size - self.good_end

    @property
    def superseded(self) -> int:
        return self.n_rows - len(self.rows)


def row_key(vals: list, n_key: int):
    """The resume key of a row: the first column (a crop's path), or the first ``n_key`` as text."""
    if n_key == 1:
        return csv_uncell(vals[0]) if isinstance(vals[0], str) else str(vals[0])
    return tuple(csv_uncell(v) if isinstance(v, str) else str(v) for v in vals[:n_key])


class ByteLines:
    """The lines of ``data`` (bytes, each with its newline) decoded for :func:`csv.reader`, with
    ``pos``: the byte offset just after the last line handed out (where a parsed row ends)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def __iter__(self) -> Iterator[str]:
        data = self.data
        while self.pos < len(data):
            j = data.find(b"\n", self.pos)
            j = len(data) if j < 0 else j + 1
            chunk = data[self.pos:j]
            self.pos = j
            yield chunk.decode("utf-8", "surrogateescape")


def _damaged(p: Path, where: str, what: str = "row") -> InputError:
    return InputError(f"{p}: {where} and rows follow it; ami-infer cannot tell which rows to trust: fix or remove "
                      f"that {what}, or start again with --overwrite")


def scan_csv(p: Path, data: bytes, columns: tuple, n_key: int, sc: Scan) -> None:
    """:func:`scan_output` for CSV: the header, then every row up to the first damaged one, which
    must be the (cut) last one."""
    lines = ByteLines(data)
    reader = csv.reader(lines, strict=True)
    if not _csv_header(p, data, reader, columns, sc):
        return
    bad_at = None  # (row number, reason) of the first damaged record after good_end
    n = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if lines.pos < len(data):  # not a cut tail: something in the middle does not parse
                raise InputError(f"{p}: row {n + 1} is damaged (unparseable: {e}) and more of the file follows; "
                                 "ami-infer cannot tell which rows to trust: fix or remove that row, or start "
                                 "again with --overwrite") from None
            bad_at = bad_at or (n + 1, f"unparseable ({e})")
            break
        n += 1
        complete = data[lines.pos - 1:lines.pos] == b"\n"
        if len(row) == len(columns) and complete and valid_row(row, columns):
            if bad_at:
                raise _damaged(p, f"row {bad_at[0]} is damaged ({bad_at[1]})")
            key = row_key(row, n_key)
            sc.rows[key] = (row[columns.index("status")], row[columns.index("label")])
            if sc.keep:
                sc.values[key] = [csv_uncell(v) if i < n_key else v for i, v in enumerate(row)]
            sc.n_rows += 1
            sc.good_end = lines.pos
        else:
            bad_at = bad_at or (n, "incomplete" if not complete else f"{len(row)} fields, not a valid row")
    _refuse_swallowed_rows(p, data[sc.good_end:], columns, bad_at)


def _csv_header(p: Path, data: bytes, reader, columns: tuple, sc: Scan) -> bool:
    """Read the header row: True when rows follow it (``sc.good_end`` set after it); False for a
    file from before the note column (``sc.legacy``) or one cut inside its header; else refused."""
    header_line = ",".join(columns) + "\n"
    try:
        header = next(reader)
    except csv.Error:
        header = None
    if tuple(header or ()) == columns and data.startswith(header_line.encode()):
        sc.good_end = len(header_line)
        return True
    if columns == COLUMNS and tuple(header or ()) == LEGACY_COLUMNS:
        sc.legacy = True
        return False
    if header_line.encode().startswith(data):  # killed while writing the header
        return False
    raise InputError(f"{p} is not an ami-infer CSV (header {header}, expected {','.join(columns)}); "
                     "choose another -o file or the matching --format")


def _refuse_swallowed_rows(p: Path, tail: bytes, columns: tuple, bad_at) -> None:
    """A cut tail is (part of) one row. If a whole valid row sits in it, an open quote further up
    swallowed it: that is damage, not a cut, and cutting would throw good rows away."""
    for line in tail.split(b"\n")[:-1]:
        try:
            alone = next(csv.reader([line.decode("utf-8", "surrogateescape")], strict=True), [])
        except csv.Error:
            continue
        if len(alone) == len(columns) and valid_row(alone, columns):
            raise InputError(f"{p}: row {bad_at[0] if bad_at else '?'} is damaged and complete rows follow it; "
                             "ami-infer cannot tell which rows to trust: fix or remove that row, or start again "
                             "with --overwrite")


def scan_jsonl(p: Path, data: bytes, columns: tuple, n_key: int, sc: Scan) -> None:
    """:func:`scan_output` for JSON Lines: one object per line (json escapes every newline inside a string)."""
    pos, n, bad_at = 0, 0, None
    while pos < len(data):
        j = data.find(b"\n", pos)
        complete = j >= 0
        j = j + 1 if complete else len(data)
        line = data[pos:j].strip()
        n += 1
        pos = j
        if not line:
            if bad_at is None:
                sc.good_end = pos
            continue
        d = _json_row(line, complete, columns, n_key)
        if d is not None:
            if bad_at:
                raise _damaged(p, f"line {bad_at} is damaged", "line")
            key = row_key([d[c] for c in columns[:n_key]], n_key)
            sc.rows[key] = (d["status"], d.get("label") or "")
            if sc.keep:
                sc.values[key] = [d.get(c) for c in columns]
            sc.n_rows += 1
            sc.good_end = pos
        elif complete and n == 1:
            raise InputError(f"{p} is not an ami-infer JSON Lines file; choose another -o file or the matching --format")
        else:
            bad_at = bad_at or n


def _json_row(line: bytes, complete: bool, columns: tuple, n_key: int) -> dict | None:
    """A complete, valid JSON Lines row as a dict; None when the line is cut, not JSON or not a valid row."""
    try:
        d = json.loads(line.decode("utf-8", "surrogateescape"))
        ok = (complete and isinstance(d, dict)
              and all(k in d for k in (*columns[:n_key], "prob_atypical", "label", "status"))
              and valid_row([("" if d.get(c) is None and c == "prob_atypical" else d.get(c, "")) for c in columns],
                             columns))
    except (ValueError, TypeError, KeyError):
        return None
    return d if ok else None


def csv_records(data: bytes, n_key: int) -> tuple[bytes, list[tuple]]:
    """The header and the (key, raw bytes) of every row of a CSV output, for compaction."""
    nl = data.index(b"\n") + 1
    head, body = data[:nl], data[nl:]
    lines = ByteLines(body)
    recs, start = [], 0
    for row in csv.reader(lines, strict=True):
        recs.append((row_key(row, n_key), body[start:lines.pos]))
        start = lines.pos
    return head, recs


def jsonl_records(data: bytes, columns: tuple, n_key: int) -> tuple[bytes, list[tuple]]:
    """The (empty) header and the (key, raw line) of every row of a JSON Lines output, for compaction."""
    recs = []
    for line in data.splitlines(keepends=True):
        if line.strip():
            d = json.loads(line.decode("utf-8", "surrogateescape"))
            recs.append((row_key([d[c] for c in columns[:n_key]], n_key), line))
    return b"", recs
