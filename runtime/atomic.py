"""Atomic file writes, the one way ami replaces a file: a reader sees the old file or the new one,
never a part. The temporary file sits beside the target (same file system), is named per process
(two processes replacing the same file never mix their bytes), is fsynced, then renamed over the
target. A failed write leaves the target untouched and removes its temporary file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write_via(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes the new content to the temporary path ``tmp`` (a library's own saver:
    ``torch.save``, ``safetensors.save_file``, ...); then it is fsynced and renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_via(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")
