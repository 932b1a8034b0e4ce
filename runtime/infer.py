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
import re
import signal
import socket
import stat
import sys
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

try:  # POSIX: one writer per output file, enforced by the kernel
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock (documented)
    fcntl = None  # type: ignore[assignment]

from .engines import EngineError
from .hashing import file_sha256
from .imageio import MAX_PIXELS, ImageError, decode_rgb, decode_rgb_fast
from .preprocess import Preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".csv")
LIST_COLUMNS = ("path", "file", "filename", "image", "dataset_uid")  # a CSV list: first of these present
COLUMNS = ("path", "prob_atypical", "label", "status", "error", "note")
LEGACY_COLUMNS = COLUMNS[:5]  # ami-infer before the note column
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


# -- decoding (runs in the worker pool) ----------------------------------------------------------

# A crop this far from the model's square input is still classified, with a note in its row.
MAX_ASPECT = 2.0  # longer side / shorter side
FAR_FACTOR = 4.0  # shorter side below input/4, or longer side above input*4


def crop_note(width: int, height: int, frames: int, pre: Preprocess) -> str | None:
    """Why a crop's label deserves a second look (None: nothing unusual): more than one frame, an
    aspect ratio far from square, a size far from the model's input."""
    notes = []
    if frames > 1:
        notes.append(f"first of {frames} frames used (animated or multi-page file)")
    s, lo, hi = pre.input_size, max(1, min(width, height)), max(width, height)
    how = "stretched" if pre.resize is None else "resized and centre-cropped"
    if hi / lo > MAX_ASPECT:
        notes.append(f"{width}x{height} px, aspect ratio {hi / lo:.3g}:1 far from a square crop: {how} to {s}x{s}")
    elif lo < s / FAR_FACTOR or hi > s * FAR_FACTOR:
        notes.append(f"{width}x{height} px, far from the model's {s} px crops: resized to {s}x{s}")
    return "; ".join(notes) or None


def prepare_batch(paths: list[str], pre: Preprocess, max_pixels: int = MAX_PIXELS
                  ) -> tuple[np.ndarray, list[tuple[str | None, bool, str | None]]]:
    """Decode and geometrically preprocess ``paths``. Returns the uint8 NHWC pixels of the good
    crops (in order) and, per path, (error text or None, whether it was resized, note or None)."""
    status: list[tuple[str | None, bool, str | None]] = []
    try:
        s = pre.input_size
        out = np.empty((len(paths), s, s, 3), np.uint8)
    except (MemoryError, ValueError) as e:  # pragma: no cover - metadata validation bounds the size
        reason = f"cannot allocate the batch for input size {pre.input_size} ({type(e).__name__})"
        return np.zeros((0, 1, 1, 3), np.uint8), [(reason, False, None)] * len(paths)
    n = 0
    for p in paths:
        try:
            fast = decode_rgb_fast(p, max_pixels)  # an 8-bit RGB PNG, by the fastest decoder installed
            if fast is not None and not pre.needs_resize(fast.shape[1], fast.shape[0]):
                out[n] = fast
                n += 1
                status.append((None, False, None))
                continue
            info: dict = {}
            im = (Image.fromarray(np.ascontiguousarray(fast)) if fast is not None
                  else decode_rgb(p, max_pixels=max_pixels, info=info))
            resized = pre.needs_resize(*im.size)
            note = crop_note(*im.size, info.get("frames", 1), pre)
            a = pre.to_uint8(im)
            if a.shape != (s, s, 3):  # pragma: no cover - geometry always lands on input_size
                raise ImageError(f"preprocessing gave shape {a.shape}, expected ({s}, {s}, 3)")
            out[n] = a
            n += 1
            status.append((None, resized, note))
        except ImageError as e:
            status.append((str(e) or "unreadable image", False, None))
        except MemoryError:
            status.append(("out of memory while decoding", False, None))
        except Exception as e:  # one crop must never take a batch down
            status.append((f"unexpected {type(e).__name__}: {e}", False, None))
    return out[:n], status


