"""The report of a run: the progress line while it goes, the :class:`Summary` at its end (counts,
labels, failures, timing) and the exit code it means."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EXIT_CHECK_FAILED, EXIT_INTERRUPTED, EXIT_OK
from .record import record_path


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
            return EXIT_INTERRUPTED
        return EXIT_CHECK_FAILED if self.any_failed else EXIT_OK

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

