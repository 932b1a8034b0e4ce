"""A sweep's plan: named sets of configurations, their expansion into jobs (one per configuration
and fold), and the manifest that records them (``ROOT/sweep.json``). Part of ``ami-train --sweep``
(:mod:`ami.train.sweep`); no torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ami.runtime import splits
from ami.runtime.atomic import atomic_write_json
from ami.runtime.errors import BadInput
from ami.runtime.rundir import FoldDir, RunDir, RunDirError, check_fields, fold_name

from .registry import METHODS, REGISTRY, get, table3_configs

LAUNCHERS = ("local", "slurm", "ray")
MANIFEST = "sweep.json"
LOGS = "logs"
SLURM_DIR = "slurm"
BUSY_EXIT = 75  # a job already running elsewhere (EX_TEMPFAIL)

# Job options that decide what a job computes: a sweep root refuses to be relaunched with others.
RESULT_KEYS = ("model", "method", "fold", "recipe_overrides", "amp", "weights", "random_init", "tiny",
               "max_train", "max_eval")


class SweepError(BadInput, ValueError):
    """A sweep cannot be expanded, launched or read (message for people)."""


# -- named sets -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NamedSweep:
    name: str
    description: str
    configs: Callable[[], list[tuple[str, str]]]
    folds: str = "all"  # default folds (same syntax as --folds)


SWEEPS: dict[str, NamedSweep] = {}


def register_sweep(s: NamedSweep) -> NamedSweep:
    if s.name in SWEEPS:  # a sweep may share a registry name ('edge'): the named set wins
        raise KeyError(f"sweep name {s.name!r} is taken")
    SWEEPS[s.name] = s
    return s


register_sweep(NamedSweep("table3", "the paper's Table 3: 3 end-to-end baselines, 7 foundation models x "
                                    "(linear, LoRA); 17 configurations x 5 folds", table3_configs))
register_sweep(NamedSweep("edge", "the shipped edge model's 5 folds (--folds all,full adds its all-crops model)",
                          lambda: [("edge", "full")]))


def parse_folds(text: str) -> list[int | None]:
    """``ami.runtime.splits.parse_folds`` (the rules of ``ami-train --folds``), as a SweepError."""
    try:
        return splits.parse_folds(text)
    except ValueError as e:
        raise SweepError(f"--folds: {e}") from None


def expand_configs(name: str, methods: str | None = None, warn=lambda s: None) -> list[tuple[str, str]]:
    """(model, method) pairs of a named sweep, or of a comma list of registry names (``uni``: every
    method it supports, or those of ``methods``) and ``model:method`` pairs."""
    want = None
    if methods:
        want = [m.strip() for m in methods.split(",") if m.strip()]
        bad = [m for m in want if m not in METHODS]
        if bad:
            raise SweepError(f"--methods: unknown method(s) {', '.join(bad)}; known: {', '.join(METHODS)}")
    if name in SWEEPS:
        pairs = SWEEPS[name].configs()
        return [p for p in pairs if want is None or p[1] in want]
    pairs: list[tuple[str, str]] = []
    for item in (s.strip() for s in name.split(",")):
        if not item:
            continue
        model, _, method = item.partition(":")
        if model not in REGISTRY:
            raise SweepError(f"--sweep: {model!r} is neither a named sweep ({', '.join(SWEEPS)}) nor a registry "
                             f"name (`ami-train --list`)")
        supported = REGISTRY[model].methods
        if method:
            if method not in supported:
                raise SweepError(f"--sweep: {model} supports {' or '.join(supported)}, not {method!r}")
            pairs.append((model, method))
            continue
        chosen = [m for m in supported if want is None or m in want]
        if not chosen:
            raise SweepError(f"--sweep: {model} supports {', '.join(supported)}, none of --methods {methods}")
        skipped = [m for m in (want or []) if m not in supported]
        if skipped:
            warn(f"{model}: no {', '.join(skipped)} (it supports {', '.join(supported)})")
        pairs += [(model, m) for m in chosen]
    if not pairs:
        raise SweepError("--sweep: no configuration named")
    return list(dict.fromkeys(pairs))


def default_folds(name: str) -> str:
    return SWEEPS[name].folds if name in SWEEPS else "all"


def job_id(model: str, method: str, fold: int | None) -> str:
    return f"{model}-{method}-{fold_name(fold)}"  # fold None: the all-crops model, named like its folder


@dataclass
class JobOptions:
    """Training options shared by every job of a sweep (the ``ami-train`` flags)."""

    data_root: str = "."
    recipe_overrides: dict = field(default_factory=dict)
    device: str = "auto"
    amp: str = "none"
    weights: str | None = None
    random_init: bool = False
    tiny: bool = False
    max_train: int = 0
    max_eval: int = 0
    threads: int = 0
    cache_dir: str | None = None


def expand(name: str, root: Path, methods: str | None = None, folds: str | None = None,
           options: JobOptions | None = None, warn=lambda s: None) -> list[dict]:
    """The jobs of a sweep, in table order: one dict per (configuration, fold), each holding
    everything :func:`run_job` needs (plain JSON)."""
    options = options or JobOptions()
    pairs = expand_configs(name, methods, warn)
    if options.weights and len({m for m, _ in pairs}) > 1:
        raise SweepError("--weights names one model's weights; a sweep over several models cannot share them")
    for model, method in pairs:  # a bad --set / --config stops here, not in every job
        try:
            get(model).recipe_for(method).override(**options.recipe_overrides)
        except (KeyError, ValueError, TypeError) as e:
            raise SweepError(f"bad recipe for {model} ({method}): {e.args[0] if isinstance(e, KeyError) else e}") from None
    fold_list = parse_folds(folds or default_folds(name))
    if not fold_list:
        raise SweepError("--folds: no fold named")
    root = Path(root).absolute()
    jobs = []
    for model, method in pairs:
        for k in fold_list:
            jid = job_id(model, method, k)
            jobs.append({"id": jid, "model": model, "method": method, "fold": "full" if k is None else k,
                         "root": str(root), "run_dir": str(root / jid), **options.__dict__})
    return jobs


def fold_value(job: dict) -> int | None:
    return None if job["fold"] == "full" else int(job["fold"])


def fold_dir(job: dict) -> FoldDir:
    """The fold folder the job trains, inside its run directory."""
    return RunDir(job["run_dir"]).fold(fold_value(job))


# -- the manifest -------------------------------------------------------------------------------

def load_manifest(root: Path) -> dict | None:
    path = Path(root) / MANIFEST
    manifest = read_record(path, {"jobs": (list,), "sweeps": (list,)})
    for i, job in enumerate((manifest or {}).get("jobs", [])):
        check_fields(path, job, JOB_FIELDS, required=("id", "root", "run_dir", "fold"), where=f"jobs[{i}]")
        if job["fold"] != "full" and not (isinstance(job["fold"], int) and 0 <= job["fold"] < splits.N_FOLDS):
            raise RunDirError(f"{path}: field 'jobs[{i}].fold' should be 'full' or 0-{splits.N_FOLDS - 1}, "
                              f"not {job['fold']!r}")
    if manifest is not None and "jobs" not in manifest:
        raise RunDirError(f"{path}: field 'jobs' is missing")
    return manifest


def write_manifest(root: Path, name: str, jobs: list[dict]) -> None:
    """Record the jobs in ROOT/sweep.json. A job already recorded with other result-deciding options
    is refused (another --out keeps both); new jobs are added to the ones there."""
    root = Path(root)
    old = load_manifest(root) or {}
    known = {j["id"]: j for j in old.get("jobs", [])}
    clashes = []
    for j in jobs:
        o = known.get(j["id"])
        if o is not None:
            diff = [k for k in RESULT_KEYS if json.dumps(o.get(k), sort_keys=True) != json.dumps(j.get(k), sort_keys=True)]
            if diff:
                clashes.append(f"{j['id']} ({', '.join(diff)})")
        known[j["id"]] = j
    if clashes:
        raise SweepError(f"{root} holds job(s) launched with other options: {'; '.join(clashes[:5])}"
                         f"{' ...' if len(clashes) > 5 else ''}. Use another --out, or the same options.")
    from ami.runtime import __version__

    names = sorted(set(old.get("sweeps", [])) | {name})
    write_record(root / MANIFEST, {"sweeps": names, "ami": __version__, "updated": timestamp(),
                                   "jobs": list(known.values())})


# -- the records under ROOT/logs -------------------------------------------------------------------

def write_record(path: Path, obj: dict) -> None:
    """A sweep record (job state, launch, manifest), replaced atomically; its folder made first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# What --status reads from the records: a record of another shape is one line naming the file and the
# field (rundir.check_fields; RunDirError, exit 2), never a traceback.
JOB_FIELDS = {"id": (str,), "root": (str,), "run_dir": (str,), "fold": (int, str), "model": (str,), "method": (str,)}
RECORD_FIELDS = {k: (str,) for k in ("id", "state", "launcher", "host", "started", "ended", "error", "detail",
                                     "slurm_job_id", "submitted", "ray_task")} | {
    "pid": (int,), "attempt": (int,), "returncode": (int, type(None))}


def read_record(path: Path, fields: dict) -> dict | None:
    """A sweep record checked against ``fields``; None when it is missing or not JSON."""
    rec = load_json(path)
    return None if rec is None else check_fields(path, rec, fields)


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record_path(job: dict, kind: str = "") -> Path:
    return Path(job["root"]) / LOGS / f"{job['id']}{'.' + kind if kind else ''}.json"


def log_path(job: dict) -> Path:
    return Path(job["root"]) / LOGS / f"{job['id']}.log"
