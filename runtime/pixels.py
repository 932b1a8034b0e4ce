"""Crops -> the uint8 pixels a model takes: the one decode path of checks, parity and benchmarks.

:func:`decode_pixels` decodes each file with :func:`~ami.runtime.imageio.decode_rgb` and applies
the model's geometry (:meth:`~ami.runtime.preprocess.Preprocess.to_uint8`), exactly what
``ami-infer`` feeds an engine. Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from .imageio import ImageError, decode_rgb
from .preprocess import Preprocess


def decode_pixels(paths: Sequence[str | os.PathLike], pre: Preprocess,
                  progress: Callable[[Iterable], Iterable] | None = None) -> np.ndarray:
    """uint8 NHWC ``[N, S, S, 3]`` (S = ``pre.input_size``), in the order of ``paths``.

    ``progress`` wraps the iteration over the files (e.g. a tqdm bar). Raises ImageError naming
    the file that cannot be decoded and why."""
    s = pre.input_size
    out = np.empty((len(paths), s, s, 3), np.uint8)
    for i, path in enumerate(progress(paths) if progress is not None else paths):
        try:
            out[i] = pre.to_uint8(decode_rgb(path))
        except ImageError as e:
            raise ImageError(f"{path}: {e}") from None
    return out
