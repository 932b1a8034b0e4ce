"""Compiled-model caches that are verified before an engine uses them.

An engine's compiled form (OpenVINO's compiled-model blob, ONNX Runtime's TensorRT EP engines) is
what actually runs, so the weights digest of the ONNX file does not protect it: a blob edited on
disk would run with exit 0. ami therefore keeps each cache in its own *entry*: a folder keyed by
everything the compiled form depends on (the artefact's weights digest, the engine and its
version, the precision, the device, ...), sealed after compiling by a manifest with the SHA-256 of
every file in it::

    entry = CacheEntry.open(root, engine="openvino", weights="sha256:...", version="2026.4.1",
                            precision="fp32", device="CPU")
    ...compile with the engine's cache pointed at entry.dir...
    entry.seal()

:meth:`CacheEntry.open` verifies an existing entry against its manifest; a file changed, missing or
added, or an entry that was never sealed, deletes the entry (the engine then compiles again) and
says so in one log line (``entry.note`` keeps it for the caller).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from ..atomic import atomic_write_json
from ..hashing import file_sha256

MANIFEST = "ami-cache-manifest.json"
FORMAT = "ami-engine-cache/1"
log = logging.getLogger("ami.runtime.engines")


def cache_key(**facts: object) -> str:
    """A short stable key of the facts a compiled model depends on."""
    text = json.dumps({k: str(v) for k, v in facts.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _files(d: Path) -> dict[str, Path]:
    return {str(p.relative_to(d)): p for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST
            and not p.name.startswith(MANIFEST + ".")}


class CacheEntry:
    """One verified cache folder (see the module docstring)."""

    def __init__(self, directory: Path, facts: dict, note: str = ""):
        self.dir = directory
        self.facts = facts
        self.note = note  # why an existing entry was discarded ("" when it was fine or new)

    @classmethod
    def open(cls, root: str | os.PathLike, **facts: object) -> CacheEntry:
        """The entry for ``facts`` under ``root``, verified (or emptied: see the module docstring).
        Raises OSError when the folder cannot be made (the caller then runs without a cache)."""
        facts = {k: str(v) for k, v in facts.items()}
        d = Path(root) / cache_key(**facts)
        entry = cls(d, facts)
        why = entry.problem()
        if why:
            shutil.rmtree(d, ignore_errors=True)
            entry.note = f"engine cache {d} {why}: deleted it, compiling again"
            log.warning(entry.note)
        d.mkdir(parents=True, exist_ok=True)
        return entry

    def problem(self) -> str:
        """'' when the entry is absent, empty or matches its manifest; else what is wrong with it."""
        if not self.dir.is_dir():
            return ""
        files = _files(self.dir)
        mpath = self.dir / MANIFEST
        if not mpath.is_file():
            return "was never sealed (an interrupted compile?)" if files else ""
        try:
            man = json.loads(mpath.read_text(encoding="utf-8"))
            want = dict(man["files"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"has an unreadable manifest ({type(e).__name__})"
        if man.get("format") != FORMAT or man.get("facts") != self.facts:
            return "has a manifest for something else"
        for name, digest in want.items():
            p = files.get(name)
            if p is None:
                return f"lacks {name}"
            if file_sha256(p) != digest:
                return f"holds {name}, changed since it was written (digest mismatch)"
        extra = sorted(set(files) - set(want))
        if extra:
            return f"holds {extra[0]}, which it did not write"
        return ""

    def seal(self) -> None:
        """Write the manifest: the digest of every file now in the entry (atomically)."""
        if not self.dir.is_dir():
            return
        files = {name: file_sha256(p) for name, p in _files(self.dir).items()}
        atomic_write_json(self.dir / MANIFEST, {"format": FORMAT, "facts": self.facts, "files": files})

    def sealed_files(self) -> list[str]:
        try:
            return sorted(json.loads((self.dir / MANIFEST).read_text(encoding="utf-8"))["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return []


def clear(root: str | os.PathLike) -> int:
    """Delete every cache entry under ``root`` (folders holding a manifest, or unsealed ones); how many."""
    d = Path(root)
    n = 0
    for sub in sorted(d.iterdir()) if d.is_dir() else ():
        if sub.is_dir():
            shutil.rmtree(sub, ignore_errors=True)
            n += 1
    return n
