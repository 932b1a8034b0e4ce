"""Classify mitotic-figure detections on whole-slide images (``ami-infer --slides DETECTIONS.csv``).

A detector gives coordinates; this module cuts the crop the model was trained on around each of
them, straight from the slide, and feeds :func:`~ami.runtime.infer.run_inference` (same batching,
workers, resume, exit codes), then writes a per-slide summary and one GeoJSON file per slide.

Contract, in order:

* **Detections** (:func:`read_detections`): a CSV with the columns ``slide`` (a path, relative to
  the CSV's folder or absolute), ``x``, ``y`` (the figure's centre in level-0 pixels) and
  optionally ``id`` (carried into every row; without it, or when empty, the detection's row number
  in the CSV, counting data rows from 1). Header names are matched case-insensitively; every other
  column is ignored (join on ``id`` to bring them back). A row whose slide, x or y is missing or
  not a number becomes an error row, never a crash.
* **Resolution** (:func:`open_slide`, :meth:`Slide.read_crop`): the artefact's metadata says the
  field of view it was trained on (:meth:`~ami.runtime.artifact.ArtifactMeta.training_crop`: the
  AMi-Br crops, 128 px at 0.25 um/px, centred). The slide's um/px comes from its metadata
  (OpenSlide's ``openslide.mpp-x``/``-y``: Aperio MPP, TIFF resolution tags, ...). A slide without
  one (or with an implausible one, outside 0.05-20 um/px, e.g. a 72-dpi default) is refused unless
  the user gives ``mpp``. The crop is read from the coarsest pyramid level that is still at least
  as fine as the model's um/px; when that level is not exactly at the model's um/px the region is
  resampled (Pillow, Lanczos, antialiased) to ``size_px``. At exactly the model's um/px the pixels
  are the slide's own, not resampled: a crop pasted into a slide reads back byte for byte.
* **Centre convention**: the crop covers level-0 ``[x - fov/2, x + fov/2)`` (continuous
  coordinates, pixel ``i`` spans ``[i, i + 1)``); at the model's resolution that is columns
  ``x - 64 .. x + 63`` for a 128-px crop, the figure's pixel ``x`` at column 64.
* **Borders**: pixels of the field of view beyond the slide are black (0, 0, 0), as in the
  training crops (122 of the 3720 AMi-Br crops and 61 of the 2107 AtNorM-MD crops have black bands
  where they reached past their image), and the row's ``padded`` column says which fraction of the
  crop that is (0 when none). ``border="refuse"`` makes such detections error rows instead. A
  detection whose centre lies outside the slide is always an error row. Transparent pixels inside
  a slide (empty areas of sparse formats) are composited onto the slide's background colour.
* **Bad slides** (missing, not a slide, unreadable, truncated, no resolution) turn into error rows
  for their detections only; the other slides go on.

Reading uses OpenSlide (the ``ami-mitosis[slides]`` extra: ``openslide-python`` + ``openslide-bin``), which
covers Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Philips TIFF, Ventana, generic tiled TIFF, ...
The base install does not need it; asking for slides without it is a clear error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import DIST_NAME
from .infer import ENCODING, MAX_PIXELS, CropFiles, InputError, format_for, read_results, run_inference
from .preprocess import Preprocess

COLUMNS = ("slide", "id", "x", "y", "prob_atypical", "label", "status", "error", "padded")
N_KEY = 4  # slide, id, x, y identify a detection (resume)
REQUIRED = ("slide", "x", "y")
BORDERS = ("pad", "refuse")
PAD_RGB = (0, 0, 0)  # the training crops' padding (see the module docstring)
MPP_RANGE = (0.05, 20.0)  # plausible um/px of a scanned slide
MPP_TOL = 1e-3  # relative: a level this close to the model's um/px is read as is
RESAMPLE = Image.Resampling.LANCZOS
INSTALL_HINT = f"reading whole-slide images needs OpenSlide: pip install '{DIST_NAME}[slides]'"
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


class SlideError(Exception):
    """A slide cannot be used (missing, not a slide, unreadable, no resolution); str(e) says why."""


def _openslide():
    try:
        import openslide
    except ImportError as e:  # the [slides] extra is not installed, or libopenslide is missing
        raise InputError(f"{INSTALL_HINT} ({e})") from None
    return openslide


def require_reader() -> None:
    """Raise InputError (with what to install) unless a whole-slide reader is installed."""
    _openslide()


def close_slides() -> None:
    """Close the slides this process keeps open for reading."""
    _CACHE.clear()


def available() -> bool:
    """Whether a whole-slide reader (OpenSlide) is installed."""
    try:
        _openslide()
    except InputError:
        return False
    return True


# -- detections ----------------------------------------------------------------------------------

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
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
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


# -- slides --------------------------------------------------------------------------------------

def _mpp_from(props, mpp: float | None) -> tuple[float, float, str]:
    vals = []
    for k in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            vals.append(float(props.get(k, "nan")))
        except ValueError:
            vals.append(float("nan"))
    lo, hi = MPP_RANGE
    if all(math.isfinite(v) and lo <= v <= hi for v in vals):
        return vals[0], vals[1], "slide metadata"
    if mpp is not None:
        return float(mpp), float(mpp), "--mpp"
    if any(math.isfinite(v) for v in vals):
        raise SlideError(f"the slide's resolution metadata is implausible ({vals[0]:g} x {vals[1]:g} um/px, outside "
                         f"{lo:g}-{hi:g}); give the slide's um/px with --mpp")
    raise SlideError("the slide has no resolution metadata (um/px); give it with --mpp "
                     "(e.g. --mpp 0.25 for a 40x scan) - the model needs crops at its training resolution")


class Slide:
    """An open whole-slide image with a known resolution. Thread-safe for reading (OpenSlide is)."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        openslide = _openslide()
        p = os.fspath(path)
        self.path = p
        if not os.path.exists(p):
            raise SlideError("broken symbolic link" if os.path.islink(p) else "slide not found")
        if os.path.isdir(p) and not p.lower().endswith(".mrxs"):
            raise SlideError("is a directory, not a slide")
        try:
            self.osr = openslide.OpenSlide(p)
        except openslide.OpenSlideUnsupportedFormatError:
            if _is_tiff(p):
                raise SlideError("unreadable slide: a TIFF file OpenSlide cannot open (truncated, corrupt, or not "
                                 "tiled)") from None
            raise SlideError("not a whole-slide image OpenSlide can read (unsupported or unrecognised format)") from None
        except (openslide.OpenSlideError, OSError, ValueError) as e:
            raise SlideError(f"unreadable slide ({_first_line(e)})") from None
        props = self.osr.properties
        self.mpp_x, self.mpp_y, self.mpp_source = _mpp_from(props, mpp)
        self.vendor = props.get("openslide.vendor", "")
        self.width, self.height = self.osr.dimensions
        self.level_dimensions = tuple(self.osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self.osr.level_downsamples)
        bg = props.get("openslide.background-color", "FFFFFF")
        try:
            self.background = tuple(int(bg[i:i + 2], 16) for i in (0, 2, 4))
        except ValueError:
            self.background = (255, 255, 255)

    def close(self) -> None:
        self.osr.close()

    def best_level(self, mpp: float) -> int:
        """The coarsest level still at least as fine as ``mpp`` on both axes (never upsample a coarse level)."""
        best = 0
        fine = min(mpp / self.mpp_x, mpp / self.mpp_y)  # the largest downsample that is fine enough
        for i, d in enumerate(self.level_downsamples):
            if d <= fine * (1 + MPP_TOL) and d > self.level_downsamples[best]:
                best = i
        return best

    def describe(self, mpp: float | None = None) -> str:
        """Size, resolution and levels; with ``mpp``, also how crops at ``mpp`` um/px are read."""
        text = (f"{self.width}x{self.height} px, {self.mpp_x:.4g} x {self.mpp_y:.4g} um/px ({self.mpp_source}), "
                f"{len(self.level_downsamples)} levels, {self.vendor or 'unknown vendor'}")
        if mpp:
            lv = self.best_level(mpp)
            d = self.level_downsamples[lv]
            kx, ky = mpp / (self.mpp_x * d), mpp / (self.mpp_y * d)
            exact = abs(kx - 1) <= MPP_TOL and abs(ky - 1) <= MPP_TOL
            text += (f"; crops from level {lv} ({self.mpp_x * d:.4g} um/px)"
                     + (", not resampled" if exact else f", resampled x{1 / kx:.4g}"))
        return text

    def read_crop(self, x: float, y: float, mpp: float, size: int, border: str = "pad") -> tuple[np.ndarray, float, int]:
        """The ``size`` x ``size`` RGB crop at ``mpp`` um/px centred on level-0 (x, y).
        Returns (uint8 HWC array, fraction of the crop beyond the slide, level read)."""
        if not (0 <= x < self.width and 0 <= y < self.height):
            raise SlideError(f"detection centre ({x}, {y}) lies outside the slide ({self.width} x {self.height} level-0 px)")
        fx, fy = size * mpp / self.mpp_x, size * mpp / self.mpp_y  # field of view, level-0 px
        x0, y0 = x - fx / 2, y - fy / 2
        inside = (max(0.0, min(x0 + fx, self.width) - max(x0, 0.0)) * max(0.0, min(y0 + fy, self.height) - max(y0, 0.0)))
        padded = max(0.0, 1.0 - inside / (fx * fy))
        if padded > 1e-9 and border == "refuse":
            raise SlideError(f"the crop reaches past the slide's border ({padded:.0%} of it outside); "
                             "--border pad classifies it with the outside black, as in the training crops")
        level = self.best_level(mpp)
        d = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        wx, wy = fx / d, fy / d  # field of view in level pixels
        lx, ly = x0 / d, y0 / d  # its top-left, level coordinates (continuous)
        exact = abs(wx - size) <= MPP_TOL * size and abs(wy - size) <= MPP_TOL * size
        if exact:  # at the model's resolution: the slide's own pixels
            left, top, w, h, box = round(lx), round(ly), size, size, None
        else:
            m = 2 + 3 * math.ceil(max(wx / size, wy / size))  # the filter's support, in level pixels
            left, top = math.floor(lx) - m, math.floor(ly) - m
            w, h = math.ceil(lx + wx) + m - left, math.ceil(ly + wy) + m - top
            box = (lx - left, ly - top, lx - left + wx, ly - top + wy)
        if w * h > MAX_PIXELS:
            raise SlideError(f"the crop's region at level {level} is {w}x{h} px: the slide's pyramid lacks a level near "
                             f"{mpp:g} um/px")
        region = self.osr.read_region((round(left * d), round(top * d)), level, (w, h))  # RGBA
        rgba = np.asarray(region, dtype=np.uint8)
        if (rgba[..., 3] < 255).any():  # transparent areas (and beyond the slide): onto the background colour
            a = rgba[..., 3:4].astype(np.float32) / 255.0
            rgb = rgba[..., :3].astype(np.float32) * a + np.asarray(self.background, np.float32) * (1.0 - a)
            out = np.rint(rgb).astype(np.uint8)
        else:
            out = rgba[..., :3].copy()
        # beyond the slide: black, as in the training crops
        cols = np.arange(left, left + w)
        rows = np.arange(top, top + h)
        out[:, (cols < 0) | (cols >= lw)] = PAD_RGB
        out[(rows < 0) | (rows >= lh), :] = PAD_RGB
        if box is not None:
            out = np.asarray(Image.fromarray(out, "RGB").resize((size, size), RESAMPLE, box=box), dtype=np.uint8)
        return out, padded, level


