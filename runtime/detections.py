"""The detections of ``ami-infer --slides``: a CSV of (slide, x, y, id) rows, or points given to the
Python API, as :class:`Detection` items of the pipeline (see :mod:`ami.runtime.slides` for the
contract). A row that cannot be used becomes a detection with a ``problem`` (an error row), never a
crash; a file that cannot be read is one :class:`~ami.runtime.infer.InputError` naming the line.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .infer import ENCODING, InputError
from .infer.inputs import read_csv_rows

REQUIRED = ("slide", "x", "y")


@dataclass(frozen=True)
class Detection:
    """One row of a detections CSV. ``slide`` is the path as written (it goes into the output and the
    resume key), ``path`` where it resolves to; ``x``/``y`` are numbers, or the raw text when
    ``problem`` says why the row cannot be used."""

    slide: str
    path: str
    id: str
    x: float | int | str
    y: float | int | str
    problem: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.slide, self.id, str(self.x), str(self.y))

    def __str__(self) -> str:
        return f"{self.slide} id {self.id} at ({self.x}, {self.y})"


def _number(text: str) -> float | int:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(text)
    return int(v) if v.is_integer() and abs(v) < 2 ** 53 else v


def read_detections(path: str | os.PathLike) -> list[Detection]:
    """The detections of a CSV (see the module docstring), in file order, exact duplicates dropped.
    Raises :class:`~ami.runtime.infer.InputError` when the file cannot be read or lacks a column."""
    p = Path(path)
    try:
        text = p.read_text(**ENCODING)
    except OSError as e:
        raise InputError(f"cannot read detections file {p}: {e.strerror or e}") from None
    rows = [r for r in read_csv_rows(p, text, "detections file") if any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"detections file {p} is empty; expected a header with {', '.join(REQUIRED)} (and id)")
    header = [c.strip().lstrip("\ufeff").lower() for c in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(f"detections file {p} lacks the column(s) {', '.join(missing)} (header: {', '.join(header)}); "
                         "expected slide, x, y (level-0 pixels of the figure's centre) and optionally id")
    col = {c: header.index(c) for c in (*REQUIRED, "id") if c in header}
    base = p.parent
    out: list[Detection] = []
    seen: set = set()
    n = 0

    def cell(r: list[str], c: str) -> str:
        return r[col[c]].strip() if c in col and col[c] < len(r) else ""

    for r in rows[1:]:
        if r[0].lstrip().startswith("#"):
            continue
        n += 1
        slide, xs, ys = cell(r, "slide"), cell(r, "x"), cell(r, "y")
        ident = cell(r, "id") or str(n)
        problem = None
        if not slide:
            problem = "no slide given in the detections file"
        resolved = slide if (not slide or os.path.isabs(slide)) else os.path.join(base, slide)
        x: float | int | str = xs
        y: float | int | str = ys
        try:
            x = _number(xs)
        except ValueError:
            problem = problem or f"x is not a finite number ({xs!r})"
        try:
            y = _number(ys)
        except ValueError:
            problem = problem or f"y is not a finite number ({ys!r})"
        d = Detection(slide, resolved, ident, x, y, problem)
        if d.key not in seen:
            seen.add(d.key)
            out.append(d)
    return out


def detections_on(slide: str | os.PathLike, points, ids=None) -> list[Detection]:
    """Detections at ``points`` ((x, y) level-0 pixels) on one slide, for the Python API; ``ids``
    default to 1, 2, ... A point that is not two finite numbers becomes a row with a problem."""
    sl = os.fspath(slide)
    pts = list(points)
    ids = [str(i) for i in ids] if ids is not None else [str(i + 1) for i in range(len(pts))]
    if len(ids) != len(pts):
        raise InputError(f"{len(ids)} ids for {len(pts)} points")
    out = []
    for ident, pt in zip(ids, pts):
        problem = None
        try:
            x, y = pt
        except (TypeError, ValueError):
            x, y, problem = str(pt), "", f"a point is (x, y), got {pt!r}"
        try:
            x = _number(str(x))
            y = _number(str(y))
        except ValueError:
            problem = problem or f"x and y must be finite numbers, got ({x!r}, {y!r})"
            x, y = str(x), str(y)
        out.append(Detection(sl, sl, ident, x, y, problem))
    return out


