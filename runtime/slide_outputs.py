"""The side outputs of ``ami-infer --slides``: the per-slide summary (``OUT.slides.csv``) and one
QuPath GeoJSON file per slide (``OUT.geojson/``), built from the rows as they stream.

:class:`SlideOutputs` is a :class:`~ami.runtime.infer.RowTap`: it sees the rows already in a resumed
output and every row this run writes (the last row of a detection wins, as after --retry-errors),
keeps a compact record per detection, and writes the side outputs at the end while the output is
still locked. Nothing is read back from the output, so ``-o -``, a pipe or a FIFO work (a stream
gets no side files: the per-slide table goes to the terminal).

Names: the summary's ``slide`` column holds the slide as written in the detections (formula-guarded,
the summary being CSV whatever the rows' format); a GeoJSON file name is the slide's file name made
safe and bounded (long names are cut and get a hash). One summary row per slide *file*: two
spellings of the same file (``a.svs`` and ``./a.svs``) count as one slide, named by the first.
The GeoJSON clean-up deletes only files an earlier run of this output wrote (its manifest), never
a user's own files in that folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_bytes
from .infer import RowTap, csv_cell

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
SUMMARY_COLUMNS = ("slide", "detections", "classified", "atypical", "normal", "atypical_ratio", "ci95_low",
                   "ci95_high", "failed", "padded", "slide_info", "geojson")
MANIFEST = ".ami-geojson.json"  # the GeoJSON files this output's runs wrote (the only ones clean-up deletes)
MAX_STEM = 96  # characters of a slide's file name kept in its GeoJSON name
_SAFE = re.compile(r"^[A-Za-z0-9._-]+\.geojson$")


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95 % by default); (nan, nan) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class SlideSummary:
    slide: str
    detections: int = 0
    classified: int = 0
    atypical: int = 0
    failed: int = 0
    padded: int = 0
    info: str = ""  # the slide's size and resolution, or why it could not be opened
    geojson: str = ""
    errors: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.atypical / self.classified if self.classified else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson(self.atypical, self.classified)

    def add(self, status: str, label: str | None, error: str | None, padded: float, atypical: str) -> None:
        self.detections += 1
        if status == "ok":
            self.classified += 1
            self.atypical += int(label == atypical)
            self.padded += int(padded > 0)
        else:
            self.failed += 1
            self.errors[error or ""] = self.errors.get(error or "", 0) + 1


def summarize(rows: list[dict], atypical: str = "Atypical") -> list[SlideSummary]:
    """Per-slide counts of row dicts (slide, status, label, error, padded), slides in order of appearance."""
    by: dict[str, SlideSummary] = {}
    for r in rows:
        s = by.setdefault(str(r["slide"]), SlideSummary(str(r["slide"])))
        s.add(r["status"], r.get("label"), r.get("error"), _float(r.get("padded")), atypical)
    return list(by.values())


def _float(v) -> float:
    try:
        return float(v) if v not in (None, "") else 0.0
    except (TypeError, ValueError):
        return 0.0


def safe_name(slide: str, taken: set) -> str:
    """A GeoJSON file name for ``slide``: its file name with unsafe characters replaced, cut to
    :data:`MAX_STEM` characters (plus a hash of the whole name) and made unique in ``taken``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(slide).name).lstrip(".") or "slide"
    digest = hashlib.sha1(slide.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    if len(stem) > MAX_STEM:
        stem = f"{stem[:MAX_STEM]}-{digest}"
    name = stem
    if name.lower() in taken:
        name = f"{stem}-{digest}"
    taken.add(name.lower())
    return name + ".geojson"


def _feature(rec: tuple, fov: tuple[float, float] | None, colours: dict) -> dict:
    ident, x, y, prob, label, _status, _error, padded = rec
    x, y = float(x), float(y)
    if fov:
        hx, hy = fov[0] / 2, fov[1] / 2
        ring = [[x - hx, y - hy], [x + hx, y - hy], [x + hx, y + hy], [x - hx, y + hy], [x - hx, y - hy]]
        geom = {"type": "Polygon", "coordinates": [ring]}
    else:
        geom = {"type": "Point", "coordinates": [x, y]}
    return {"type": "Feature", "geometry": geom,
            "properties": {"objectType": "detection", "name": str(ident),
                           "classification": {"name": label, "color": colours.get(label, [128, 128, 128])},
                           "measurements": {"prob_atypical": float(prob), "padded_fraction": float(padded)},
                           "ami": {"id": str(ident), "x": rec[1], "y": rec[2]}}}


def _collection(recs, fov, class_names) -> dict:
    colours = {class_names[1]: [220, 40, 40], class_names[0]: [40, 170, 60]}
    return {"type": "FeatureCollection", "features": [_feature(r, fov, colours) for r in recs if r[5] == "ok"]}


def geojson_features(rows: list[dict], fov: tuple[float, float] | None, class_names=("Normal", "Atypical")) -> dict:
    """A GeoJSON FeatureCollection of the classified detections of one slide, in level-0 pixel
    coordinates, as QuPath (0.4 and later) imports detections: ``objectType`` detection, a
    ``classification`` (Atypical red, Normal green) and the probability in ``measurements``.
    The geometry is the crop's square (``fov`` level-0 px) or, when unknown, the centre point."""
    recs = [(r["id"], r["x"], r["y"], r.get("prob_atypical"), r.get("label"), r["status"], r.get("error"),
             _float(r.get("padded"))) for r in rows]
    return _collection(recs, fov, class_names)


def outputs_beside(out_path: str | os.PathLike) -> tuple[Path, Path]:
    """Where the per-slide summary and the GeoJSON folder of ``out_path`` go: ``res.csv`` ->
    res.slides.csv, res.geojson/; any other name keeps its suffix (``res.jsonl`` ->
    res.jsonl.slides.csv, res.jsonl.geojson/), so a CSV and a JSON Lines output never share them."""
    p = Path(out_path)
    stem = p.with_suffix("") if p.suffix.lower() == ".csv" else p
    return stem.with_name(stem.name + ".slides.csv"), stem.with_name(stem.name + ".geojson")


def _num(v) -> float:
    return round(v, 4) if isinstance(v, float) else v


class SlideOutputs(RowTap):
    """The per-slide summary and GeoJSON of one ``--slides`` run, built while the rows stream (see
    the module docstring). ``path_of``: slide as written -> the path it resolves to; ``slide_info``:
    path -> (description, crop field of view in level-0 px, or None), for the summary and GeoJSON."""

    keep_resumed = True

    def __init__(self, out_path: str | os.PathLike | None, path_of: dict[str, str],
                 slide_info: Callable[[str], tuple[str, tuple[float, float] | None]],
                 class_names=("Normal", "Atypical")):
        self.out_path = out_path
        self.path_of, self.slide_info, self.class_names = path_of, slide_info, tuple(class_names)
        self.recs: dict[tuple, tuple] = {}  # detection key -> (id, x, y, prob, label, status, error, padded)
        self.slide_of: dict[tuple, str] = {}  # detection key -> the slide as written
        self.sums: list[SlideSummary] = []

    def _add(self, vals) -> None:
        slide, ident, x, y, prob, label, status, error, padded = vals
        key = (str(slide), str(ident), str(x), str(y))
        self.slide_of[key] = str(slide)
        self.recs[key] = (str(ident), _num(x), _num(y), None if prob in (None, "") else float(prob),
                          label or None, status, error or None, _float(padded))

    def resumed(self, values: dict) -> None:
        for vals in values.values():
            self._add(vals)

    def rows(self, rows: list[tuple]) -> None:
        for r in rows:
            self._add(r)

    def side_outputs(self) -> tuple[list[Path], list[Path]]:
        if self.out_path is None:
            return [], []
        summary_csv, gdir = outputs_beside(self.out_path)
        return [summary_csv, gdir / MANIFEST], [gdir]

    def _by_slide(self) -> dict[str, tuple[str, list]]:
        """real path -> (first spelling, records), slides in order of appearance."""
        groups: dict[str, tuple[str, list]] = {}
        for key, rec in self.recs.items():
            slide = self.slide_of[key]
            path = self.path_of.get(slide, slide)
            real = os.path.realpath(path) if path else slide
            groups.setdefault(real, (slide, []))[1].append(rec)
        return groups

    def finish(self, state: str, stream: bool) -> None:
        atypical = self.class_names[1]
        groups = self._by_slide()
        fovs = {}
        self.sums = []
        for real, (slide, recs) in groups.items():
            s = SlideSummary(slide)
            for rec in recs:
                s.add(rec[5], rec[4], rec[6], rec[7], atypical)
            s.info, fovs[real] = self.slide_info(self.path_of.get(slide, slide))
            self.sums.append(s)
        if not stream and self.out_path is not None:
            self._write(groups, fovs)

    def _write(self, groups: dict, fovs: dict) -> None:
        summary_csv, gdir = outputs_beside(self.out_path)
        gdir.mkdir(parents=True, exist_ok=True)
        taken: set = set()
        written = []
        for s, (real, (_, recs)) in zip(self.sums, groups.items()):
            name = safe_name(s.slide, taken)
            text = json.dumps(_collection(recs, fovs[real], self.class_names), separators=(",", ":")) + "\n"
            atomic_write_bytes(gdir / name, text.encode("utf-8"))
            written.append(name)
            s.geojson = str(Path(gdir.name) / name)
        _clean_up(gdir, written)
        atomic_write_bytes(summary_csv, summary_csv_text(self.sums).encode("utf-8", "surrogateescape"))


def _clean_up(gdir: Path, written: list[str]) -> None:
    """Delete the GeoJSON files an earlier run of this output wrote and this one did not (slides no
    longer in it); then record this run's files. Files ami did not write are never touched."""
    manifest = gdir / MANIFEST
    try:
        before = json.loads(manifest.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        before = []
    keep = {n.lower() for n in written}
    for name in before if isinstance(before, list) else []:
        stale = gdir / str(name)
        if _SAFE.match(str(name)) and str(name).lower() not in keep and stale.is_file() and not stale.is_symlink():
            stale.unlink()
    atomic_write_bytes(manifest, (json.dumps({"files": written}, indent=1) + "\n").encode("utf-8"))


def summary_csv_text(sums: list[SlideSummary]) -> str:
    """The per-slide summary as CSV (the slide column formula-guarded, whatever the rows' format)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS)

    def f(v: float) -> str:
        return "" if not math.isfinite(v) else f"{v:.4f}"

    for s in sums:
        lo, hi = s.ci95
        w.writerow([csv_cell(s.slide), s.detections, s.classified, s.atypical, s.classified - s.atypical, f(s.ratio),
                    f(lo), f(hi), s.failed, s.padded, s.info, s.geojson])
    return buf.getvalue()


def summary_lines(sums: list[SlideSummary], out_path: str | os.PathLike, stream: bool = False) -> list[str]:
    """The per-slide table for the terminal."""
    width = min(40, max([5] + [len(s.slide) for s in sums]))
    lines = [f"{'slide':<{width}}  {'classified':>10}  {'atypical':>8}  {'ratio':>6}  {'95% CI (Wilson)':>15}  {'failed':>6}"]
    for s in sums:
        lo, hi = s.ci95
        name = s.slide if len(s.slide) <= width else "..." + s.slide[-(width - 3):]
        ratio = f"{s.ratio:.3f}" if s.classified else "-"
        ci = f"{lo:.3f}-{hi:.3f}" if s.classified else "-"
        lines.append(f"{name:<{width}}  {s.classified:>10}  {s.atypical:>8}  {ratio:>6}  {ci:>15}  {s.failed:>6}")
        for reason, n in sorted(s.errors.items(), key=lambda kv: -kv[1])[:3]:
            lines.append(f"{'':<{width}}    {n} x {reason}")
    if stream:
        lines.append("per-slide summary and QuPath GeoJSON: not written (the rows went to a stream)")
    else:
        summary_csv, gdir = outputs_beside(out_path)
        lines.append(f"per-slide summary: {summary_csv}; QuPath GeoJSON: {gdir}{os.sep}")
    return lines