def _is_tiff(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _first_line(e: BaseException) -> str:
    t = str(e).strip().splitlines()
    return t[0] if t else type(e).__name__


class _SlideCache:
    """Open slides (and the reasons slides could not be opened), shared by the worker threads of one
    process; the least recently used is closed beyond ``max_open``."""

    def __init__(self, max_open: int = 16):
        self.max_open = max_open
        self.lock = threading.Lock()
        self.items: OrderedDict = OrderedDict()

    def get(self, path: str, mpp: float | None) -> Slide:
        k = (path, mpp)
        with self.lock:
            hit = self.items.get(k)
            if hit is None:
                try:
                    hit = Slide(path, mpp)
                except SlideError as e:
                    hit = e
                self.items[k] = hit
                while len(self.items) > self.max_open:
                    _, old = self.items.popitem(last=False)
                    if isinstance(old, Slide):
                        old.close()
            self.items.move_to_end(k)
        if isinstance(hit, SlideError):
            raise hit
        return hit

    def drop(self, path: str, mpp: float | None) -> None:
        """Forget a slide after a read error (OpenSlide handles stay in error once one occurred)."""
        with self.lock:
            old = self.items.pop((path, mpp), None)
        if isinstance(old, Slide):
            try:
                old.close()
            except Exception:
                pass

    def clear(self) -> None:
        with self.lock:
            items, self.items = list(self.items.values()), OrderedDict()
        for s in items:
            if isinstance(s, Slide):
                s.close()


_CACHE = _SlideCache()


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a slide for reading crops (raises :class:`SlideError` with the reason)."""
    return Slide(path, mpp)


# -- the pipeline source -------------------------------------------------------------------------

@dataclass(frozen=True)
class SlideDetections(CropFiles):
    """The :func:`~ami.runtime.infer.run_inference` source for detections on slides: items are
    :class:`Detection`; pixels are cut from the slides at the model's training resolution."""

    mpp: float  # the model's um/px
    size: int  # the model's crop, px at mpp
    slide_mpp: float | None = None  # for slides without resolution metadata
    border: str = "pad"
    columns: tuple = COLUMNS
    n_key: int = N_KEY

    def key(self, item: Detection):
        return item.key

    def fields(self, item: Detection) -> tuple:
        return (item.slide, item.id, item.x, item.y)

    def describe(self, item: Detection) -> str:
        return str(item)

    def prepare(self, items: list, pre: Preprocess, max_pixels: int = MAX_PIXELS):
        s = pre.input_size
        out = np.empty((len(items), s, s, 3), np.uint8)
        status: list = []
        n = 0
        for d in items:
            try:
                if d.problem:
                    raise SlideError(d.problem)
                slide = _CACHE.get(d.path, self.slide_mpp)
                try:
                    crop, padded, _ = slide.read_crop(d.x, d.y, self.mpp, self.size, self.border)
                except SlideError:
                    raise
                except Exception as e:  # OpenSlide errors on truncated / corrupt tiles
                    _CACHE.drop(d.path, self.slide_mpp)
                    raise SlideError(f"unreadable slide region ({type(e).__name__}: {_first_line(e)})") from None
                a = crop if crop.shape[:2] == (s, s) and pre.resize in (None, s) else pre.to_uint8(Image.fromarray(crop, "RGB"))
                out[n] = a
                n += 1
                status.append((None, False, (_fmt_frac(padded),)))
            except SlideError as e:
                status.append((str(e), False, ("",)))
            except MemoryError:
                status.append(("out of memory while reading the slide", False, ("",)))
            except Exception as e:  # one detection must never take a batch down
                status.append((f"unexpected {type(e).__name__}: {e}", False, ("",)))
        return out[:n], status


def _fmt_frac(v: float) -> float | int:
    v = round(float(v), 4)
    return 0 if v == 0 else v


def source_for(engine, slide_mpp: float | None = None, border: str = "pad") -> SlideDetections:
    """The pipeline source for ``engine``'s training crop (raises InputError for a bad border / mpp)."""
    if border not in BORDERS:
        raise InputError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
    if slide_mpp is not None and not (MPP_RANGE[0] <= slide_mpp <= MPP_RANGE[1]):
        raise InputError(f"--mpp {slide_mpp:g} is not a plausible slide resolution ({MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} um/px)")
    tc = engine.meta.training_crop()
    return SlideDetections(mpp=tc["mpp"], size=tc["size_px"], slide_mpp=slide_mpp, border=border)


# -- per-slide summary and GeoJSON ---------------------------------------------------------------

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


SUMMARY_COLUMNS = ("slide", "detections", "classified", "atypical", "normal", "atypical_ratio", "ci95_low",
                   "ci95_high", "failed", "padded", "slide_info", "geojson")


def read_rows(path: str | os.PathLike, fmt: str | None = None) -> list[dict]:
    """The rows of a slide output file (CSV or JSON Lines) as dicts, values as written."""
    p = Path(path)
    fmt = format_for(p, fmt)
    read_results(p, fmt, COLUMNS, N_KEY)  # the header check
    with open(p, newline="" if fmt == "csv" else None, **ENCODING) as f:
        if fmt == "csv":
            return [r for r in csv.DictReader(f) if r.get("status") in ("ok", "error")]
        out = []
        for line in f:
            line = line.strip()
            if line:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                if d.get("status") in ("ok", "error"):
                    out.append({k: ("" if v is None else v) for k, v in d.items()})
        return out


def summarize(rows: list[dict], atypical: str = "Atypical") -> list[SlideSummary]:
    by: dict[str, SlideSummary] = {}
    for r in rows:
        s = by.setdefault(str(r["slide"]), SlideSummary(str(r["slide"])))
        s.detections += 1
        if r["status"] == "ok":
            s.classified += 1
            s.atypical += int(r["label"] == atypical)
            s.padded += int(float(r.get("padded") or 0) > 0)
        else:
            s.failed += 1
            s.errors[r["error"]] = s.errors.get(r["error"], 0) + 1
    return list(by.values())


def _safe_name(slide: str, taken: set) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(slide).name) or "slide"
    name = stem
    if name.lower() in taken:
        name = f"{stem}-{hashlib.sha1(slide.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    taken.add(name.lower())
    return name + ".geojson"


