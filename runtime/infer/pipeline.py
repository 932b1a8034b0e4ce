"""The pipeline behind ``ami-infer``, ``--slides`` and the Python API: inputs -> decoding workers ->
engine -> rows -> one sink (a locked file, a stream, or memory) and any tap (e.g. the per-slide
summary), with the run record and the report.

* Every input gets exactly one row: its key, prob_atypical, label, status (ok | error), error and the
  source's extra columns. Rows are written in input order as each batch completes and flushed at
  once, so an interrupted run (Ctrl-C, SIGTERM, even SIGKILL up to the last batch) keeps everything
  done so far; ``resume=True`` skips the inputs already in the output file and appends the rest.
* A bad input never stops a batch (an error row). An engine failure does stop the run (it would
  fail every batch): :class:`InferenceFault`, exit 4; rows written until then stay.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import BrokenExecutor, Executor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..engines import EngineFault
from ..imageio import MAX_PIXELS
from ..preprocess import Preprocess
from .decode import POOLS, CropFiles, decode_pool, default_workers
from .formats import format_for
from .inputs import InputError
from .record import model_record, new_record, read_record, resume_mix, write_record
from .report import ProgressLine, Summary
from .writer import ResultWriter, check_not_an_input, check_side_outputs

# The engine failed or returned nonsense while running: the run stops (exit 4, a fault; an
# EngineError raised while loading means the machine cannot run the model, exit 3). One class,
# the engines' own, under the name the inference pipeline has always exported.
InferenceFault = EngineFault


def install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
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


def check_probabilities(probs: np.ndarray, chunk: list[str]) -> None:
    """A probability outside [0, 1] (or NaN / inf) means the graph is not an ami model, or is
    broken: an engine fault, never a row."""
    p = np.asarray(probs, np.float64)
    bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InferenceFault(f"the model returned {int(bad.sum())} probabilities outside [0, 1] in the batch starting at "
                          f"{chunk[0]} (first: {p[i]!r}); its output is not a probability, so no label can be trusted: "
                          "the artefact is broken or is not an ami model")


@dataclass(frozen=True)
class InferenceOptions:
    """Everything a run takes besides its inputs, engine and output: one object per entry point (the
    command line builds it once; :func:`run_inference` takes its fields as keywords, same names)."""

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
    sink: object | None = None  # instead of a file: e.g. writer.MemorySink (the Python API)
    tap: RowTap | None = None  # sees every row as it streams (e.g. the per-slide summary)

    def checked(self) -> InferenceOptions:
        """These options, or the one refusal that applies (raised here and nowhere else)."""
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        if self.pool not in POOLS:
            raise InputError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite exclude each other")
        if self.retry_errors and not self.resume:
            raise InputError("--retry-errors goes with --resume (it retries the error rows of an existing output file)")
        return self


class RowTap:
    """Sees the rows of a run as they stream, for outputs built beside the rows (e.g. the per-slide
    summary and GeoJSON of ``--slides``), so nothing is read back from the output. ``keep_resumed``:
    whether ``resumed`` gets the rows already in a resumed output; ``finish`` runs while the output
    is still locked, before a complete run's compaction, unless the run failed."""

    keep_resumed = False

    def resumed(self, values: dict) -> None:
        """{key: row values} of the rows already in the output (resume)."""

    def rows(self, rows: list[tuple]) -> None:
        """The rows of one batch, as written."""

    def finish(self, state: str, stream: bool) -> None:
        """The run ended (``state``: complete | interrupted); the output is still locked."""

    def side_outputs(self) -> tuple[list[Path], list[Path]]:
        """(files, folders) this tap writes beside the output: none may replace an input."""
        return [], []


def run_inference(inputs: Iterable[str | os.PathLike], engine, out_path: str | os.PathLike | None,
                  fmt: str | None = None, batch_size: int = 64, workers: int = 0, threshold: float | None = None,
                  resume: bool = False, progress: bool | ProgressLine = True, **options) -> Summary:
    """Classify crops and write one row per input to ``out_path``; return a :class:`Summary`.

    ``inputs``: crop paths (e.g. from :func:`iter_inputs`). ``engine``: a loaded engine.
    ``out_path``: a file, or ``"-"`` / a pipe / a FIFO (a stream: written once, never resumed), or
    None with ``sink``. ``fmt``: a name of :data:`~.formats.FORMATS` (None: from the extension).
    ``workers``: decode workers (0 = one per CPU, at most 8). ``threshold``: None = the model's.
    ``resume``: skip inputs already in ``out_path`` and append; refused when the output's record
    names another model file, threshold, engine or precision, unless ``resume_any``. ``retry_errors``:
    on resume, try the inputs whose row is an error again (their new row replaces the old one at the
    end). An existing non-empty ``out_path`` is refused unless ``resume`` or ``overwrite``; a file held
    by another run, or one of the inputs (or of ``protect``, e.g. list files), is always refused.
    ``options``: the other fields of :class:`InferenceOptions` (pool, overwrite, source, sink, tap, ...).
    """
    opts = InferenceOptions(fmt=fmt, batch_size=batch_size, workers=workers, threshold=threshold, resume=resume,
                            progress=progress, **{**options, "protect": tuple(options.get("protect", ()))})
    return run(inputs, engine, out_path, opts)


