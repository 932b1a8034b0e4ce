"""The Python API for pipelines: load a model once, then classify crops held in memory, crop files,
or detections on a whole-slide image, and get back the rows ``ami-infer`` writes::

    from ami.runtime.api import Classifier

    clf = Classifier()                                   # the shipped edge model (or a path, provider=...)
    rows = clf.classify_arrays(crops)                    # uint8 RGB crops: [N, H, W, 3] or a list of [H, W, 3]
    rows = clf.classify_files(["a.png", "b.png"])        # crop files (as ami-infer PATH...)
    rows = clf.classify_slide("s.svs", [(x, y), ...])    # detections on a slide (needs ami-mitosis[slides])
    rows = clf.classify_detections("detections.csv")     # as ami-infer --slides

Every call goes through the command line's own pipeline (:func:`~ami.runtime.infer.run`: the same
preprocessing, batching, workers, error handling and labels, into an in-memory sink: no file is
written, arrays are never copied to disk), so a row is a dict with the
columns and values of a row of ``ami-infer``'s JSON Lines output: ``prob_atypical`` a float (None
on error), ``label`` "Atypical" / "Normal" (None on error), ``status`` "ok" / "error", ``error``
the reason or None. A bad crop or detection is an error row, never an exception; problems with the
call itself (a model that cannot load, a missing slide reader) raise ArtifactError / EngineError /
InputError with a message for a person.

Thread safety: one :class:`Classifier` may be shared by several threads, and several may run in one
process. Each call runs its own pipeline (its own decoding workers, its own in-memory rows, its own
slide handles: a call opens the slides it reads and closes only those when it ends, never another
call's), so concurrent calls neither mix rows nor close each other's slides. The engine is shared:
ONNX Runtime sessions run concurrent calls; OpenVINO and TensorRT engines serialise or pool their
infer requests (see :mod:`ami.runtime.engines`). Calls made while another is running simply run
at the same time; there is no global state to clean up.

Arrays are taken to be crops as the model was trained on (the artefact's ``training_crop()``: for
the AMi-Br models 128 px at 0.25 um/px, centred on the figure); other sizes are resized exactly as
crop files are. Slides are read at the model's resolution (see :mod:`ami.runtime.slides`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .engines import load_engine
from .imageio import MAX_PIXELS
from .infer import CropFiles, InferenceOptions, InputError, MemorySink, iter_inputs, run
from .preprocess import Preprocess

ARRAY_COLUMNS = ("id", "prob_atypical", "label", "status", "error")

__all__ = ["ARRAY_COLUMNS", "Classifier"]


@dataclass(frozen=True)
class _Arrays(CropFiles):
    """Crops in memory; an item is an index into ``crops`` (threads only: arrays are not pickled)."""

    crops: tuple = ()
    ids: tuple = ()
    columns: tuple = ARRAY_COLUMNS

    def key(self, item: int):
        return self.ids[item]

    def fields(self, item: int) -> tuple:
        return (self.ids[item],)

    def describe(self, item: int) -> str:
        return f"array {self.ids[item]}"

    def files(self, items: list) -> list[str]:
        return []  # arrays are not files

    def prepare(self, items: list, pre: Preprocess, max_pixels: int = MAX_PIXELS):
        s = pre.input_size
        out = np.empty((len(items), s, s, 3), np.uint8)
        status, n = [], 0
        for i in items:
            a = self.crops[i]
            try:
                if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                    raise ValueError(f"a crop must be a uint8 [H, W, 3] RGB array, got "
                                     f"{getattr(a, 'dtype', type(a).__name__)} {list(getattr(a, 'shape', []))}")
                if a.shape[0] * a.shape[1] > max_pixels or min(a.shape[:2]) < 1:
                    raise ValueError(f"a crop of {a.shape[1]}x{a.shape[0]} pixels cannot be classified")
                resized = pre.needs_resize(a.shape[1], a.shape[0])
                out[n] = pre.to_uint8(Image.fromarray(np.ascontiguousarray(a), "RGB")) if resized else a
                n += 1
                status.append((None, resized, ()))
            except ValueError as e:
                status.append((str(e), False, ()))
        return out[:n], status


class Classifier:
    """One loaded model; cheap to call many times. ``model``: an ami ONNX file or TensorRT plan (None:
    the shipped edge model); ``provider``: auto | cpu | cuda | tensorrt; ``threads``: ONNX Runtime CPU
    threads (0: its default); ``threshold``: None = the model's; ``batch_size``, ``workers``: as
    ami-infer's options."""

    def __init__(self, model: str | os.PathLike | None = None, *, provider: str = "auto", threads: int = 0,
                 threshold: float | None = None, batch_size: int = 64, workers: int = 0, engine=None):
        self.engine = engine if engine is not None else load_engine(model, provider=provider, threads=threads)
        self.threshold = float(self.engine.threshold if threshold is None else threshold)
        self.batch_size, self.workers = batch_size, workers

    @property
    def training_crop(self) -> dict:
        """The crops the model was trained on: mpp, size_px, centred, source, assumed."""
        return self.engine.meta.training_crop()

    def describe(self) -> str:
        return self.engine.describe()

    def _run(self, items, source) -> list[dict]:
        """The pipeline into memory: the rows as dicts, as a JSON Lines reader would get them."""
        src = source or CropFiles()
        sink = MemorySink(src.columns, src.n_key)
        run(items, self.engine, None, InferenceOptions(batch_size=self.batch_size, workers=self.workers,
                                                       threshold=self.threshold, progress=False, source=src,
                                                       sink=sink))
        return sink.rows

    def classify_arrays(self, crops, ids=None) -> list[dict]:
        """Rows (id, prob_atypical, label, status, error) for uint8 RGB crops: one [N, H, W, 3] array or
        a sequence of [H, W, 3] arrays. ``ids`` (default 0, 1, ...) are carried into the rows as text.
        An array that is not 4-D (e.g. one [H, W, 3] crop) raises InputError: its rows would be split
        into nonsense crops."""
        if isinstance(crops, np.ndarray) and crops.ndim != 4:
            hint = " (one crop: pass [crop] or crop[None])" if crops.ndim == 3 else ""
            raise InputError(f"crops must be one [N, H, W, 3] array or a sequence of [H, W, 3] arrays, got an array of "
                             f"shape {list(crops.shape)}{hint}")
        items = list(crops)
        ids = [str(i) for i in (ids if ids is not None else range(len(items)))]
        if len(ids) != len(items):
            raise InputError(f"{len(ids)} ids for {len(items)} crops")
        if len(set(ids)) != len(ids):
            raise InputError("ids must be unique")
        if not items:
            return []
        return self._run(range(len(items)), _Arrays(crops=tuple(items), ids=tuple(ids)))

    def classify_files(self, paths) -> list[dict]:
        """Rows (path, prob_atypical, label, status, error) for crop files, folders (recursive) or
        .txt / .csv lists, expanded as ami-infer expands its PATH arguments."""
        files = list(iter_inputs([os.fspath(p) for p in paths]))
        return self._run(files, None) if files else []

    def classify_slide(self, slide: str | os.PathLike, points, ids=None, *, mpp: float | None = None,
                       border: str = "pad") -> list[dict]:
        """Rows (slide, id, x, y, prob_atypical, label, status, error, padded) for detections at
        ``points`` ((x, y), level-0 pixels of each figure's centre) on ``slide``. ``mpp``: the slide's
        um/px when its metadata has none; ``border``: pad | refuse (see ami-infer --border)."""
        from . import slides

        slides.require_reader()
        return self._slide_rows(slides.detections_on(slide, points, ids), mpp, border)

    def classify_detections(self, detections_csv: str | os.PathLike, *, mpp: float | None = None,
                            border: str = "pad") -> list[dict]:
        """Rows for every detection of a detections CSV (the file ``ami-infer --slides`` takes)."""
        from . import slides

        slides.require_reader()
        return self._slide_rows(slides.read_detections(detections_csv), mpp, border)

    def _slide_rows(self, dets, mpp, border) -> list[dict]:
        from . import slides

        return self._run(dets, slides.source_for(self.engine, mpp, border)) if dets else []

    @staticmethod
    def summarize(rows: list[dict]) -> list[dict]:
        """Per slide: detections, classified, atypical, atypical_ratio, ci95 (Wilson), failed."""
        from . import slides

        out = []
        for s in slides.summarize([{**r, "label": r["label"] or "", "error": r["error"] or ""} for r in rows]):
            lo, hi = s.ci95
            out.append({"slide": s.slide, "detections": s.detections, "classified": s.classified,
                        "atypical": s.atypical, "atypical_ratio": s.ratio if s.classified else None,
                        "ci95": (lo, hi) if s.classified else None, "failed": s.failed, "padded": s.padded})
        return out
