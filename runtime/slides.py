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
  a slide (empty areas of sparse formats) are composited onto the slide's background colour; a crop
  whose in-slide area is more than half without scanned data (a tile the file declares but does not
  hold, an empty area) is an error row ("no scanned data at this location"), never a label on blanks.
* **Bad slides** (missing, not a slide, unreadable, truncated, no resolution) turn into error rows
  for their detections only; the other slides go on.

Reading uses OpenSlide (the ``ami-mitosis[slides]`` extra: ``openslide-python`` + ``openslide-bin``), which
covers Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Philips TIFF, Ventana, generic tiled TIFF, ...
The base install does not need it; asking for slides without it is a clear error.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from . import DIST_NAME
from .detections import Detection, detections_on, read_detections
from .errors import BadInput
from .infer import MAX_PIXELS, CropFiles, InferenceOptions, InputError, run
from .preprocess import Preprocess
from .slide_outputs import (
    SUMMARY_COLUMNS,
    SlideOutputs,
    SlideSummary,
    geojson_features,
    outputs_beside,
    summarize,
    summary_lines,
    wilson,
)

COLUMNS = ("slide", "id", "x", "y", "prob_atypical", "label", "status", "error", "padded")
N_KEY = 4  # slide, id, x, y identify a detection (resume)
BORDERS = ("pad", "refuse")
PAD_RGB = (0, 0, 0)  # the training crops' padding (see the module docstring)
MPP_RANGE = (0.05, 20.0)  # plausible um/px of a scanned slide
MAX_EMPTY = 0.5  # more of the crop's in-slide area without scanned data than this: an error row
MPP_TOL = 1e-3  # relative: a level this close to the model's um/px is read as is
RESAMPLE = Image.Resampling.LANCZOS
INSTALL_HINT = f"reading whole-slide images needs OpenSlide: pip install '{DIST_NAME}[slides]'"
__all__ = ["BORDERS", "COLUMNS", "N_KEY", "SUMMARY_COLUMNS", "Detection", "Slide", "SlideDetections", "SlideError",
           "SlideSummary", "available", "close_slides", "detections_on", "geojson_features", "open_slide",
           "outputs_beside", "read_detections", "require_reader", "run_slides", "source_for", "summarize",
           "summary_lines", "wilson"]


class SlideError(BadInput):
    """A slide cannot be used (missing, not a slide, unreadable, no resolution); str(e) says why."""


class SlideClosed(SlideError):
    """The handle was closed (by its run's end, or after a read error) before this read began."""


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
    """Nothing to do: each run closes its own slides when it ends (kept for older callers)."""


def available() -> bool:
    """Whether a whole-slide reader (OpenSlide) is installed."""
    try:
        _openslide()
    except InputError:
        return False
    return True


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
    """An open whole-slide image with a known resolution. Thread-safe: reads may run concurrently
    (OpenSlide is thread-safe for reading); :meth:`close` waits until no read is in progress, and a
    read after close is a :class:`SlideError`, never a crash."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        openslide = _openslide()
        p = os.fspath(path)
        self.path = p
        self._cond, self._readers, self._closed = threading.Condition(), 0, False
        _check_slide_file(p)
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
        """Close the handle once no read is in progress (later reads raise SlideError)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.wait_for(lambda: self._readers == 0)
            self.osr.close()

    @contextlib.contextmanager
    def _reading(self):
        with self._cond:
            if self._closed:
                raise SlideClosed("the slide was closed while its detections were being read")
            self._readers += 1
        try:
            yield self.osr
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

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
        with self._reading() as osr:
            region = osr.read_region((round(left * d), round(top * d)), level, (w, h))  # RGBA
        rgba = np.asarray(region, dtype=np.uint8)
        cols = np.arange(left, left + w)
        rows = np.arange(top, top + h)
        out_c, out_r = (cols < 0) | (cols >= lw), (rows < 0) | (rows >= lh)
        _refuse_missing_data(rgba[~out_r][:, ~out_c, 3])
        out = _onto_background(rgba, self.background)
        out[:, out_c] = PAD_RGB  # beyond the slide: black, as in the training crops
        out[out_r, :] = PAD_RGB
        if box is not None:
            out = np.asarray(Image.fromarray(out, "RGB").resize((size, size), RESAMPLE, box=box), dtype=np.uint8)
        return out, padded, level


def _refuse_missing_data(alpha: np.ndarray) -> None:
    """A crop whose area inside the slide is mostly without scanned data (transparent: a tile the
    file declares but does not hold, or an empty area of a sparse slide) is not classified."""
    if alpha.size and (empty := float((alpha == 0).mean())) > MAX_EMPTY:
        raise SlideError(f"no scanned data at this location ({empty:.0%} of the crop is a missing tile or an empty "
                         "area of the slide)")


def _onto_background(rgba: np.ndarray, background: tuple) -> np.ndarray:
    """RGB of an RGBA region, partly transparent pixels composited onto the slide's background colour."""
    if not (rgba[..., 3] < 255).any():
        return rgba[..., :3].copy()
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + np.asarray(background, np.float32) * (1.0 - a)
    return np.rint(rgb).astype(np.uint8)