class CropFiles:
    """The input source of :func:`run_inference`: where items come from and what their rows hold.

    The default source is crop image files: an item is a path, its row key is the path, its pixels
    come from :func:`prepare_batch`, its extra column is the ``note``. Another source (e.g.
    detections on whole-slide images, :mod:`ami.runtime.slides`) gives its own ``columns`` (key
    columns first, then prob_atypical, label, status, error, then its extra columns), ``n_key``,
    ``key`` / ``fields`` (the key as text for resuming; the row's leading values), ``describe`` (an
    item for messages) and ``prepare`` (runs in the worker pool: items -> uint8 NHWC pixels of the
    good ones, and per item (error or None, resized, extra values)). A source must be picklable for
    ``pool="process"``.
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
        return pixels, [(err, resized, (note,)) for err, resized, note in status]


def _watch_parent(pid: int) -> None:
    """Exit the moment process ``pid`` is gone. Linux: wait on a pidfd (no polling); elsewhere,
    check every half second."""
    try:
        fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        import select

        select.select([fd], [], [])
        os._exit(1)
    while True:
        time.sleep(0.5)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # pragma: no cover - pid reused by another user's process
            os._exit(1)


def _worker_init(parent_pid: int | None = None) -> None:
    """Decoding processes: Ctrl-C is the parent's business, and they die with it. A worker whose
    ami-infer is killed (even SIGKILL) exits at once instead of lingering with the caller's pipes;
    with no worker left, the forkserver and the resource tracker see their pipes close and exit too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    if parent_pid:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="ami-parent-watch").start()


# -- output --------------------------------------------------------------------------------------

# Spreadsheets run a cell that starts with one of these as a formula (CSV injection). In CSV such a
# path is written with a leading apostrophe (OWASP's advice); a path that itself starts with an
# apostrophe gets one more, so ami's reader strips exactly one and every name round-trips.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_SURROGATE = re.compile("[\ud800-\udfff]")
RECORD_SUFFIX = ".ami.json"
RECORD_FORMAT = "ami-infer-record/1"


def _fmt_prob(p: float) -> str:
    # The shortest decimal that reads back as the same float32: exact, and no 17-digit noise.
    return np.format_float_positional(np.float32(p), unique=True, trim="0")


def _one_line(text: str) -> str:
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


def _csv_cell(col: str, v) -> str:
    if col == "prob_atypical":
        return "" if v is None else _fmt_prob(v)
    if col in ("error", "note"):
        return _one_line(v) if v else ""
    if isinstance(v, str) and col not in ("label", "status"):
        return csv_cell(v)  # a name or path: the formula guard
    return "" if v is None else str(v)


def _json_value(col: str, v) -> str:
    if col == "prob_atypical":
        return "null" if v is None else _fmt_prob(v)
    if col in ("error", "note"):
        v = _one_line(v) if v else None
    return json_str(v) if v is None or isinstance(v, str) else json.dumps(v)


def format_rows(rows: list[tuple], fmt: str, columns: tuple = COLUMNS) -> str:
    """Rows as CSV or JSON Lines text; each row holds one value per column of ``columns`` (for crops:
    path, prob|None, label|None, status, error|None, note|None; other sources add their own key and
    extra columns)."""
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


def is_stream(out: str | os.PathLike) -> bool:
    """``-`` (standard output) or an existing path that is not a regular file: a pipe, a FIFO,
    /dev/stdout, a terminal. Streams are written once, never locked, synced, resumed or replaced."""
    if os.fspath(out) == "-":
        return True
    if os.path.abspath(out).startswith(("/dev/", "/proc/")):  # /dev/stdout is a file when stdout is redirected
        return True
    try:
        st = os.stat(out)
    except OSError:
        return False
    return not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode)


def _valid_row(vals: list, columns: tuple = COLUMNS) -> bool:
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

    @property
    def tail_bytes(self) -> int:
        return self.size - self.good_end

    @property
    def superseded(self) -> int:
        return self.n_rows - len(self.rows)


def _row_key(vals: list, n_key: int):
    """The resume key of a row: the first column (a crop's path), or the first ``n_key`` as text."""
    if n_key == 1:
        return csv_uncell(vals[0]) if isinstance(vals[0], str) else str(vals[0])
    return tuple(csv_uncell(v) if isinstance(v, str) else str(v) for v in vals[:n_key])


class _ByteLines:
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


def scan_output(path: str | os.PathLike, fmt: str, columns: tuple = COLUMNS, n_key: int = 1) -> Scan:
    """Parse an ami-infer output file (CSV by the csv module, so a quoted path holding a newline is
    one field; JSON Lines line by line). A damaged *tail* (a run killed mid-row) is measured, not
    guessed: it is everything after the last complete, valid row. Damage before a valid row, or a
    file that is not an ami-infer output at all, raises :class:`InputError`."""
    p = Path(path)
    sc = Scan()
    with open(p, "rb") as f:
        data = f.read()
    sc.size = len(data)
    if data:
        (_scan_csv if fmt == "csv" else _scan_jsonl)(p, data, columns, n_key, sc)
    return sc


def _damaged(p: Path, where: str, what: str = "row") -> InputError:
    return InputError(f"{p}: {where} and rows follow it; ami-infer cannot tell which rows to trust: fix or remove "
                      f"that {what}, or start again with --overwrite")


