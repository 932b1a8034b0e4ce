"""The row schema of crop outputs and how one value becomes a cell (CSV) or a JSON value.

One owner for the CSV formula guard: a name that a spreadsheet would run as a formula gets one
leading apostrophe in CSV (and only in CSV); :func:`csv_uncell` takes exactly one off again.
"""

from __future__ import annotations

import json
import re

import numpy as np

COLUMNS = ("path", "prob_atypical", "label", "status", "error", "note")
LEGACY_COLUMNS = COLUMNS[:5]  # ami-infer before the note column
TEXT_COLUMNS = ("error", "note")  # free text: one line, never guarded
PLAIN_COLUMNS = ("label", "status")  # ami's own words: never guarded

# Spreadsheets run a cell that starts with one of these as a formula (CSV injection). In CSV such a
# path is written with a leading apostrophe (OWASP's advice); a path that itself starts with an
# apostrophe gets one more, so ami's reader strips exactly one and every name round-trips.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_SURROGATE = re.compile("[\ud800-\udfff]")


def fmt_prob(p: float) -> str:
    """The shortest decimal that reads back as the same float32: exact, and no 17-digit noise."""
    return np.format_float_positional(np.float32(p), unique=True, trim="0")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def csv_cell(path: str) -> str:
    """A path as written in the CSV: a leading apostrophe when it would start a spreadsheet formula."""
    return "'" + path if path.startswith(FORMULA_STARTS + ("'",)) else path


def csv_uncell(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


def json_str(text: str | None) -> str:
    """JSON string literal, UTF-8 text; the bytes of a file name that are not UTF-8 (held as lone
    surrogates, Python's surrogateescape) become ``\\udcXX`` escapes, so the line is valid UTF-8 and
    ``os.fsencode(json.loads(...))`` gives the original bytes back."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False))


def csv_value(col: str, v) -> str:
    """One value as a CSV cell (names and paths formula-guarded)."""
    if col == "prob_atypical":
        return "" if v is None else fmt_prob(v)
    if col in TEXT_COLUMNS:
        return one_line(v) if v else ""
    if isinstance(v, str) and col not in PLAIN_COLUMNS:
        return csv_cell(v)  # a name or path: the formula guard
    return "" if v is None else str(v)


def json_value(col: str, v) -> str:
    """One value as a JSON literal (never guarded: JSON is not run by spreadsheets)."""
    if col == "prob_atypical":
        return "null" if v is None else fmt_prob(v)
    if col in TEXT_COLUMNS:
        v = one_line(v) if v else None
    return json_str(v) if v is None or isinstance(v, str) else json.dumps(v)
