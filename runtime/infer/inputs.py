"""The inputs of ``ami-infer``: crop paths from folders, single files and lists of paths.

:func:`iter_inputs` expands the user's arguments (directories recursively, single files, ``.txt`` /
``.csv`` lists of paths) into crop paths, in a stable order, without duplicates.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import BadInput
from ..imageio import IMAGE_SUFFIXES
from .cells import COLUMNS, LEGACY_COLUMNS, csv_uncell

LIST_SUFFIXES = (".txt", ".csv")
LIST_COLUMNS = ("path", "file", "filename", "image", "dataset_uid")  # a CSV list: first of these present
ENCODING = dict(encoding="utf-8", errors="surrogateescape")  # file names need not be valid UTF-8


class InputError(BadInput, ValueError):
    """A command-line input or the output file cannot be used as given (not a per-crop problem): exit 2."""


def read_csv_rows(p: Path, text: str, what: str) -> list[list[str]]:
    """All rows of a CSV text; a row the csv module refuses (a field beyond its size limit, an
    unterminated quote) is one clear :class:`InputError` naming the file and the line."""
    reader = csv.reader(io.StringIO(text), strict=True)
    rows: list[list[str]] = []
    while True:
        start = reader.line_num + 1  # where the next row begins (a quoted field may span lines)
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as e:
            raise InputError(f"{what} {p}: the row at line {start} cannot be parsed as CSV ({e}): an unterminated "
                             "quote, or a field longer than the csv module's limit; fix that line") from None
        rows.append(row)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def read_list_file(path: str | os.PathLike) -> Iterator[str]:
    """Paths listed in a ``.txt`` (one per line; blank lines and ``#`` comments skipped) or a ``.csv``
    (the first column named path/file/filename/image/dataset_uid, else the first column; a header row
    is recognised by such a name). Relative paths are relative to the list file's folder."""
    p = Path(path)
    base = p.parent
    try:
        text = p.read_text(**ENCODING)
    except OSError as e:
        raise InputError(f"cannot read list file {p}: {e.strerror or e}") from None

    def resolve(entry: str) -> str:
        entry = entry.strip()
        return entry if os.path.isabs(entry) else os.path.join(base, entry) if str(base) not in ("", ".") else entry

    if p.suffix.lower() == ".csv":
        rows = read_csv_rows(p, text, "list file")
        if not rows:
            return
        header = [c.strip().lower() for c in rows[0]]
        ours = tuple(rows[0]) in (COLUMNS, LEGACY_COLUMNS)  # an ami-infer output used as a list
        col, start = 0, 0
        for name in LIST_COLUMNS:
            if name in header:
                col, start = header.index(name), 1
                break
        for r in rows[start:]:
            if len(r) > col and r[col].strip() and not r[col].lstrip().startswith("#"):
                yield resolve(csv_uncell(r[col]) if ours else r[col])
    else:
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                yield resolve(line)


def _walk(top: str) -> Iterator[str]:
    """Image files under ``top``, recursively, sorted per folder; follows symlinked folders once."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(top, followlinks=True, onerror=None):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):
            if _is_image_name(name):
                yield os.path.join(root, name)
        # Folders os.walk could not enter are still reported (as an error row) rather than skipped.
        for d in dirs:
            full = os.path.join(root, d)
            if not os.access(full, os.R_OK | os.X_OK):
                yield full


def iter_inputs(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Crop paths from arguments: directories (recursive; .png .jpg .jpeg .tif .tiff, any case),
    single files (taken whatever their extension), ``.txt``/``.csv`` lists of paths. Duplicates are
    dropped (the same file reached by two spellings or through a symlink counts once: the resolved path
    decides, the first spelling is kept), order is kept. A path that does not exist at all raises :class:`InputError`
    (a typo should not look like a failed crop); a broken symlink is kept (it becomes an error row)."""
    seen: set[str] = set()
    for arg in paths:
        a = os.fspath(arg)
        if os.path.isdir(a):
            gen: Iterable[str] = _walk(a)
        elif os.path.isfile(a) and a.lower().endswith(LIST_SUFFIXES):
            gen = read_list_file(a)
        elif os.path.lexists(a):
            gen = (a,)
        else:
            raise InputError(f"no such file or directory: {a}")
        for p in gen:
            key = os.path.realpath(p)  # ./crops/a.png and /abs/crops/a.png are one crop: first spelling kept
            if key not in seen:
                seen.add(key)
                yield p