def _scan_csv(p: Path, data: bytes, columns: tuple, n_key: int, sc: Scan) -> None:
    """:func:`scan_output` for CSV: the header, then every row up to the first damaged one, which
    must be the (cut) last one."""
    lines = _ByteLines(data)
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
        if len(row) == len(columns) and complete and _valid_row(row, columns):
            if bad_at:
                raise _damaged(p, f"row {bad_at[0]} is damaged ({bad_at[1]})")
            sc.rows[_row_key(row, n_key)] = (row[columns.index("status")], row[columns.index("label")])
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
        if len(alone) == len(columns) and _valid_row(alone, columns):
            raise InputError(f"{p}: row {bad_at[0] if bad_at else '?'} is damaged and complete rows follow it; "
                             "ami-infer cannot tell which rows to trust: fix or remove that row, or start again "
                             "with --overwrite")


def _scan_jsonl(p: Path, data: bytes, columns: tuple, n_key: int, sc: Scan) -> None:
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
            sc.rows[_row_key([d[c] for c in columns[:n_key]], n_key)] = (d["status"], d.get("label") or "")
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
              and _valid_row([("" if d.get(c) is None and c == "prob_atypical" else d.get(c, "")) for c in columns],
                             columns))
    except (ValueError, TypeError, KeyError):
        return None
    return d if ok else None


def read_results(path: str | os.PathLike, fmt: str, columns: tuple = COLUMNS, n_key: int = 1) -> dict:
    """{key: (status, label)} of the complete rows of an ami-infer output file. The key is the first
    column (a crop's path) or, with ``n_key`` > 1, the tuple of the first ``n_key`` columns as text."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return {}
    return scan_output(p, fmt, tuple(columns), n_key).rows


def record_path(out: str | os.PathLike) -> Path:
    """The output's record: which model and threshold wrote its rows, and which run holds it now."""
    out = Path(out)
    return out.with_name(out.name + RECORD_SUFFIX)