def geojson_features(rows: list[dict], fov: tuple[float, float] | None, class_names=("Normal", "Atypical")) -> dict:
    """A GeoJSON FeatureCollection of the classified detections of one slide, in level-0 pixel
    coordinates, as QuPath (0.4 and later) imports detections: ``objectType`` detection, a
    ``classification`` (Atypical red, Normal green) and the probability in ``measurements``.
    The geometry is the crop's square (``fov`` level-0 px) or, when unknown, the centre point."""
    colours = {class_names[1]: [220, 40, 40], class_names[0]: [40, 170, 60]}
    feats = []
    for r in rows:
        if r["status"] != "ok":
            continue
        x, y = float(r["x"]), float(r["y"])
        if fov:
            hx, hy = fov[0] / 2, fov[1] / 2
            ring = [[x - hx, y - hy], [x + hx, y - hy], [x + hx, y + hy], [x - hx, y + hy], [x - hx, y - hy]]
            geom = {"type": "Polygon", "coordinates": [ring]}
        else:
            geom = {"type": "Point", "coordinates": [x, y]}
        label = r["label"]
        feats.append({"type": "Feature", "geometry": geom,
                      "properties": {"objectType": "detection", "name": str(r["id"]),
                                     "classification": {"name": label, "color": colours.get(label, [128, 128, 128])},
                                     "measurements": {"prob_atypical": float(r["prob_atypical"]),
                                                      "padded_fraction": float(r.get("padded") or 0)},
                                     "ami": {"id": str(r["id"]), "x": r["x"], "y": r["y"]}}})
    return {"type": "FeatureCollection", "features": feats}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", **ENCODING) as f:
        f.write(text)
    os.replace(tmp, path)


