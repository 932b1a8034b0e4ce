"""Sinks: where rows go. The locked file writer (:class:`ResultWriter`, which also writes streams)
and the in-memory sink of the Python API (:class:`MemorySink`) share one interface: ``inspect()``
and ``prepare()`` under the lock before the first row, ``write(rows)`` per batch, ``compact()``,
``close()``. The refusals of an output (a directory, a stream to resume, an existing file without
--resume or --overwrite, an input as output) are each written once, here; the command line calls
:func:`check_output` to give them before a model is loaded.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Iterable
from pathlib import Path

try:  # POSIX: one writer per output file, enforced by the kernel
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock (documented)
    fcntl = None  # type: ignore[assignment]

from ..atomic import atomic_write_bytes
from .cells import COLUMNS, LEGACY_COLUMNS
from .formats import get_format, row_dicts, scan_output
from .inputs import InputError
from .record import holder
from .scan import Scan


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

def _stream_resume(out) -> InputError:
    return InputError(f"cannot --resume {out}: it is a stream (stdout, a pipe or a device), not a file")


def _directory(out) -> InputError:
    return InputError(f"output {out} is a directory; give a file name with -o")


def _existing(out) -> InputError:
    return InputError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")


def check_output(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> bool:
    """Refuse an output that cannot be used as asked (the writer's own refusals, given early);
    returns whether it is a stream."""
    stream = is_stream(out)
    if stream:
        if resume:
            raise _stream_resume(out)
        return True
    p = Path(out)
    if p.is_dir():
        raise _directory(p)
    if p.is_file() and p.stat().st_size > 0 and not (resume or overwrite):
        raise _existing(p)
    return False


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
                raise _stream_resume(out)
            if os.fspath(out) == "-":
                self.f = getattr(sys.stdout, "buffer", None) or sys.stdout
                self._own = False
            else:
                self.f = open(out, "wb")  # noqa: SIM115 - held for the run, closed in close()
                self._own = True
            self._fresh = True
            return
        self._own = True
        if self.path.is_dir():
            raise _directory(self.path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = not os.path.lexists(self.path)
        self.fd = self._open_locked()
        try:
            size = os.fstat(self.fd).st_size
            if size > 0 and not (resume or overwrite):
                raise _existing(self.path)
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
                    raise InputError(f"{self.path} is being written by another ami-infer run ({holder(self.path)}); "
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

    def inspect(self, keep: bool = False) -> Scan:
        """Under the lock, read-only: what a resumed file holds (raises when it is not ours or damaged);
        ``keep``: also every row's values."""
        if not self.stream and self._resume and os.fstat(self.fd).st_size > 0:
            sc = scan_output(self.path, self.fmt, self.columns, self.n_key, keep=keep)
            if sc.legacy:
                raise InputError(f"{self.path} was written by an older ami-infer (columns {','.join(LEGACY_COLUMNS)}); "
                                 "finish it with that version, or start again with --overwrite")
            self.scan = sc
        return self.scan

    def prepare(self) -> None:
        """Under the lock: cut a damaged tail (resume) or empty the file (overwrite), then open for appending."""
        if self.stream:
            self._header()
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
        if self.f.tell() == 0:
            self._header()

    def _header(self) -> None:
        head = get_format(self.fmt).header(self.columns)
        if head:
            self.f.write(head)
            self.f.flush()

    def write(self, rows: list[tuple]) -> None:
        if rows:
            text = get_format(self.fmt).encode(rows, self.columns)
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
        head, recs = get_format(self.fmt).records(data, self.columns, self.n_key)
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
            atomic_write_bytes(self.path, b"".join(out))
        return dropped

    def abandon(self) -> None:
        """Close after a refusal: an output this run created and left empty is removed (no half-made
        outputs); anything else is left as it was."""
        if self.fd is not None and getattr(self, "created", False) and os.fstat(self.fd).st_size == 0:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.close()

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

def file_key(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def check_not_an_input(writer, inputs: list[str], protect: Iterable[str | os.PathLike]) -> None:
    """Refuse an output file that is one of the inputs (a crop, a list file), however it is spelled
    or linked: writing to it, with or without --overwrite, would destroy it."""
    me = writer.identity()
    if me is None:
        return
    for p in [*map(os.fspath, protect), *inputs]:
        if file_key(p) == me:
            raise InputError(f"output {writer.path} is one of the inputs ({p}); writing results there would destroy it: "
                             "choose another -o file")


def check_side_outputs(files: Iterable[Path], folders: Iterable[Path], inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse side outputs (files written beside the output, folders whose files are written) that
    would replace an input: a side file that is an input, or an input inside a side folder."""
    keys = {}
    for p in inputs:
        k = file_key(p)
        if k is not None:
            keys[k] = os.fspath(p)
    for f in files:
        k = file_key(f)
        if k in keys:
            raise InputError(f"side output {f} is one of the inputs ({keys[k]}); writing it would destroy it: "
                             "choose another -o file")
    for d in folders:
        real = os.path.realpath(d)
        for p in keys.values():
            if os.path.dirname(os.path.realpath(p)) == real:
                raise InputError(f"the side output folder {d} holds one of the inputs ({p}); files written there "
                                 "could replace it: choose another -o file")



class MemorySink:
    """The Python API's sink: rows kept in memory as the dicts a JSON Lines reader would get (same
    values as the file ami-infer writes), no file, no lock, nothing to resume."""

    stream = True
    path = Path("memory")
    fmt = "jsonl"  # the rows are the dicts of this format's reader (formats.row_dicts)

    def __init__(self, columns: tuple = COLUMNS, n_key: int = 1):
        self.columns, self.n_key = tuple(columns), n_key
        self.scan = Scan()
        self.rows: list[dict] = []

    def identity(self) -> None:
        return None

    def inspect(self, keep: bool = False) -> Scan:
        return self.scan

    def prepare(self) -> None:
        pass

    def write(self, rows: list[tuple]) -> None:
        self.rows.extend(row_dicts(rows, self.columns))

    def compact(self) -> int:
        return 0

    def close(self) -> None:
        pass
