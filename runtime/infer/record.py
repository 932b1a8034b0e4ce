"""The run record ``OUT.ami.json``: which model, engine, precision and threshold wrote an output's
rows, which run holds it now, and the history of runs on it.

``--resume`` checks it (:func:`resume_mix`): rows of another model file, threshold or run precision
are not silently added to a file (``--resume-any`` mixes them knowingly, and the record then says
``mixed: true``). The engine is recorded too.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..hashing import file_sha256
from .inputs import InputError

RECORD_SUFFIX = ".ami.json"
RECORD_FORMAT = "ami-infer-record/1"


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


def write_record(out: Path, rec: dict) -> None:
    """Replace the record atomically (fsync, per-process temporary file)."""
    atomic_write_bytes(record_path(out), (json.dumps(rec, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def model_record(engine, threshold: float) -> dict:
    """What identifies the labels a run writes: the model file's sha256 and the threshold."""
    meta = engine.meta
    path = getattr(engine, "path", None)
    sha = None
    if path is not None and os.path.isfile(path):
        sha = file_sha256(path)
    return {"model": str(meta.model), "precision": str(meta.precision), "file": str(path) if path else None,
            "sha256": sha, "weights_digest": getattr(meta, "weights_digest", "") or None, "threshold": float(threshold),
            "engine": getattr(engine, "engine", "") or None, "run_precision": str(getattr(engine, "precision", "") or "")
            or None}


def same_labels(a: dict, b: dict) -> bool:
    """Whether two runs' labels come from the same model file, threshold and run precision (bf16 is not
    fp32; a run precision an older record lacks is not compared). The engine is recorded, not compared:
    engines running the same model at the same precision agree within the parity tolerances."""
    def key(r: dict) -> tuple:
        return r.get("sha256") or f"{r.get('model')}/{r.get('precision')}", float(r.get("threshold", -1))

    if key(a) != key(b):
        return False
    return all(a.get(k) == b.get(k) for k in ("run_precision",) if a.get(k) and b.get(k))


def describe_model(r: dict) -> str:
    sha = (r.get("sha256") or "?")[:12]
    run = ", ".join(str(r[k]) for k in ("engine", "run_precision") if r.get(k))
    return (f"{Path(r.get('file') or r.get('model') or '?').name} (sha256 {sha}..., threshold {r.get('threshold'):g}"
            + (f", {run}" if run else "") + ")")


def holder(out: Path) -> str:
    rec = read_record(out) or {}
    w = rec.get("writer") or {}
    if w.get("pid"):
        return f"pid {w['pid']} on {w.get('host', '?')}, started {w.get('started', '?')}"
    return "another process"

def resume_mix(out_path: Path, old: dict | None, run_rec: dict, resume: bool, resume_any: bool) -> str:
    """Whether resuming ``out_path`` adds this run's labels to those of another model or threshold:
    "" when not (or not resuming), else the earlier one in words. Refused (InputError) unless
    ``resume_any``: an output without a record, one already mixed, or one of another model."""
    if not (resume and os.path.getsize(out_path) > 0):
        return ""
    if old is None:
        if not resume_any:
            raise InputError(f"{out_path} has no record of the model and threshold that wrote its rows "
                             f"({record_path(out_path).name} is missing: an older ami-infer, or it was deleted); "
                             "pass --resume-any to continue it anyway, or start again with --overwrite")
        return "an unrecorded model and threshold"
    if old.get("mixed") and not resume_any:
        raise InputError(f"{out_path} already mixes the labels of several models or thresholds (see "
                         f"{record_path(out_path).name}); pass --resume-any to add to it anyway")
    if same_labels(old.get("labels", {}), run_rec):
        return ""
    if not resume_any:
        raise InputError(f"{out_path} was written by {describe_model(old['labels'])}, this run uses "
                         f"{describe_model(run_rec)}: resuming would mix two models' or thresholds' labels "
                         "in one file. Use the same --model, --threshold and --precision, another -o file, or "
                         "--resume-any to mix them knowingly (the record then lists both)")
    return describe_model(old["labels"])


def new_record(out_path: Path, fmt: str, old: dict | None, run_rec: dict, mixed: str, resume: bool,
               resume_any: bool) -> dict:
    """The output's record for this run: the labels' model and threshold, whether the file is mixed,
    the writer (pid, host, start) and the history of runs on it with this one appended."""
    history = list((old or {}).get("history", [])) if resume else []
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return {"format": RECORD_FORMAT, "output": out_path.name, "output_format": fmt,
            "labels": run_rec if not mixed else (old or {}).get("labels", run_rec),
            "mixed": bool(mixed) or bool((old or {}).get("mixed")),
            "writer": {"pid": os.getpid(), "host": socket.gethostname(), "started": now},
            "state": "running", "history": history + [{**run_rec, "started": now, "resume": bool(resume),
                                                        "resume_any": bool(resume_any)}]}