def run(inputs: Iterable, engine, out_path: str | os.PathLike | None, opts: InferenceOptions) -> Summary:
    """The pipeline: check the options against the engine and take the output (:class:`_InferenceRun`),
    check and record what a resumed output holds (:meth:`~_InferenceRun.open_output`), pick the
    inputs still to do (:meth:`~_InferenceRun.inputs_to_do`), then decode and classify them in
    pipelined batches (:meth:`~_InferenceRun.run_batches`)."""
    opts = opts.checked()
    if opts.source is None:
        opts = replace(opts, source=CropFiles())
    try:
        run_ = _InferenceRun(inputs, engine, out_path, opts)
        run_.open_output()
        return run_.run_batches(run_.inputs_to_do())
    finally:
        opts.source.release()


class _InferenceRun:
    """One call of :func:`run_inference`: its options checked against the engine, its output held by
    a :class:`ResultWriter`, its :class:`Summary` filled in as the batches go."""

    def __init__(self, inputs: Iterable, engine, out_path: str | os.PathLike | None, opts: InferenceOptions):
        self.engine, self.opts = engine, opts
        self.thr = float(engine.threshold if opts.threshold is None else opts.threshold)
        if not 0.0 <= self.thr <= 1.0:
            raise InputError(f"threshold must be within [0, 1], got {self.thr}")
        self.workers = opts.workers if opts.workers and opts.workers > 0 else default_workers()
        self.names = tuple(engine.meta.class_names)
        self.pre: Preprocess = engine.meta.preprocess
        self.src = opts.source or CropFiles()
        self.inputs = [os.fspath(p) for p in inputs] if type(self.src) is CropFiles else list(inputs)
        self.writer = self._sink(out_path)
        self.stream = self.writer.stream
        self.summary = Summary(out_path=self.out_path, fmt=self.fmt, provider=engine.provider, threshold=self.thr,
                               found=len(self.inputs), workers=self.workers, pool=opts.pool,
                               batch_size=opts.batch_size, input_size=self.pre.input_size, class_names=self.names,
                               stream=self.stream)
        self.run_rec = model_record(engine, self.thr)
        self.record: dict | None = None

    def _sink(self, out_path):
        """The options' sink, else the output file or stream, taken (locked) now."""
        opts = self.opts
        if opts.sink is not None:
            self.out_path, self.fmt = Path(opts.sink.path), opts.sink.fmt
            return opts.sink
        self.out_path = Path(out_path) if os.fspath(out_path) != "-" else Path("-")
        self.fmt = format_for(self.out_path, opts.fmt)
        target = "-" if os.fspath(self.out_path) == "-" else self.out_path
        return ResultWriter(target, self.fmt, resume=opts.resume, overwrite=opts.overwrite,
                            columns=self.src.columns, n_key=self.src.n_key)

    def open_output(self) -> None:
        """Under the writer's lock: refuse an output that is one of the inputs, check what a resumed
        file holds and which model wrote it, cut a damaged tail or empty the file, record this run.
        On any failure the output is released."""
        writer, opts, tap = self.writer, self.opts, self.opts.tap
        try:
            files = self.src.files(self.inputs)
            check_not_an_input(writer, files, opts.protect)
            if tap is not None and not self.stream:
                check_side_outputs(*tap.side_outputs(), [*files, *opts.protect])
            scan = writer.inspect(keep=bool(tap and tap.keep_resumed))
            if tap is not None and scan.values:
                tap.resumed(scan.values)
            if self.stream:
                writer.prepare()
                return
            old = read_record(self.out_path) if opts.resume else None
            self.summary.mixed = resume_mix(self.out_path, old, self.run_rec, opts.resume, opts.resume_any)
            writer.prepare()
            self.summary.repaired_bytes = writer.scan.tail_bytes
            self.record = new_record(self.out_path, self.fmt, old, self.run_rec, self.summary.mixed, opts.resume,
                                     opts.resume_any)
            write_record(self.out_path, self.record)
        except BaseException:
            getattr(writer, "abandon", writer.close)()
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
        executor = decode_pool(opts.pool, self.workers)
        progress = opts.progress
        bar = progress if isinstance(progress, ProgressLine) else (ProgressLine(len(todo)) if progress and todo else None)
        inflight: deque = deque()
        stop = threading.Event()
        restore = install_stop_handlers(stop)
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
            if self.opts.tap is not None:
                self.opts.tap.rows(rows)
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
            raise InferenceFault(f"a decoding worker process died while reading one of the {len(chunk)} crops from "
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
            raise InferenceFault(f"inference failed on the batch starting at {self.src.describe(chunk[0])}: "
                              f"{type(e).__name__}: {e}") from e
        self.summary.engine_s += time.perf_counter() - t_engine
        if len(probs) != len(pixels):
            raise InferenceFault(f"engine returned {len(probs)} probabilities for {len(pixels)} crops")
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
        """Record how the run ended, let the tap write its side outputs, drop superseded rows of a
        complete run, release the output."""
        summary, writer, record = self.summary, self.writer, self.record
        try:
            if record is not None:
                record["state"] = state
                record["history"][-1].update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), rows=summary.processed,
                                             state=state)
                write_record(self.out_path, record)  # before any rename below: the lock still covers it
            if self.opts.tap is not None and state != "failed":
                self.opts.tap.finish(state, self.stream)  # side outputs: still under the lock
            if state == "complete" and (summary.retried or writer.scan.superseded):
                summary.compacted = writer.compact()
        finally:
            writer.close()
            if bar:
                bar.close(summary.processed, summary.failed)