def outputs_beside(out_path: str | os.PathLike) -> tuple[Path, Path]:
    """Where the per-slide summary and the GeoJSON folder of ``out_path`` go: OUT.slides.csv, OUT.geojson/."""
    p = Path(out_path)
    stem = p.with_suffix("") if p.suffix else p
    return stem.with_name(stem.name + ".slides.csv"), stem.with_name(stem.name + ".geojson")


def write_slide_outputs(out_path: str | os.PathLike, detections: list[Detection], source: SlideDetections,
                        fmt: str | None = None, class_names=("Normal", "Atypical")) -> list[SlideSummary]:
    """From the whole output file (this run's rows and resumed ones): the per-slide summary CSV and
    one GeoJSON FeatureCollection per slide, beside ``out_path``. Returns the summaries."""
    rows = read_rows(out_path, fmt)
    sums = summarize(rows, class_names[1])
    by_slide: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_slide[str(r["slide"])].append(r)
    path_of = {d.slide: d.path for d in detections}
    summary_csv, gdir = outputs_beside(out_path)
    gdir.mkdir(parents=True, exist_ok=True)
    taken: set = set()
    for s in sums:
        fov = None
        try:
            sl = _CACHE.get(path_of.get(s.slide, s.slide), source.slide_mpp)
            s.info = sl.describe(source.mpp)
            fov = (source.size * source.mpp / sl.mpp_x, source.size * source.mpp / sl.mpp_y)
        except (SlideError, InputError) as e:
            s.info = f"not opened: {e}"
        name = _safe_name(s.slide, taken)
        _write_atomic(gdir / name, json.dumps(geojson_features(by_slide[s.slide], fov, class_names), separators=(",", ":")) + "\n")
        s.geojson = str(Path(gdir.name) / name)
    for stale in gdir.glob("*.geojson"):  # slides of an earlier run into the same output, no longer in it
        if stale.name.lower() not in {n + ".geojson" for n in taken}:
            stale.unlink()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS)
    def f(v: float) -> str:
        return "" if not math.isfinite(v) else f"{v:.4f}"

    for s in sums:
        lo, hi = s.ci95
        w.writerow([s.slide, s.detections, s.classified, s.atypical, s.classified - s.atypical, f(s.ratio), f(lo), f(hi),
                    s.failed, s.padded, s.info, s.geojson])
    _write_atomic(summary_csv, buf.getvalue())
    return sums


