"""Decoding: the worker pool that turns inputs into the model's uint8 pixels.

A worker pool (threads by default: Pillow releases the GIL while it decodes and resizes; processes
on request) decodes each batch and applies the geometric part of the model's
:class:`~ami.runtime.preprocess.Preprocess` into one uint8 NHWC array, while the calling thread runs
the engine on the previous batch. Normalisation happens inside the exported graph. A bad crop never
stops a batch: it becomes an error row with the reason from :func:`~ami.runtime.imageio.decode_rgb`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from PIL import Image

from ..imageio import MAX_PIXELS, ImageError, decode_rgb, decode_rgb_fast
from ..preprocess import Preprocess
from .cells import COLUMNS

POOLS = ("thread", "process")

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
    ``pool="process"``. ``release()`` runs once in the calling process when the run ends (a source
    that holds resources, such as open slides, frees them there).
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

    def files(self, items: list) -> list[str]:
        """The input files among ``items``: an output may never be one of them."""
        return [os.fspath(p) for p in items]

    def release(self) -> None:
        """Free what this source holds (nothing, for crop files)."""


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


def worker_init(parent_pid: int | None = None) -> None:
    """Decoding processes: Ctrl-C is the parent's business, and they die with it. A worker whose
    ami-infer is killed (even SIGKILL) exits at once instead of lingering with the caller's pipes;
    with no worker left, the forkserver and the resource tracker see their pipes close and exit too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    if parent_pid:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="ami-parent-watch").start()



def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def decode_pool(pool: str, workers: int) -> Executor:
    """The decoding workers: threads, or processes that never fork a process running inference threads."""
    if pool == "process":
        import multiprocessing as mp

        # forkserver/spawn: never fork a process whose inference threads are running.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        return ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=worker_init,
                                   initargs=(os.getpid(),))
    return ThreadPoolExecutor(workers, thread_name_prefix="ami-decode")
