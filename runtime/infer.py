"""The pipelined, crash-safe inference runner behind ``ami-infer``.

Design:

* :func:`iter_inputs` expands the user's arguments (directories recursively, single files, ``.txt``
  / ``.csv`` lists of paths) into crop paths, in a stable order, without duplicates.
* :func:`run_inference` cuts them into batches. A worker pool (threads by default: Pillow releases
  the GIL while it decodes and resizes; processes on request) decodes each batch and applies the
  geometric part of the model's :class:`~ami.runtime.preprocess.Preprocess` into one uint8 NHWC array,
  while the calling thread runs the engine on the previous batch. Normalisation happens inside the
  exported graph, so the host never touches floats.
* Every input gets exactly one row: path, prob_atypical, label, status (ok | error), error. Rows
  are written in input order as each batch completes and flushed at once, so an interrupted run
  (Ctrl-C, SIGTERM, even SIGKILL up to the last batch) keeps everything done so far;
  ``resume=True`` skips the inputs already in the output file and appends the rest.
* A bad crop never stops a batch: it becomes an error row with the reason from
  :func:`~ami.runtime.imageio.decode_rgb`. An engine failure does stop the run (it would fail
  every batch); rows written until then stay.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections import Counter, deque
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from .engine import EngineError
from .imageio import MAX_PIXELS, ImageError, decode_rgb, decode_rgb_fast
from .preprocess import Preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".csv")
LIST_COLUMNS = ("path", "file", "filename", "image", "dataset_uid")  # a CSV list: first of these present
COLUMNS = ("path", "prob_atypical", "label", "status", "error")
FORMATS = ("csv", "jsonl")
POOLS = ("thread", "process")
ENCODING = dict(encoding="utf-8", errors="surrogateescape")  # file names need not be valid UTF-8


class InputError(ValueError):
    """A command-line input or the output file cannot be used as given (not a per-crop problem)."""


# -- inputs --------------------------------------------------------------------------------------

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
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return
        header = [c.strip().lower() for c in rows[0]]
        col, start = 0, 0
        for name in LIST_COLUMNS:
            if name in header:
                col, start = header.index(name), 1
                break
        for r in rows[start:]:
            if len(r) > col and r[col].strip() and not r[col].lstrip().startswith("#"):
                yield resolve(r[col])
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
    dropped, order is kept. A path that does not exist at all raises :class:`InputError`
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
            if p not in seen:
                seen.add(p)
                yield p


# -- decoding (runs in the worker pool) ----------------------------------------------------------

def prepare_batch(paths: list[str], pre: Preprocess, max_pixels: int = MAX_PIXELS
                  ) -> tuple[np.ndarray, list[tuple[str | None, bool]]]:
    """Decode and geometrically preprocess ``paths``. Returns the uint8 NHWC pixels of the good
    crops (in order) and, per path, (error text or None, whether it was resized)."""
    s = pre.input_size
    out = np.empty((len(paths), s, s, 3), np.uint8)
    status: list[tuple[str | None, bool]] = []
    n = 0
    for p in paths:
        try:
            fast = decode_rgb_fast(p, max_pixels)  # an 8-bit RGB PNG, by the fastest decoder installed
            if fast is not None and not pre.needs_resize(fast.shape[1], fast.shape[0]):
                out[n] = fast
                n += 1
                status.append((None, False))
                continue
            im = Image.fromarray(np.ascontiguousarray(fast)) if fast is not None else decode_rgb(p, max_pixels=max_pixels)
            resized = pre.needs_resize(*im.size)
            a = pre.to_uint8(im)
            if a.shape != (s, s, 3):  # pragma: no cover - geometry always lands on input_size
                raise ImageError(f"preprocessing gave shape {a.shape}, expected ({s}, {s}, 3)")
            out[n] = a
            n += 1
            status.append((None, resized))
        except ImageError as e:
            status.append((str(e) or "unreadable image", False))
        except MemoryError:
            status.append(("out of memory while decoding", False))
        except Exception as e:  # noqa: BLE001 - one crop must never take a batch down
            status.append((f"unexpected {type(e).__name__}: {e}", False))
    return out[:n], status


class CropFiles:
    """The input source of :func:`run_inference`: where items come from and what their rows hold.

    The default source is crop image files: an item is a path, its row key is the path, its pixels
    come from :func:`prepare_batch`. Another source (e.g. detections on whole-slide images,
    :mod:`ami.runtime.slides`) gives its own ``columns`` (key columns first, then prob_atypical,
    label, status, error, then its extra columns), ``n_key``, ``key`` / ``fields`` (the key as text
    for resuming; the row's leading values), ``describe`` (an item for messages) and ``prepare``
    (runs in the worker pool: items -> uint8 NHWC pixels of the good ones, and per item
    (error or None, resized, extra values)). A source must be picklable for ``pool="process"``.
    """

    columns: tuple = COLUMNS
    n_key: int = 1

    def key(self, item):
        return item

    def fields(self, item) -> tuple:
        return (item,)

    def describe(self, item) -> str:
        return str(item)

    def prepare(self, items: list, pre: Preprocess, max_pixels: int = MAX_PIXELS):
        pixels, status = prepare_batch(items, pre, max_pixels)
        return pixels, [(err, resized, ()) for err, resized in status]


def _worker_init() -> None:  # processes: Ctrl-C is the parent's business
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


# -- output --------------------------------------------------------------------------------------

def _fmt_prob(p: float) -> str:
    # The shortest decimal that reads back as the same float32: exact, and no 17-digit noise.
    return np.format_float_positional(np.float32(p), unique=True, trim="0")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _csv_cell(col: str, v) -> str:
    if col == "prob_atypical":
        return "" if v is None else _fmt_prob(v)
    if col == "error":
        return _one_line(v) if v else ""
    return "" if v is None else str(v)


def _json_value(col: str, v) -> str:
    if col == "prob_atypical":
        return "null" if v is None else _fmt_prob(v)
    if col == "error":
        v = _one_line(v) if v else None
    return json.dumps(v, ensure_ascii=False)


def format_rows(rows: list[tuple], fmt: str, columns: tuple = COLUMNS) -> str:
    """Rows as CSV or JSON Lines text; each row holds one value per column of ``columns`` (for crops:
    path, prob|None, label|None, status, error|None; other sources add their own key and extra columns)."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for row in rows:
            w.writerow([_csv_cell(c, v) for c, v in zip(columns, row, strict=True)])
        return buf.getvalue()
    return "".join("{" + ", ".join(f"{json.dumps(c)}: {_json_value(c, v)}" for c, v in zip(columns, row, strict=True))
                   + "}\n" for row in rows)


def format_for(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The output format: explicit, else from the file's extension (.jsonl/.ndjson/.json), else csv."""
    if fmt:
        if fmt not in FORMATS:
            raise InputError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    return "jsonl" if str(path).lower().endswith((".jsonl", ".ndjson", ".json")) else "csv"


def _drop_partial_line(path: Path) -> int:
    """A run killed mid-write can leave half a row at the end: cut back to the last newline.
    Returns the number of bytes removed."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        pos = size
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = pos + i + 1
                f.truncate(keep)
                return size - keep
        f.truncate(0)
        return size


def read_results(path: str | os.PathLike, fmt: str, columns: tuple = COLUMNS, n_key: int = 1) -> dict:
    """{key: (status, label)} of the complete rows of an ami-infer output file. The key is the first
    column (a crop's path) or, with ``n_key`` > 1, the tuple of the first ``n_key`` columns as text."""
    p = Path(path)
    done: dict = {}
    i_status, i_label = columns.index("status"), columns.index("label")
    key = (lambda r: r[0]) if n_key == 1 else (lambda r: tuple(r[:n_key]))
    if not p.is_file() or p.stat().st_size == 0:
        return done
    with open(p, newline="" if fmt == "csv" else None, **ENCODING) as f:
        if fmt == "csv":
            r = csv.reader(f)
            header = next(r, None)
            if header is None:
                return done
            if tuple(header) != columns:
                raise InputError(f"{p} is not an ami-infer CSV (header {header}, expected {list(columns)}); "
                                 "choose another -o file or the matching --format")
            for row in r:
                if len(row) == len(columns) and row[i_status] in ("ok", "error"):
                    done[key(row)] = (row[i_status], row[i_label])
        else:
            for i, line in enumerate(f):
                line = line.strip()
                if not line:
                    continue
                try:
                    d = json.loads(line)
                    done[key([d[c] if isinstance(d[c], str) else str(d[c]) for c in columns[:n_key]])] = (
                        d["status"], d.get("label") or "")
                except (ValueError, KeyError, TypeError):
                    if i == 0:
                        raise InputError(f"{p} is not an ami-infer JSON Lines file; choose another -o file "
                                         "or the matching --format") from None
    return done


class ResultWriter:
    """Appends formatted rows; one write + flush per batch, fsync every few seconds and at close."""

    def __init__(self, path: str | os.PathLike, fmt: str, append: bool, fsync_every_s: float = 5.0,
                 columns: tuple = COLUMNS):
        self.path, self.fmt, self.columns = Path(path), fmt, tuple(columns)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not append or not self.path.exists() or self.path.stat().st_size == 0
        self.f = open(self.path, "w" if not append else "a", newline="", **ENCODING)
        if fresh and fmt == "csv":
            self.f.write(",".join(self.columns) + "\n")
            self.f.flush()
        self._fsync_every, self._last_sync = fsync_every_s, time.monotonic()

    def write(self, rows: list[tuple]) -> None:
        if rows:
            self.f.write(format_rows(rows, self.fmt, self.columns))  # one call: a signal cannot split a row
            self.f.flush()
            if time.monotonic() - self._last_sync > self._fsync_every:
                os.fsync(self.f.fileno())
                self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self.f.closed:
            self.f.flush()
            try:
                os.fsync(self.f.fileno())
            except OSError:  # pragma: no cover - e.g. a pipe
                pass
            self.f.close()


# -- progress ------------------------------------------------------------------------------------

class ProgressLine:
    """A one-line progress bar on stderr with crops/s (no extra dependency). On a terminal it
    redraws in place; otherwise (a log file) it prints a line every ``log_every_s`` seconds."""

    def __init__(self, total: int, stream=None, min_interval_s: float = 0.2, log_every_s: float = 10.0):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = min_interval_s if self.tty else log_every_s
        self.t0 = time.monotonic()
        self._last = 0.0
        self._width = 0
        self._shown: tuple | None = None

    def _line(self, done: int, errors: int) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        rate = done / dt
        frac = done / self.total if self.total else 1.0
        bar = int(frac * 24)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        m, s = divmod(int(eta + 0.5), 60)
        return (f"[{'#' * bar}{'.' * (24 - bar)}] {done}/{self.total} {frac:4.0%}  {rate:6.0f} crops/s  "
                f"eta {m}:{s:02d}  errors {errors}")

    def update(self, done: int, errors: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        if force and self._shown == (done, errors):
            return
        self._last, self._shown = now, (done, errors)
        line = self._line(done, errors)
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, done: int, errors: int) -> None:
        self.update(done, errors, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- the runner ----------------------------------------------------------------------------------

@dataclass
class Summary:
    out_path: Path
    fmt: str
    provider: str
    threshold: float
    found: int = 0  # inputs given (after expansion)
    processed: int = 0  # rows written by this run
    ok: int = 0
    failed: int = 0
    resized: int = 0
    labels: Counter = field(default_factory=Counter)  # this run's ok rows per label
    errors: Counter = field(default_factory=Counter)  # this run's failures per reason
    skipped: int = 0  # already in the output file (resume)
    skipped_failed: int = 0  # of those, rows with status error
    skipped_labels: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0
    interrupted: bool = False
    workers: int = 0
    pool: str = "thread"
    batch_size: int = 0
    first_errors: list = field(default_factory=list)  # (path, reason), the first few
    input_size: int = 0  # the model's input size (crops of another size are resized)
    class_names: tuple = ("Normal", "Atypical")
    engine_s: float = 0.0  # wall time inside engine.predict
    wait_s: float = 0.0  # wall time the engine thread waited for decoded batches (decoding is the bottleneck)

    @property
    def crops_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def any_failed(self) -> bool:
        return self.failed > 0 or self.skipped_failed > 0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.any_failed else 0

    def to_dict(self) -> dict:
        return {"out_path": str(self.out_path), "format": self.fmt, "provider": self.provider,
                "threshold": self.threshold, "found": self.found, "processed": self.processed, "ok": self.ok,
                "failed": self.failed, "resized": self.resized, "labels": dict(self.labels),
                "errors": dict(self.errors), "skipped": self.skipped, "skipped_failed": self.skipped_failed,
                "elapsed_s": round(self.elapsed_s, 3), "crops_per_s": round(self.crops_per_s, 1),
                "interrupted": self.interrupted, "workers": self.workers, "pool": self.pool,
                "batch_size": self.batch_size, "engine_s": round(self.engine_s, 3), "wait_s": round(self.wait_s, 3)}

    def lines(self) -> list[str]:
        out = [f"{self.processed} crops in {self.elapsed_s:.1f} s: {self.crops_per_s:.0f} crops/s "
               f"(provider {self.provider}, batch {self.batch_size}, {self.workers} {self.pool} workers)"]
        if self.elapsed_s > 0 and self.processed:
            f = 100 / self.elapsed_s
            out.append(f"time: engine {self.engine_s:.1f} s ({f * self.engine_s:.0f}%), waiting for decoded crops "
                       f"{self.wait_s:.1f} s ({f * self.wait_s:.0f}%), the rest writing rows and start-up")
        labels = self.labels + self.skipped_labels
        names = [*reversed(self.class_names), *sorted(set(labels) - set(self.class_names))]
        out.append(f"labels at threshold {self.threshold:g}: " + ", ".join(f"{k} {labels.get(k, 0)}" for k in names))
        if self.skipped:
            out.append(f"resumed: {self.skipped} inputs were already in {self.out_path.name} "
                       f"({self.skipped_failed} of them errors), not redone")
        if self.resized:
            out.append(f"resized: {self.resized} crops were not {self.input_size} px and were resized as the model's "
                       "metadata says")
        failed = self.failed + self.skipped_failed
        if failed:
            out.append(f"FAILED: {failed} inputs could not be classified (status 'error' in {self.out_path}):")
            for reason, n in self.errors.most_common(8):
                out.append(f"  {n:6d}  {reason}")
        else:
            out.append("failures: none")
        out.append(f"results: {self.out_path}")
        if self.interrupted:
            out.append(f"INTERRUPTED: {self.processed} rows were written; run again with --resume to finish")
        return out


def _install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT / SIGTERM set ``stop`` (the loop ends after the current batch, its rows written);
    a second Ctrl-C interrupts at once. Returns a function that restores the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore():
        for s, h in old.items():
            signal.signal(s, h)
    return restore


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def run_inference(inputs: Iterable[str | os.PathLike], engine, out_path: str | os.PathLike, fmt: str | None = None,
                  batch_size: int = 64, workers: int = 0, threshold: float | None = None, resume: bool = False,
                  progress: bool | ProgressLine = True, *, pool: str = "thread", overwrite: bool = False,
                  max_pixels: int = MAX_PIXELS, source: CropFiles | None = None) -> Summary:
    """Classify crops and write one row per input to ``out_path``; return a :class:`Summary`.

    ``inputs``: crop paths (e.g. from :func:`iter_inputs`). ``engine``: from
    :func:`~ami.runtime.engine.load_engine`. ``fmt``: csv | jsonl (None: from the extension).
    ``workers``: decode workers (0 = one per CPU, at most 8). ``threshold``: None = the model's.
    ``resume``: skip inputs already in ``out_path`` and append. An existing non-empty ``out_path``
    is refused unless ``resume`` or ``overwrite``. ``pool``: thread | process. ``source``: what the
    inputs are (default :class:`CropFiles`: crop paths).
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if pool not in POOLS:
        raise InputError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    out_path = Path(out_path)
    fmt = format_for(out_path, fmt)
    thr = float(engine.threshold if threshold is None else threshold)
    if not 0.0 <= thr <= 1.0:
        raise InputError(f"threshold must be within [0, 1], got {thr}")
    workers = workers if workers and workers > 0 else default_workers()
    names = tuple(engine.meta.class_names)
    pre: Preprocess = engine.meta.preprocess

    if out_path.is_dir():
        raise InputError(f"output {out_path} is a directory; give a file name")
    exists = out_path.is_file() and out_path.stat().st_size > 0
    if exists and not (resume or overwrite):
        raise InputError(f"{out_path} already exists: pass --resume to continue it or --overwrite to replace it")
    src = source or CropFiles()
    done: dict = {}
    if resume and exists:
        _drop_partial_line(out_path)
        done = read_results(out_path, fmt, src.columns, src.n_key)

    all_inputs = [os.fspath(p) for p in inputs] if source is None else list(inputs)
    summary = Summary(out_path=out_path, fmt=fmt, provider=engine.provider, threshold=thr, found=len(all_inputs),
                      workers=workers, pool=pool, batch_size=batch_size, input_size=pre.input_size,
                      class_names=names)
    todo = []
    for p in all_inputs:
        prev = done.get(src.key(p))
        if prev is None:
            todo.append(p)
        else:
            summary.skipped += 1
            if prev[0] == "error":
                summary.skipped_failed += 1
            elif prev[1]:
                summary.skipped_labels[prev[1]] += 1

    executor: Executor
    if pool == "process":
        import multiprocessing as mp

        # forkserver/spawn: never fork a process whose inference threads are running.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        executor = ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_worker_init)
    else:
        executor = ThreadPoolExecutor(workers, thread_name_prefix="ami-decode")
    writer = ResultWriter(out_path, fmt, append=resume, columns=src.columns)
    bar = progress if isinstance(progress, ProgressLine) else (ProgressLine(len(todo)) if progress and todo else None)
    chunks = (todo[i:i + batch_size] for i in range(0, len(todo), batch_size))
    depth = max(2, 2 * workers)
    inflight: deque = deque()
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Our own pixel limit refuses big images before decoding; Pillow's warning is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            for chunk in chunks:
                inflight.append((chunk, executor.submit(src.prepare, chunk, pre, max_pixels)))
                if len(inflight) >= depth:
                    break
            while inflight and not stop.is_set():
                chunk, fut = inflight.popleft()
                t_wait = time.perf_counter()
                try:
                    pixels, status = fut.result()
                except BrokenExecutor:
                    raise EngineError(f"a decoding worker process died while reading one of the {len(chunk)} crops from "
                                      f"{src.describe(chunk[0])} to {src.describe(chunk[-1])} (a decoder crash; or, when calling run_inference "
                                      "from a script with pool='process', a missing `if __name__ == '__main__':` "
                                      "guard); rows before them are kept") from None
                summary.wait_s += time.perf_counter() - t_wait
                nxt = next(chunks, None)
                if nxt is not None:
                    inflight.append((nxt, executor.submit(src.prepare, nxt, pre, max_pixels)))
                t_engine = time.perf_counter()
                try:
                    probs = engine.predict(pixels) if len(pixels) else np.zeros((0,), np.float32)
                except Exception as e:  # noqa: BLE001 - a failing engine fails every batch: stop, say why
                    raise EngineError(f"inference failed on the batch starting at {src.describe(chunk[0])}: "
                                      f"{type(e).__name__}: {e}") from e
                summary.engine_s += time.perf_counter() - t_engine
                if len(probs) != len(pixels):
                    raise EngineError(f"engine returned {len(probs)} probabilities for {len(pixels)} crops")
                rows, k = [], 0
                for item, (err, resized, extra) in zip(chunk, status):
                    if err is None:
                        p = float(probs[k])
                        k += 1
                        if not np.isfinite(p):
                            err = f"the model returned a non-finite probability ({p})"
                    if err is None:
                        label = names[1] if p >= thr else names[0]
                        rows.append((*src.fields(item), p, label, "ok", None, *extra))
                        summary.ok += 1
                        summary.labels[label] += 1
                        summary.resized += int(resized)
                    else:
                        rows.append((*src.fields(item), None, None, "error", err, *extra))
                        summary.failed += 1
                        summary.errors[err] += 1
                        if len(summary.first_errors) < 20:
                            summary.first_errors.append((src.describe(item), err))
                writer.write(rows)
                summary.processed += len(rows)
                if bar:
                    bar.update(summary.processed, summary.failed)
            if stop.is_set() and (inflight or summary.processed < len(todo)):
                summary.interrupted = True
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.elapsed_s = time.perf_counter() - t0
        restore()
        for _, fut in inflight:
            fut.cancel()
        executor.shutdown(wait=not summary.interrupted, cancel_futures=True)
        writer.close()
        if bar:
            bar.close(summary.processed, summary.failed)
    return summary