def summary_lines(sums: list[SlideSummary], out_path: str | os.PathLike) -> list[str]:
    """The per-slide table for the terminal."""
    summary_csv, gdir = outputs_beside(out_path)
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
    lines.append(f"per-slide summary: {summary_csv}; QuPath GeoJSON: {gdir}{os.sep}")
    return lines


def run_slides(detections_csv: str | os.PathLike, engine, out_path: str | os.PathLike, fmt: str | None = None, *,
               slide_mpp: float | None = None, border: str = "pad", **kw):
    """Classify every detection of ``detections_csv`` and write rows to ``out_path`` (one per
    detection), then the per-slide summary and GeoJSON beside it. ``kw`` goes to
    :func:`~ami.runtime.infer.run_inference` (batch_size, workers, threshold, resume, overwrite,
    progress, pool). Returns (run summary, per-slide summaries)."""
    _openslide()
    src = source_for(engine, slide_mpp, border)
    dets = read_detections(detections_csv)
    if not dets:
        raise InputError(f"no detections in {detections_csv}")
    try:
        summary = run_inference(dets, engine, out_path, fmt, source=src, **kw)
        sums = write_slide_outputs(out_path, dets, src, fmt, tuple(engine.meta.class_names))
    finally:
        _CACHE.clear()
    return summary, sums