def _check_slide_file(p: str) -> None:
    """Refuse what is not a slide file before OpenSlide opens it (a FIFO would block it for ever)."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise SlideError("broken symbolic link" if os.path.islink(p) else "slide not found") from None
    except OSError as e:
        raise SlideError(f"cannot read the slide ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        if not p.lower().endswith(".mrxs"):
            raise SlideError("is a directory, not a slide")
    elif not stat.S_ISREG(st.st_mode):
        raise SlideError("not a regular file (a FIFO, device or socket), not a slide")


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
                evicted = []
                while len(self.items) > self.max_open:
                    evicted.append(self.items.popitem(last=False)[1])
            else:
                evicted = []
            self.items.move_to_end(k)
        for old in evicted:  # outside the lock: closing waits for the reads in progress
            if isinstance(old, Slide):
                old.close()
        if isinstance(hit, SlideError):
            raise hit
        return hit

    def drop(self, path: str, mpp: float | None, slide: Slide) -> None:
        """Forget ``slide`` after a read error (OpenSlide handles stay in error once one occurred); a
        handle another thread opened since is kept. Closing waits for the reads in progress."""
        with self.lock:
            old = self.items.get((path, mpp))
            if old is not slide:
                return
            del self.items[(path, mpp)]
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


class _Readers:
    """The open slides of each run, by the run's token: a run (one :class:`SlideDetections`) owns
    its handles; its end closes them and no other run's. Worker processes have their own."""

    def __init__(self):
        self.lock = threading.Lock()
        self.runs: dict[str, _SlideCache] = {}

    def of(self, token: str) -> _SlideCache:
        with self.lock:
            cache = self.runs.get(token)
            if cache is None:
                cache = self.runs[token] = _SlideCache()
            return cache

    def release(self, token: str) -> None:
        with self.lock:
            cache = self.runs.pop(token, None)
        if cache is not None:
            cache.clear()


_READERS = _Readers()


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
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # whose open slides these are

    def open(self, path: str) -> Slide:
        """The run's own handle on the slide at ``path`` (opened once, shared by its workers)."""
        return _READERS.of(self.token).get(path, self.slide_mpp)

    def key(self, item: Detection):
        return item.key

    def fields(self, item: Detection) -> tuple:
        return (item.slide, item.id, item.x, item.y)

    def describe(self, item: Detection) -> str:
        return str(item)

    def files(self, items: list) -> list[str]:
        """The slides: an output may never be one of them."""
        return list(dict.fromkeys(d.path for d in items if d.path))

    def release(self) -> None:
        """Close this run's slides (after its workers are done; never another run's)."""
        _READERS.release(self.token)

    def _read(self, d: Detection) -> tuple[np.ndarray, float]:
        """The crop of ``d`` from this run's handle; a handle found in error is dropped and the read
        tried once more on a fresh one (another worker may have dropped it just before)."""
        cache = _READERS.of(self.token)
        for attempt in (0, 1):
            slide = cache.get(d.path, self.slide_mpp)
            try:
                crop, padded, _ = slide.read_crop(d.x, d.y, self.mpp, self.size, self.border)
                return crop, padded
            except SlideClosed:
                if attempt:
                    raise
            except SlideError:
                raise
            except Exception as e:  # OpenSlide errors on truncated / corrupt tiles
                cache.drop(d.path, self.slide_mpp, slide)
                raise SlideError(f"unreadable slide region ({type(e).__name__}: {_first_line(e)})") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def prepare(self, items: list, pre: Preprocess, max_pixels: int = MAX_PIXELS):
        s = pre.input_size
        out = np.empty((len(items), s, s, 3), np.uint8)
        status: list = []
        n = 0
        for d in items:
            try:
                if d.problem:
                    raise SlideError(d.problem)
                crop, padded = self._read(d)
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


# -- the run ---------------------------------------------------------------------------------------

def _slide_info(source: SlideDetections) -> Callable[[str], tuple[str, tuple[float, float] | None]]:
    """For the per-slide summary: a slide's description and its crops' field of view (level-0 px)."""
    def info(path: str) -> tuple[str, tuple[float, float] | None]:
        try:
            sl = source.open(path)
        except (SlideError, InputError) as e:
            return f"not opened: {e}", None
        return sl.describe(source.mpp), (source.size * source.mpp / sl.mpp_x, source.size * source.mpp / sl.mpp_y)
    return info


def run_slides(detections_csv: str | os.PathLike, engine, out_path: str | os.PathLike, fmt: str | None = None, *,
               slide_mpp: float | None = None, border: str = "pad", options: InferenceOptions | None = None, **kw):
    """Classify every detection of ``detections_csv`` and write rows to ``out_path`` (one per
    detection), with the per-slide summary and GeoJSON beside it, built as the rows stream and
    written while the output is locked (none for a stream). ``options`` (or ``kw``, the keywords of
    :func:`~ami.runtime.infer.run_inference`: batch_size, workers, threshold, resume, overwrite,
    progress, pool) say how. Returns (run summary, per-slide summaries)."""
    _openslide()
    src = source_for(engine, slide_mpp, border)
    dets = read_detections(detections_csv)
    if not dets:
        raise InputError(f"no detections in {detections_csv}")
    opts = options or InferenceOptions(fmt=fmt, **kw)
    tap = SlideOutputs(None if os.fspath(out_path) == "-" else out_path, {d.slide: d.path for d in dets},
                       _slide_info(src), tuple(engine.meta.class_names))
    opts = replace(opts, source=src, tap=tap, protect=(*opts.protect, os.fspath(detections_csv)))
    summary = run(dets, engine, out_path, opts)
    return summary, tap.sums