def read_record(out: str | os.PathLike) -> dict | None:
    try:
        d = json.loads(record_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == RECORD_FORMAT else None


def _write_record(out: Path, rec: dict) -> None:
    side = record_path(out)
    tmp = side.with_name(side.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, side)


def model_record(engine, threshold: float) -> dict:
    """What identifies the labels a run writes: the model file's sha256 and the threshold."""
    meta = engine.meta
    path = getattr(engine, "path", None)
    sha = None
    if path is not None and os.path.isfile(path):
        sha = file_sha256(path)
    return {"model": str(meta.model), "precision": str(meta.precision), "file": str(path) if path else None,
            "sha256": sha, "weights_digest": getattr(meta, "weights_digest", "") or None, "threshold": float(threshold)}


def _same_labels(a: dict, b: dict) -> bool:
    def key(r: dict) -> tuple:
        return r.get("sha256") or f"{r.get('model')}/{r.get('precision')}", float(r.get("threshold", -1))

    return key(a) == key(b)


def _describe_model(r: dict) -> str:
    sha = (r.get("sha256") or "?")[:12]
    return f"{Path(r.get('file') or r.get('model') or '?').name} (sha256 {sha}..., threshold {r.get('threshold'):g})"


def _holder(out: Path) -> str:
    rec = read_record(out) or {}
    w = rec.get("writer") or {}
    if w.get("pid"):
        return f"pid {w['pid']} on {w.get('host', '?')}, started {w.get('started', '?')}"
    return "another process"


class ResultWriter:
    """The one writer of an output for the length of a run.

    A regular file is opened without truncation and locked (``flock``, exclusive, non-blocking)
    before anything is read, truncated or written; a second run on the same file, whatever its
    flags, is refused with the holder's pid (from the record file). Rows go out with one write +
    flush per batch; the file is fsynced every few seconds and at close. A stream (``-``, a pipe, a
    FIFO, /dev/stdout) is just written and flushed: nothing to lock, sync or resume."""

    def __init__(self, out: str | os.PathLike, fmt: str, *, resume: bool = False, overwrite: bool = False,
                 fsync_every_s: float = 5.0, columns: tuple = COLUMNS, n_key: int = 1):
        self.fmt, self.stream = fmt, is_stream(out)
        self.columns, self.n_key = tuple(columns), n_key
        self.path = Path(out)
        self.scan = Scan()
        self.fd: int | None = None
        self._fsync_every, self._last_sync = fsync_every_s, time.monotonic()
        self._sync = False
        if self.stream:
            if resume:
                raise InputError(f"cannot --resume {out}: it is a stream (stdout, a pipe or a device), not a file")
            if os.fspath(out) == "-":
                self.f = getattr(sys.stdout, "buffer", None) or sys.stdout
                self._own = False
            else:
                self.f = open(out, "wb")
                self._own = True
            self._fresh = True
            return
        self._own = True
        if self.path.is_dir():
            raise InputError(f"output {self.path} is a directory; give a file name")
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = self._open_locked()
        try:
            size = os.fstat(self.fd).st_size
            if size > 0 and not (resume or overwrite):
                raise InputError(f"{self.path} already exists: pass --resume to continue it or --overwrite to replace it")
            self._sync = True
        except BaseException:
            self._release()
            raise
        self._resume, self._overwrite = resume, overwrite

    def _open_locked(self) -> int:
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise InputError(f"{self.path} is being written by another ami-infer run ({_holder(self.path)}); "
                                     "one run owns an output file at a time: wait for it, or choose another -o file"
                                     ) from None
            st, cur = os.fstat(fd), None
            try:
                cur = os.stat(self.path)
            except FileNotFoundError:
                pass
            if cur is not None and (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
                return fd
            os.close(fd)  # replaced between open and lock: lock the file that is there now
        raise InputError(f"{self.path} keeps being replaced by another process; choose another -o file")

    def identity(self) -> tuple[int, int] | None:
        if self.fd is None:
            return None
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def inspect(self) -> Scan:
        """Under the lock, read-only: what a resumed file holds (raises when it is not ours or damaged)."""
        if not self.stream and self._resume and os.fstat(self.fd).st_size > 0:
            sc = scan_output(self.path, self.fmt, self.columns, self.n_key)
            if sc.legacy:
                raise InputError(f"{self.path} was written by an older ami-infer (columns {','.join(LEGACY_COLUMNS)}); "
                                 "finish it with that version, or start again with --overwrite")
            self.scan = sc
        return self.scan

    def prepare(self) -> None:
        """Under the lock: cut a damaged tail (resume) or empty the file (overwrite), then open for appending."""
        if self.stream:
            if self.fmt == "csv":
                self.f.write((",".join(self.columns) + "\n").encode())
                self.f.flush()
            return
        size = os.fstat(self.fd).st_size
        if self._resume and size > 0:
            sc = self.scan
            if sc.tail_bytes:
                os.ftruncate(self.fd, sc.good_end)  # a row cut by a crash: parsed, not guessed
        elif self._overwrite and size > 0:
            os.ftruncate(self.fd, 0)
        self.f = os.fdopen(self.fd, "r+b", closefd=False)
        self.f.seek(0, os.SEEK_END)
        if self.f.tell() == 0 and self.fmt == "csv":
            self.f.write((",".join(self.columns) + "\n").encode())
            self.f.flush()

    def write(self, rows: list[tuple]) -> None:
        if rows:
            text = format_rows(rows, self.fmt, self.columns)
            self.f.write(text.encode("utf-8", "surrogateescape"))  # one call: a signal cannot split a row
            self.f.flush()
            if self._sync and time.monotonic() - self._last_sync > self._fsync_every:
                os.fsync(self.f.fileno())
                self._last_sync = time.monotonic()

    def compact(self) -> int:
        """Rewrite the file with one row per path (the newest, at the place of the first): after
        --retry-errors, a retried input's new row replaces its old error row. Temporary file, fsync,
        rename. Returns the number of rows dropped."""
        if self.stream or self.fd is None:
            return 0
        self.f.flush()
        with open(self.path, "rb") as f:
            data = f.read()
        recs: list[tuple[str, bytes]] = []
        if self.fmt == "csv":
            nl = data.index(b"\n") + 1
            head, body = data[:nl], data[nl:]
            lines = _ByteLines(body)
            start = 0
            for row in csv.reader(lines, strict=True):
                recs.append((_row_key(row, self.n_key), body[start:lines.pos]))
                start = lines.pos
        else:
            head = b""
            for line in data.splitlines(keepends=True):
                if line.strip():
                    d = json.loads(line.decode("utf-8", "surrogateescape"))
                    recs.append((_row_key([d[c] for c in self.columns[:self.n_key]], self.n_key), line))
        newest: dict[str, bytes] = {}
        for path, raw in recs:
            newest[path] = raw
        out, seen = [head], set()
        for path, _ in recs:
            if path not in seen:
                seen.add(path)
                out.append(newest[path])
        dropped = len(recs) - len(seen)
        if dropped:
            tmp = self.path.with_name(self.path.name + f".{os.getpid()}.compact.tmp")
            with open(tmp, "wb") as f:
                f.write(b"".join(out))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return dropped

    def _release(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)  # closing the last descriptor drops the lock
            except OSError:
                pass
            self.fd = None

    def close(self) -> None:
        f = getattr(self, "f", None)
        if f is not None and not getattr(f, "closed", False):
            try:
                f.flush()
                if self._sync:
                    os.fsync(f.fileno())
            finally:
                if self._own and self.fd is None:
                    f.close()
                elif self.fd is not None:
                    f.close()  # closefd=False: the descriptor (and the lock) goes in _release
        self._release()


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
    noted: int = 0  # ok rows with a note (several frames, odd aspect ratio or size)
    labels: Counter = field(default_factory=Counter)  # this run's ok rows per label
    errors: Counter = field(default_factory=Counter)  # this run's failures per reason
    skipped: int = 0  # already in the output file (resume)
    skipped_failed: int = 0  # of those, rows with status error
    skipped_labels: Counter = field(default_factory=Counter)
    retried: int = 0  # error rows of the output tried again (--retry-errors)
    repaired_bytes: int = 0  # a cut last row removed before resuming
    compacted: int = 0  # superseded rows dropped at the end (--retry-errors)
    mixed: str = ""  # resumed with another model/threshold (--resume-any): the earlier one
    stream: bool = False
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
                "failed": self.failed, "resized": self.resized, "noted": self.noted, "labels": dict(self.labels),
                "errors": dict(self.errors), "skipped": self.skipped, "skipped_failed": self.skipped_failed,
                "retried": self.retried, "mixed": self.mixed,
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
        labels = self.labels if self.mixed else self.labels + self.skipped_labels
        names = [*reversed(self.class_names), *sorted(set(labels) - set(self.class_names))]
        scope = "this run's labels" if self.mixed else "labels"
        out.append(f"{scope} at threshold {self.threshold:g}: " + ", ".join(f"{k} {labels.get(k, 0)}" for k in names))
        name = "the output" if self.stream else self.out_path.name
        if self.mixed:
            out.append(f"MIXED: the {self.skipped} earlier rows of {name} were written by {self.mixed}; they are not "
                       f"counted above (--resume-any; the record {record_path(self.out_path).name} lists both)")
        elif self.skipped:
            out.append(f"resumed: {self.skipped} inputs were already in {name} "
                       f"({self.skipped_failed} of them errors), not redone")
        if self.repaired_bytes:
            out.append(f"repaired: a row cut by an earlier crash ({self.repaired_bytes} bytes) was removed before resuming")
        if self.retried:
            out.append(f"retried: {self.retried} inputs whose earlier row was an error (--retry-errors)"
                       + ("; their old rows were replaced" if self.compacted else ""))
        if self.resized:
            out.append(f"resized: {self.resized} crops were not {self.input_size} px and were resized as the model's "
                       "metadata says")
        if self.noted:
            out.append(f"noted: {self.noted} crops have a note in their row (several frames, or a shape or size far "
                       f"from the model's {self.input_size} px crops)")
        failed = self.failed + self.skipped_failed
        if failed:
            out.append(f"FAILED: {failed} inputs could not be classified (status 'error' in {name}):")
            for reason, n in self.errors.most_common(8):
                out.append(f"  {n:6d}  {reason}")
        else:
            out.append("failures: none")
        out.append("results: standard output" if os.fspath(self.out_path) == "-" else f"results: {self.out_path}")
        if self.interrupted:
            out.append(f"INTERRUPTED: {self.processed} rows were written"
                       + ("" if self.stream else "; run again with --resume to finish"))
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


def _file_key(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _check_not_an_input(writer: ResultWriter, inputs: list[str], protect: Iterable[str | os.PathLike]) -> None:
    """Refuse an output file that is one of the inputs (a crop, a list file), however it is spelled
    or linked: writing to it, with or without --overwrite, would destroy it."""
    me = writer.identity()
    if me is None:
        return
    for p in [*map(os.fspath, protect), *inputs]:
        if _file_key(p) == me:
            raise InputError(f"output {writer.path} is one of the inputs ({p}); writing results there would destroy it: "
                             "choose another -o file")


def check_probabilities(probs: np.ndarray, chunk: list[str]) -> None:
    """A probability outside [0, 1] (or NaN / inf) means the graph is not an ami model, or is
    broken: an engine fault, never a row."""
    p = np.asarray(probs, np.float64)
    bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise EngineError(f"the model returned {int(bad.sum())} probabilities outside [0, 1] in the batch starting at "
                          f"{chunk[0]} (first: {p[i]!r}); its output is not a probability, so no label can be trusted: "
                          "the artefact is broken or is not an ami model")


@dataclass(frozen=True)
class InferenceOptions:
    """The keyword arguments of :func:`run_inference` in one bundle (same names, same defaults)."""

    fmt: str | None = None
    batch_size: int = 64
    workers: int = 0
    threshold: float | None = None
    resume: bool = False
    progress: bool | ProgressLine = True
    pool: str = "thread"
    overwrite: bool = False
    max_pixels: int = MAX_PIXELS
    resume_any: bool = False
    retry_errors: bool = False
    protect: tuple = ()
    source: CropFiles | None = None


def run_inference(inputs: Iterable[str | os.PathLike], engine, out_path: str | os.PathLike, fmt: str | None = None,
                  batch_size: int = 64, workers: int = 0, threshold: float | None = None, resume: bool = False,
                  progress: bool | ProgressLine = True, *, pool: str = "thread", overwrite: bool = False,
                  max_pixels: int = MAX_PIXELS, resume_any: bool = False, retry_errors: bool = False,
                  protect: Iterable[str | os.PathLike] = (), source: CropFiles | None = None) -> Summary:
    """Classify crops and write one row per input to ``out_path``; return a :class:`Summary`.

    ``inputs``: crop paths (e.g. from :func:`iter_inputs`). ``engine``: from
    :func:`~ami.runtime.engines.load_engine`. ``out_path``: a file, or ``"-"`` / a pipe / a FIFO
    (a stream: written once, never resumed). ``fmt``: csv | jsonl (None: from the extension).
    ``workers``: decode workers (0 = one per CPU, at most 8). ``threshold``: None = the model's.
    ``resume``: skip inputs already in ``out_path`` and append; refused when the output's record
    names another model file or threshold, unless ``resume_any``. ``retry_errors``: on resume, try
    the inputs whose row is an error again (their new row replaces the old one at the end).
    An existing non-empty ``out_path`` is refused unless ``resume`` or ``overwrite``; a file held
    by another run, or one of the inputs (or of ``protect``, e.g. list files), is always refused.
    ``pool``: thread | process. ``source``: what the inputs are (default :class:`CropFiles`: crop paths).

    The steps: check the options against the engine and take the output (:class:`_InferenceRun`),
    check and record what a resumed output holds (:meth:`~_InferenceRun.open_output`), pick the
    inputs still to do (:meth:`~_InferenceRun.inputs_to_do`), then decode and classify them in
    pipelined batches (:meth:`~_InferenceRun.run_batches`).
    """
    opts = InferenceOptions(fmt=fmt, batch_size=batch_size, workers=workers, threshold=threshold, resume=resume,
                            progress=progress, pool=pool, overwrite=overwrite, max_pixels=max_pixels,
                            resume_any=resume_any, retry_errors=retry_errors, protect=tuple(protect), source=source)
    run = _InferenceRun(inputs, engine, out_path, opts)
    run.open_output()
    return run.run_batches(run.inputs_to_do())


def _resume_mix(out_path: Path, old: dict | None, run_rec: dict, opts: InferenceOptions) -> str:
    """Whether resuming ``out_path`` adds this run's labels to those of another model or threshold:
    "" when not (or not resuming), else the earlier one in words. Refused (InputError) unless
    ``resume_any``: an output without a record, one already mixed, or one of another model."""
    if not (opts.resume and os.path.getsize(out_path) > 0):
        return ""
    if old is None:
        if not opts.resume_any:
            raise InputError(f"{out_path} has no record of the model and threshold that wrote its rows "
                             f"({record_path(out_path).name} is missing: an older ami-infer, or it was deleted); "
                             "pass --resume-any to continue it anyway, or start again with --overwrite")
        return "an unrecorded model and threshold"
    if old.get("mixed") and not opts.resume_any:
        raise InputError(f"{out_path} already mixes the labels of several models or thresholds (see "
                         f"{record_path(out_path).name}); pass --resume-any to add to it anyway")
    if _same_labels(old.get("labels", {}), run_rec):
        return ""
    if not opts.resume_any:
        raise InputError(f"{out_path} was written by {_describe_model(old['labels'])}, this run uses "
                         f"{_describe_model(run_rec)}: resuming would mix two models' or thresholds' labels "
                         "in one file. Use the same --model and --threshold, another -o file, or "
                         "--resume-any to mix them knowingly (the record then lists both)")
    return _describe_model(old["labels"])


def _new_record(out_path: Path, fmt: str, old: dict | None, run_rec: dict, mixed: str, opts: InferenceOptions) -> dict:
    """The output's record for this run: the labels' model and threshold, whether the file is mixed,
    the writer (pid, host, start) and the history of runs on it with this one appended."""
    history = list((old or {}).get("history", [])) if opts.resume else []
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return {"format": RECORD_FORMAT, "output": out_path.name, "output_format": fmt,
            "labels": run_rec if not mixed else (old or {}).get("labels", run_rec),
            "mixed": bool(mixed) or bool((old or {}).get("mixed")),
            "writer": {"pid": os.getpid(), "host": socket.gethostname(), "started": now},
            "state": "running", "history": history + [{**run_rec, "started": now, "resume": bool(opts.resume),
                                                        "resume_any": bool(opts.resume_any)}]}


def _decode_pool(pool: str, workers: int) -> Executor:
    """The decoding workers: threads, or processes that never fork a process running inference threads."""
    if pool == "process":
        import multiprocessing as mp

        # forkserver/spawn: never fork a process whose inference threads are running.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        return ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_worker_init,
                                   initargs=(os.getpid(),))
    return ThreadPoolExecutor(workers, thread_name_prefix="ami-decode")


class _InferenceRun:
    """One call of :func:`run_inference`: its options checked against the engine, its output held by
    a :class:`ResultWriter`, its :class:`Summary` filled in as the batches go."""

    def __init__(self, inputs: Iterable, engine, out_path: str | os.PathLike, opts: InferenceOptions):
        if opts.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {opts.batch_size}")
        if opts.pool not in POOLS:
            raise InputError(f"pool must be one of {', '.join(POOLS)}, got {opts.pool!r}")
        self.out_path = Path(out_path) if os.fspath(out_path) != "-" else Path("-")
        self.fmt = format_for(self.out_path, opts.fmt)
        self.thr = float(engine.threshold if opts.threshold is None else opts.threshold)
        if not 0.0 <= self.thr <= 1.0:
            raise InputError(f"threshold must be within [0, 1], got {self.thr}")
        self.engine, self.opts = engine, opts
        self.workers = opts.workers if opts.workers and opts.workers > 0 else default_workers()
        self.names = tuple(engine.meta.class_names)
        self.pre: Preprocess = engine.meta.preprocess
        self.src = opts.source or CropFiles()
        self.inputs = [os.fspath(p) for p in inputs] if opts.source is None else list(inputs)
        target = "-" if os.fspath(self.out_path) == "-" else self.out_path
        self.stream = is_stream(target)
        self.writer = ResultWriter(target, self.fmt, resume=opts.resume, overwrite=opts.overwrite,
                                   columns=self.src.columns, n_key=self.src.n_key)
        self.summary = Summary(out_path=self.out_path, fmt=self.fmt, provider=engine.provider, threshold=self.thr,
                               found=len(self.inputs), workers=self.workers, pool=opts.pool,
                               batch_size=opts.batch_size, input_size=self.pre.input_size, class_names=self.names,
                               stream=self.stream)
        self.run_rec = model_record(engine, self.thr)
        self.record: dict | None = None

    def open_output(self) -> None:
        """Under the writer's lock: refuse an output that is one of the inputs, check what a resumed
        file holds and which model wrote it, cut a damaged tail or empty the file, record this run.
        On any failure the output is released."""
        writer, opts = self.writer, self.opts
        try:
            _check_not_an_input(writer, self.inputs if opts.source is None else [], opts.protect)
            writer.inspect()
            if self.stream:
                writer.prepare()
                return
            old = read_record(self.out_path) if opts.resume else None
            self.summary.mixed = _resume_mix(self.out_path, old, self.run_rec, opts)
            writer.prepare()
            self.summary.repaired_bytes = writer.scan.tail_bytes
            self.record = _new_record(self.out_path, self.fmt, old, self.run_rec, self.summary.mixed, opts)
            _write_record(self.out_path, self.record)
        except BaseException:
            writer.close()
            raise

    def inputs_to_do(self) -> list:
        """The inputs not in the output yet, and (``retry_errors``) those whose row is an error;
        the others are counted in the summary as skipped."""
        done, s = self.writer.scan.rows, self.summary
        todo = []
        for p in self.inputs:
            prev = done.get(self.src.key(p))
            if prev is None:
                todo.append(p)
            elif prev[0] == "error" and self.opts.retry_errors:
                todo.append(p)
                s.retried += 1
            else:
                s.skipped += 1
                if prev[0] == "error":
                    s.skipped_failed += 1
                elif prev[1]:
                    s.skipped_labels[prev[1]] += 1
        return todo

    def run_batches(self, todo: list) -> Summary:
        """Decode ``todo`` in the worker pool while the engine classifies the batch before; stop
        after the current batch on SIGINT / SIGTERM; then record the run's end and release the output."""
        opts, summary = self.opts, self.summary
        executor = _decode_pool(opts.pool, self.workers)
        progress = opts.progress
        bar = progress if isinstance(progress, ProgressLine) else (ProgressLine(len(todo)) if progress and todo else None)
        inflight: deque = deque()
        stop = threading.Event()
        restore = _install_stop_handlers(stop)
        t0 = time.perf_counter()
        state = "failed"
        try:
            with warnings.catch_warnings():
                # Our own pixel limit refuses big images before decoding; Pillow's warning is noise here.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                self._pump(todo, executor, inflight, stop, bar)
            state = "interrupted" if summary.interrupted else "complete"
        except KeyboardInterrupt:
            summary.interrupted = True
            state = "interrupted"
        finally:
            summary.elapsed_s = time.perf_counter() - t0
            restore()
            for _, fut in inflight:
                fut.cancel()
            executor.shutdown(wait=not summary.interrupted, cancel_futures=True)
            self._finish(state, bar)
        return summary

    def _pump(self, todo: list, executor: Executor, inflight: deque, stop: threading.Event,
              bar: ProgressLine | None) -> None:
        """Keep up to 2 x workers batches decoding ahead; classify and write each as it comes back."""
        size, summary = self.opts.batch_size, self.summary
        chunks = (todo[i:i + size] for i in range(0, len(todo), size))

        def submit(chunk: list) -> None:
            inflight.append((chunk, executor.submit(self.src.prepare, chunk, self.pre, self.opts.max_pixels)))

        depth = max(2, 2 * self.workers)
        for chunk in chunks:
            submit(chunk)
            if len(inflight) >= depth:
                break
        while inflight and not stop.is_set():
            chunk, fut = inflight.popleft()
            pixels, status = self._decoded(chunk, fut)
            nxt = next(chunks, None)
            if nxt is not None:
                submit(nxt)
            rows = self._rows(chunk, status, self._classify(chunk, pixels))
            self.writer.write(rows)
            summary.processed += len(rows)
            if bar:
                bar.update(summary.processed, summary.failed)
        if stop.is_set() and (inflight or summary.processed < len(todo)):
            summary.interrupted = True

    def _decoded(self, chunk: list, fut):
        """The decoded batch of ``chunk`` (the time waited for it counts as waiting for decode)."""
        t_wait = time.perf_counter()
        try:
            res = fut.result()
        except BrokenExecutor:
            describe = self.src.describe
            raise EngineError(f"a decoding worker process died while reading one of the {len(chunk)} crops from "
                              f"{describe(chunk[0])} to {describe(chunk[-1])} (a decoder crash; or, when calling "
                              "run_inference from a script with pool='process', a missing "
                              "`if __name__ == '__main__':` guard); rows before them are kept") from None
        self.summary.wait_s += time.perf_counter() - t_wait
        return res

    def _classify(self, chunk: list, pixels: np.ndarray) -> np.ndarray:
        """The engine's probabilities for the good crops of a batch; any engine fault stops the run."""
        t_engine = time.perf_counter()
        try:
            probs = self.engine.predict(pixels) if len(pixels) else np.zeros((0,), np.float32)
        except Exception as e:  # a failing engine fails every batch: stop, say why
            raise EngineError(f"inference failed on the batch starting at {self.src.describe(chunk[0])}: "
                              f"{type(e).__name__}: {e}") from e
        self.summary.engine_s += time.perf_counter() - t_engine
        if len(probs) != len(pixels):
            raise EngineError(f"engine returned {len(probs)} probabilities for {len(pixels)} crops")
        check_probabilities(probs, [self.src.describe(c) for c in chunk[:1]])
        return probs

    def _rows(self, chunk: list, status: list, probs: np.ndarray) -> list[tuple]:
        """One row per item of a batch (ok with its label, or error with the reason), counted in the summary."""
        src, summary, names = self.src, self.summary, self.names
        rows, k = [], 0
        for item, (err, resized, extra) in zip(chunk, status):
            if err is None:
                p = float(probs[k])
                k += 1
                label = names[1] if p >= self.thr else names[0]
                rows.append((*src.fields(item), p, label, "ok", None, *extra))
                summary.ok += 1
                summary.labels[label] += 1
                summary.resized += int(resized)
                summary.noted += int("note" in src.columns and bool(extra) and extra[-1] is not None)
            else:
                rows.append((*src.fields(item), None, None, "error", err, *extra))
                summary.failed += 1
                summary.errors[err] += 1
                if len(summary.first_errors) < 20:
                    summary.first_errors.append((src.describe(item), err))
        return rows

    def _finish(self, state: str, bar: ProgressLine | None) -> None:
        """Record how the run ended, drop superseded rows of a complete run, release the output."""
        summary, writer, record = self.summary, self.writer, self.record
        try:
            if record is not None:
                record["state"] = state
                record["history"][-1].update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), rows=summary.processed,
                                             state=state)
                _write_record(self.out_path, record)  # before any rename below: the lock still covers it
            if state == "complete" and (summary.retried or writer.scan.superseded):
                summary.compacted = writer.compact()
        finally:
            writer.close()
            if bar:
                bar.close(summary.processed, summary.failed)
