"""ami-train --sweep: the benchmark as a set of independent, resumable jobs on a launcher.

A *sweep* is a named set of configurations (``table3``: the paper's 17 × 5 folds = 85 jobs;
``edge``: the shipped edge model's 5 folds) or any list of registry names
× methods × folds. It expands into one job per (configuration, fold); each job is one call of
the ordinary training function, :func:`ami.train.fit.run`, on its own run directory::

    ROOT/sweep.json                      the jobs and the options they were launched with (launcher)
    ROOT/<model>-<method>-fold<k>/       one run directory per job (config.json, split.json, fold<k>/)
    ROOT/<model>-<method>-all/           the all-crops model of a configuration (--folds full)
    ROOT/logs/<job>.json                 the job's own record: running / done / failed / interrupted
    ROOT/logs/<job>.launch.json          the launcher's record: how and where it was started
    ROOT/logs/<job>.log                  output of the job (local launcher)
    ROOT/slurm/<slurm id>/               submitit's files of a SLURM job (script, pickles, output)

Every job is idempotent: a finished fold (``metrics.json``) is skipped, an unfinished one
continues after its last completed epoch, so a job that is killed, pre-empted or hits its time
limit is simply run again. Launchers come from the ecosystem, not from this file:

* ``local``: :mod:`concurrent.futures` over the visible GPUs (one job per GPU) or CPU slots, at
  most ``--jobs N`` at once; each job is a child process.
* ``slurm``: `submitit` job arrays, one array per set of resources; a job that reaches its time
  limit (or is pre-empted) is checkpointed by submitit and requeued, and resumes.
* ``ray``: one Ray task per job with ``num_gpus`` GPUs, on the cluster ``ray.init`` finds.

``ami-bench table ROOT`` renders Table 3 from the run directories: the folds of one
configuration, trained by different jobs, merge into one row.

This module imports no torch at import time (``--dry-run`` and ``--status`` are instant); a job
imports the training code when it starts.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ami.runtime import DIST_NAME, splits
from ami.runtime.rundir import FoldDir, RunDir, atomic_write_json, fold_name

from .registry import METHODS, REGISTRY, get, label, table3_configs

LAUNCHERS = ("local", "slurm", "ray")
MANIFEST = "sweep.json"
LOGS = "logs"
SLURM_DIR = "slurm"
BUSY_EXIT = 75  # a job already running elsewhere (EX_TEMPFAIL)

# Job options that decide what a job computes: a sweep root refuses to be relaunched with others.
RESULT_KEYS = ("model", "method", "fold", "recipe_overrides", "amp", "weights", "random_init", "tiny",
               "max_train", "max_eval")


class SweepError(ValueError):
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


# -- the job ----------------------------------------------------------------------------------------

def _atomic_json(path: Path, obj: dict) -> None:
    """A sweep record (job state, launch, manifest), replaced atomically; its folder made first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record_path(job: dict, kind: str = "") -> Path:
    return Path(job["root"]) / LOGS / f"{job['id']}{'.' + kind if kind else ''}.json"


def log_path(job: dict) -> Path:
    return Path(job["root"]) / LOGS / f"{job['id']}.log"


def _scheduler_ids() -> dict:
    out = {}
    if os.environ.get("SLURM_JOB_ID"):
        arr, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        out["slurm_job_id"] = f"{arr}_{task}" if arr and task else os.environ["SLURM_JOB_ID"]
    if os.environ.get("SUBMITIT_EXECUTOR"):
        out["submitit_executor"] = os.environ["SUBMITIT_EXECUTOR"]
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        out["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return out


class JobBusy(RuntimeError):
    """The job holds its lock in another process (it is running elsewhere)."""


class _Lock:
    """An exclusive lock on ``ROOT/logs/<job>.lock`` for the life of a job: one trainer per run
    directory, even when a sweep is launched twice (POSIX flock; a no-op where it is missing)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise JobBusy(f"{self.path.stem} is already running (its lock {self.path} is held)") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
        return False


def run_job(job: dict, launcher: str = "direct", log=None) -> dict:
    """Run one job: train its fold through :func:`ami.train.fit.run` (resuming whatever its run
    directory holds) and keep its record in ``ROOT/logs/<job>.json``. Returns a short summary."""
    log = log or (lambda s: print(s, flush=True))
    rec_path = record_path(job)
    with _Lock(rec_path.with_suffix(".lock")):
        attempt = (_read_json(rec_path) or {}).get("attempt", 0) + 1
        rec = {"id": job["id"], "state": "running", "launcher": launcher, "host": socket.gethostname(),
               "pid": os.getpid(), "attempt": attempt, "started": _now(), "started_ts": time.time(),
               **_scheduler_ids()}
        _atomic_json(rec_path, rec)
        log(f"[sweep] job {job['id']} (attempt {attempt}) on {rec['host']}, run directory {job['run_dir']}")
        try:
            from .fit import RunSpec, run  # torch is imported here
            from .models import WeightsUnavailable

            spec = RunSpec(model=job["model"], method=job["method"], run_dir=Path(job["run_dir"]),
                           data_root=Path(job["data_root"]), recipe_overrides=dict(job["recipe_overrides"]),
                           device=job["device"], amp=job["amp"], weights=job["weights"],
                           random_init=job["random_init"], tiny=job["tiny"], max_train=job["max_train"],
                           max_eval=job["max_eval"], threads=job["threads"],
                           cache_dir=Path(job["cache_dir"]) if job.get("cache_dir") else None)
            try:
                (metrics,) = run(spec, [fold_value(job)], log=log)
            except WeightsUnavailable as e:
                raise RuntimeError(str(e)) from None
        except SystemExit as e:
            if isinstance(e.code, str):  # the training code refusing (e.g. a run dir of another configuration)
                _atomic_json(rec_path, {**rec, "state": "failed", "ended": _now(), "error": e.code})
            else:  # submitit's requeue after a time-limit / pre-emption signal, or an exit request
                _atomic_json(rec_path, {**rec, "state": "interrupted", "ended": _now(),
                                        "detail": "stopped by a signal; resumes when run again"})
            raise
        except KeyboardInterrupt:
            _atomic_json(rec_path, {**rec, "state": "interrupted", "ended": _now(), "detail": "interrupted"})
            raise
        except BaseException as e:
            _atomic_json(rec_path, {**rec, "state": "failed", "ended": _now(),
                                    "error": f"{type(e).__name__}: {e}".strip()})
            raise
        summary = {"id": job["id"], "validation_ba": (metrics.get("validation") or {}).get("balanced_accuracy"),
                   "train_seconds": metrics.get("train_seconds")}
        _atomic_json(rec_path, {**rec, "state": "done", "ended": _now(), "ended_ts": time.time(), **summary})
        log(f"[sweep] job {job['id']} done")
        return summary


class SweepJob:
    """A job as a picklable callable for submitit and Ray. ``checkpoint`` is submitit's hook on a
    time-limit or pre-emption signal: resubmitting the same job is enough, because the training
    resumes from the run directory (the last completed epoch)."""

    def __init__(self, job: dict, launcher: str = "slurm"):
        self.job, self.launcher = job, launcher

    def __call__(self) -> dict:
        return run_job(self.job, self.launcher)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(SweepJob(self.job, self.launcher))

    def __repr__(self) -> str:
        return f"SweepJob({self.job['id']})"


# -- the manifest -------------------------------------------------------------------------------

def load_manifest(root: Path) -> dict | None:
    return _read_json(Path(root) / MANIFEST)


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
    _atomic_json(root / MANIFEST, {"sweeps": names, "ami": __version__, "updated": _now(),
                                   "jobs": list(known.values())})


# -- status ------------------------------------------------------------------------------------

STATES = ("done", "running", "queued", "interrupted", "failed", "not started")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _progress(job: dict) -> str:
    """'epoch 12/100' from the run directory (history.csv and config.json), else ''."""
    fd = fold_dir(job)
    try:
        epochs = (_read_json(fd.run.config_path) or {}).get("recipe", {}).get("epochs")
        n = max(0, len(fd.history.read_text().splitlines()) - 1)
    except OSError:
        return ""
    return f"epoch {n}/{epochs}" if epochs else f"{n} epochs"


def _slurm_state(slurm_id: str, root: Path) -> str | None:
    """SLURM's state of a job through submitit (sacct), or None when SLURM cannot be asked here."""
    import shutil

    if not shutil.which("sacct"):
        return None
    try:
        import submitit

        return submitit.SlurmJob(Path(root) / SLURM_DIR / "%j", slurm_id).state
    except Exception:  # sacct unreachable or unknown job: fall back on the records
        return None


_SLURM_MAP = {"PENDING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued", "REQUEUE_FED": "queued",
              "CONFIGURING": "queued", "RUNNING": "running", "COMPLETING": "running", "RESIZING": "running",
              "SUSPENDED": "interrupted", "PREEMPTED": "interrupted"}


def job_status(job: dict, ask_scheduler: bool = True) -> tuple[str, str]:
    """(state, detail) of one job, from its run directory first, then its records and the launcher."""
    fd = fold_dir(job)
    rec = _read_json(record_path(job)) or {}
    launch = _read_json(record_path(job, "launch")) or {}
    lp = log_path(job)
    log_hint = f" (log {lp})" if lp.exists() else ""
    if fd.is_finished():
        m = _read_json(fd.metrics_path) or {}
        ba = (m.get("validation") or {}).get("balanced_accuracy")
        return "done", (f"val BA {ba:.4f}" if isinstance(ba, (int, float)) else "") + (
            f", {m['train_seconds']:.0f} s" if isinstance(m.get("train_seconds"), (int, float)) else "")
    prog = _progress(job)
    slurm_id = rec.get("slurm_job_id") or launch.get("slurm_job_id")
    sched = None
    if ask_scheduler and launch.get("launcher") == "slurm" and slurm_id:
        sched = _slurm_state(slurm_id, Path(job["root"]))
    where = f"slurm {slurm_id}" if slurm_id else (f"{rec.get('host')} pid {rec.get('pid')}" if rec else "")
    newer_launch = launch.get("submitted", "") > rec.get("started", "") if rec and launch else bool(launch)
    if sched is not None:
        state = sched.split()[0].upper() if sched else ""
        if state in _SLURM_MAP:
            return _SLURM_MAP[state], ", ".join(x for x in (where, state.lower(), prog) if x)
        if state in ("TIMEOUT", "CANCELLED", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
            why = rec.get("error") or state.lower()
            return "failed", f"{where}: {why}; {prog + ', ' if prog else ''}resumes when launched again"
    if rec and not newer_launch:
        st = rec.get("state")
        if st == "running":
            if rec.get("host") == socket.gethostname() and rec.get("launcher") != "slurm" and \
                    not _pid_alive(int(rec.get("pid", 0))):
                return "interrupted", f"process {rec.get('pid')} is gone; {prog + ', ' if prog else ''}" \
                                      f"resumes when launched again{log_hint}"
            return "running", ", ".join(x for x in (where, prog, f"since {rec.get('started')}") if x)
        if st == "failed":
            rc = launch.get("returncode")
            return "failed", f"{rec.get('error', 'failed')}{f' (exit {rc})' if rc not in (None, 0) else ''}{log_hint}"
        if st == "interrupted":
            return "interrupted", f"{rec.get('detail', '')}{'; ' + prog if prog else ''}{log_hint}"
        if st == "done":  # recorded done but the fold's metrics.json is gone
            return "not started", f"recorded done at {rec.get('ended')} but {fd.metrics_path} is missing"
    if launch:
        rc = launch.get("returncode")
        if rc not in (None, 0):
            return "failed", f"launcher: exit {rc}{log_hint}"
        if launch.get("launcher") == "local" and launch.get("ended"):
            return "interrupted", f"ended without a result{log_hint}"
        return "queued", ", ".join(x for x in (f"{launch.get('launcher')} {slurm_id or launch.get('ray_task') or ''}".strip(),
                                                f"submitted {launch.get('submitted')}", prog) if x)
    return "not started", (f"resumable: {prog}" if prog else "")


def status(jobs: list[dict], ask_scheduler: bool = True) -> list[tuple[dict, str, str]]:
    return [(j, *job_status(j, ask_scheduler)) for j in jobs]


def format_status(rows: list[tuple[dict, str, str]]) -> str:
    w = max([len(j["id"]) for j, _, _ in rows] + [3])
    lines = [f"{'state':<12} {'job':<{w}}  detail"]
    for j, st, detail in rows:
        lines.append(f"{st:<12} {j['id']:<{w}}  {detail}".rstrip())
    counts = {s: sum(1 for _, st, _ in rows if st == s) for s in STATES}
    lines.append(f"{len(rows)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


def format_dry_run(jobs: list[dict]) -> str:
    def shown(p: str) -> str:  # relative to the working directory when below it
        rel = os.path.relpath(p)
        return p if rel.startswith("..") else rel

    rows = [(label(j["model"], j["method"]), j["model"], j["method"], str(j["fold"]), shown(j["run_dir"])) for j in jobs]
    heads = ("configuration", "model", "method", "fold", "run directory")
    w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(f"{c:<{w[i]}}" for i, c in enumerate(r)).rstrip()

    return "\n".join([fmt(heads)] + [fmt(r) for r in rows] + [f"{len(jobs)} jobs"])


# -- resources (SLURM / Ray) ------------------------------------------------------------------------

DEFAULT_RESOURCES = {"gpus": 1, "cpus": 8, "mem_gb": 64, "time": "04:00:00", "partition": None}
RESOURCE_KEYS = set(DEFAULT_RESOURCES)


def parse_time(value) -> int:
    """Minutes from SLURM's time formats: 90 / '90' (minutes), 'MM:SS', 'HH:MM:SS', 'D-HH',
    'D-HH:MM', 'D-HH:MM:SS'. Seconds round up to the next minute."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip()
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", text):
        raise SweepError(f"time limit {text!r}: use minutes, HH:MM:SS or D-HH:MM:SS (SLURM's formats)")
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, sec = 0, parts[0], parts[1]
    else:
        h, m, sec = parts
    return int(days or 0) * 24 * 60 + h * 60 + m + (1 if sec else 0)


def load_resources(path: Path | None) -> dict:
    """A small JSON file: {"defaults": {gpus, cpus, mem_gb, time, partition}, "jobs": {"PATTERN": {...}},
    "sbatch": {any sbatch option}, "setup": [shell lines run before each job]}; PATTERN is an
    fnmatch pattern over job names such as "*-linear-*" or "h_optimus_*-lora-*"."""
    if path is None:
        return {}
    try:
        conf = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SweepError(f"--resources {path}: {e}") from None
    unknown = set(conf) - {"defaults", "jobs", "sbatch", "setup"}
    if unknown:
        raise SweepError(f"--resources {path}: unknown section(s) {sorted(unknown)}; known: defaults, jobs, sbatch, setup")
    for where, d in [("defaults", conf.get("defaults", {}))] + [(f"jobs[{k}]", v) for k, v in conf.get("jobs", {}).items()]:
        bad = set(d) - RESOURCE_KEYS
        if bad:
            raise SweepError(f"--resources {path}: {where}: unknown key(s) {sorted(bad)}; known: {sorted(RESOURCE_KEYS)}")
    return conf


def job_resources(job: dict, conf: dict, cli: dict) -> dict:
    """Resources of one job: built-in defaults < the file's defaults < its matching job patterns (in
    file order) < the command line."""
    out = dict(DEFAULT_RESOURCES)
    out.update(conf.get("defaults", {}))
    for pat, d in conf.get("jobs", {}).items():
        if fnmatch.fnmatchcase(job["id"], pat):
            out.update(d)
    out.update({k: v for k, v in cli.items() if v is not None})
    out["time_min"] = parse_time(out["time"])
    return out


def _resource_key(r: dict) -> tuple:
    return (r["gpus"], r["cpus"], r["mem_gb"], r["time_min"], r["partition"])


def describe_resources(r: dict) -> str:
    t = r["time_min"]
    return (f"{r['gpus']} GPU, {r['cpus']} CPUs, {r['mem_gb']} GB, {t // 60}:{t % 60:02d} h"
            + (f", partition {r['partition']}" if r["partition"] else ""))


def resource_groups(jobs: list[dict], conf: dict, cli: dict) -> list[tuple[dict, list[dict]]]:
    groups: dict[tuple, tuple[dict, list[dict]]] = {}
    for j in jobs:
        r = job_resources(j, conf, cli)
        groups.setdefault(_resource_key(r), (r, []))[1].append(j)
    return list(groups.values())


# -- launchers ----------------------------------------------------------------------------------------

def pending(jobs: list[dict], log) -> list[dict]:
    """Jobs still to run: done, running and queued ones are left alone (a sweep can be relaunched
    at any time to pick up what is missing)."""
    todo, left = [], {}
    for j, st, _ in status(jobs):
        if st in ("done", "running", "queued"):
            left[st] = left.get(st, 0) + 1
        else:
            todo.append(j)
    if left:
        log(f"{len(jobs) - len(todo)} of {len(jobs)} jobs need nothing: "
            + ", ".join(f"{n} {s}" for s, n in left.items()) + " (see --status)")
    return todo


def visible_gpus() -> list[str]:
    """GPU ids a local job can be pinned to: $CUDA_VISIBLE_DEVICES if set, else torch's device count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def launch_local(jobs: list[dict], max_parallel: int = 0, device: str = "auto", log=print,
                 python: str | None = None) -> int:
    """Run ``jobs`` as child processes, at most ``max_parallel`` at once (default: one per visible
    GPU, else 1), through :class:`concurrent.futures.ThreadPoolExecutor`. On GPUs each running job
    holds one GPU (``CUDA_VISIBLE_DEVICES``); on CPU each holds a slot. Returns the number of jobs
    that did not finish."""
    import queue
    import subprocess
    from concurrent.futures import ThreadPoolExecutor, as_completed

    if not jobs:
        log("nothing to run")
        return 0
    gpus = visible_gpus() if device in ("auto", "cuda") else []
    n = max_parallel or max(1, len(gpus))
    n = min(n, len(jobs))
    slots: queue.Queue[str | None] = queue.Queue()
    for i in range(n):
        slots.put(gpus[i % len(gpus)] if gpus else None)
    where = f"GPU{'s' if len(gpus) > 1 else ''} {','.join(gpus)}" if gpus else "CPU"
    log(f"local launcher: {len(jobs)} job(s), {n} at a time on {where}; logs in {Path(jobs[0]['root']) / LOGS}")
    procs: dict[str, subprocess.Popen] = {}

    def one(job: dict) -> tuple[dict, int, float]:
        slot = slots.get()
        t0 = time.time()
        launch = {"launcher": "local", "host": socket.gethostname(), "submitted": _now(), "slot": slot}
        try:
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = slot
            lp = log_path(job)
            lp.parent.mkdir(parents=True, exist_ok=True)
            _atomic_json(record_path(job, "launch"), launch)
            with open(lp, "ab") as out:
                p = subprocess.Popen([python or sys.executable, "-u", "-m", "ami.train.sweep", job["root"], job["id"]],
                                     stdout=out, stderr=subprocess.STDOUT, env=env)
                procs[job["id"]] = p
                rc = p.wait()
            _atomic_json(record_path(job, "launch"), {**launch, "ended": _now(), "returncode": rc})
            return job, rc, time.time() - t0
        finally:
            procs.pop(job["id"], None)
            slots.put(slot)

    failed = 0
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="ami-sweep")
    try:
        futures = [pool.submit(one, j) for j in jobs]
        for i, f in enumerate(as_completed(futures), 1):
            job, rc, secs = f.result()
            ok = rc == 0
            failed += not ok
            what = "done" if ok else ("already running elsewhere" if rc == BUSY_EXIT else f"FAILED (exit {rc})")
            log(f"[{i}/{len(jobs)}] {job['id']}: {what} in {secs:.0f} s" + ("" if ok else f"; log {log_path(job)}"))
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        for p in list(procs.values()):
            p.terminate()
        log("interrupted: the running jobs were stopped; run the same command again to resume")
        raise
    finally:
        pool.shutdown(wait=True)
    return failed


def launch_submitit(jobs: list[dict], conf: dict, cli: dict, max_parallel: int = 0, cluster: str = "slurm",
                    max_requeues: int = 3, log=print, executor_kwargs: dict | None = None) -> list:
    """Submit ``jobs`` through submitit: one job array per distinct set of resources (GPUs, CPUs,
    memory, time limit, partition), at most ``max_parallel`` tasks of an array at once. Each task
    is a :class:`SweepJob`: on its time limit or pre-emption submitit checkpoints and requeues it
    (at most ``max_requeues`` times for time limits), and it resumes from its run directory.
    ``cluster`` is submitit's: 'slurm', or 'local' / 'debug' to rehearse without a cluster.
    Returns the submitit jobs."""
    try:
        import submitit
    except ImportError:
        raise SweepError(f"--launcher slurm needs submitit: pip install '{DIST_NAME}[slurm]'") from None
    if not jobs:
        log("nothing to submit")
        return []
    root = Path(jobs[0]["root"])
    folder = root / SLURM_DIR / "%j"
    out = []
    for res, group in resource_groups(jobs, conf, cli):
        kw = {f"{cluster}_max_num_timeout": max_requeues} if cluster in ("slurm", "local") else {}
        ex = submitit.AutoExecutor(folder=folder, cluster=cluster, **kw, **(executor_kwargs or {}))
        params = dict(name="ami-sweep", timeout_min=res["time_min"], gpus_per_node=res["gpus"] or None,
                      cpus_per_task=res["cpus"], mem_gb=res["mem_gb"], tasks_per_node=1, nodes=1,
                      slurm_signal_delay_s=120, slurm_array_parallelism=max_parallel or len(group))
        if res["partition"]:
            params["slurm_partition"] = res["partition"]
        if conf.get("sbatch"):
            params["slurm_additional_parameters"] = dict(conf["sbatch"])
        if conf.get("setup"):
            params["slurm_setup"] = list(conf["setup"])
        ex.update_parameters(**params)
        with ex.batch():
            subs = [ex.submit(SweepJob(j, "slurm" if cluster == "slurm" else f"submitit-{cluster}")) for j in group]
        for j, s in zip(group, subs):
            _atomic_json(record_path(j, "launch"), {"launcher": "slurm" if cluster == "slurm" else f"submitit-{cluster}",
                                                    "slurm_job_id": str(s.job_id), "submitted": _now(),
                                                    "resources": {k: res[k] for k in ("gpus", "cpus", "mem_gb",
                                                                                      "time_min", "partition")},
                                                    "folder": str(folder)})
        first = str(subs[0].job_id).split("_")[0] if subs else "?"
        log(f"submitted {len(group)} job(s) as {cluster} job {first} ({describe_resources(res)})")
        out += subs
    return out


def launch_ray(jobs: list[dict], conf: dict, cli: dict, address: str | None = None, log=print,
               init_kwargs: dict | None = None) -> int:
    """One Ray task per job (``num_gpus`` from the resources), on the cluster at ``address``
    ($RAY_ADDRESS, else a local Ray). A task whose worker dies is retried and resumes. Returns the
    number of jobs that did not finish."""
    try:
        import ray
    except ImportError:
        raise SweepError(f"--launcher ray needs Ray: pip install '{DIST_NAME}[ray]'") from None
    if not jobs:
        log("nothing to run")
        return 0
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), **(init_kwargs or {}))
    try:
        refs = {}
        for j in jobs:
            r = job_resources(j, conf, cli)
            task = ray.remote(num_gpus=r["gpus"], num_cpus=r["cpus"], max_retries=3, max_calls=1)(_ray_job)
            ref = task.remote(j)
            refs[ref] = j
            _atomic_json(record_path(j, "launch"), {"launcher": "ray", "ray_task": ref.hex()[:16], "submitted": _now()})
        failed, done = 0, 0
        todo = list(refs)
        while todo:
            ready, todo = ray.wait(todo, num_returns=1)
            j = refs[ready[0]]
            done += 1
            try:
                ray.get(ready[0])
                log(f"[{done}/{len(jobs)}] {j['id']}: done")
            except Exception as e:  # the job's own record holds the error
                failed += 1
                log(f"[{done}/{len(jobs)}] {j['id']}: FAILED ({type(e).__name__}); see --status")
        return failed
    finally:
        ray.shutdown()


def _ray_job(job: dict) -> dict:
    return run_job(job, "ray")


# -- the command (ami-train --sweep ...) ------------------------------------------------------------

def sweep_command(name: str, *, launcher: str = "local", out: Path | None = None, methods: str | None = None,
                  folds: str | None = None, options: JobOptions, dry_run: bool = False, show_status: bool = False,
                  max_parallel: int = 0, resources: Path | None = None, cli_resources: dict | None = None,
                  max_requeues: int = 3, echo=print, err=lambda s: print(s, file=sys.stderr)) -> int:
    """What ``ami-train --sweep NAME`` does; returns the exit code."""
    if launcher not in LAUNCHERS:
        raise SweepError(f"--launcher must be one of {', '.join(LAUNCHERS)}, not {launcher!r}")
    root = Path(out) if out else Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    if show_status:
        manifest = load_manifest(root)
        if manifest:
            jobs = manifest["jobs"]
        else:
            jobs = expand(name, root, methods, folds, options, warn=err)
            err(f"{root / MANIFEST} not found: nothing was launched into {root} yet")
        rows = status(jobs)
        echo(format_status(rows))
        return 1 if any(st == "failed" for _, st, _ in rows) else 0
    jobs = expand(name, root, methods, folds, options, warn=err)
    conf = load_resources(resources)
    cli = dict(cli_resources or {})
    if dry_run:
        if launcher in ("slurm", "ray"):
            for res, group in resource_groups(jobs, conf, cli):
                echo(f"# {launcher}: {len(group)} job(s), each asking for {describe_resources(res)}")
        echo(format_dry_run(jobs))
        return 0
    if launcher == "local" and not options.threads and max_parallel > 1 and options.device in ("auto", "cpu") \
            and (options.device == "cpu" or not visible_gpus()):
        per = max(1, (os.cpu_count() or 1) // max_parallel)  # CPU slots: do not oversubscribe the cores
        for j in jobs:
            j["threads"] = per
    _require(launcher)  # before anything is written
    write_manifest(root, name, jobs)
    todo = pending(jobs, err)
    if launcher == "local":
        failed = launch_local(todo, max_parallel, options.device, log=err)
        echo(f"{len(todo) - failed} of {len(todo)} job(s) finished; results: ami-bench table {root}")
        return 1 if failed else 0
    if launcher == "slurm":
        launch_submitit(todo, conf, cli, max_parallel, "slurm", max_requeues, log=err)
        echo(f"follow with: ami-train --sweep {name} --out {root} --status; then: ami-bench table {root}")
        return 0
    failed = launch_ray(todo, conf, cli, log=err)
    echo(f"{len(todo) - failed} of {len(todo)} job(s) finished; results: ami-bench table {root}")
    return 1 if failed else 0


def _require(launcher: str) -> None:
    """Fail early, with the install command, when a launcher's library is missing."""
    import importlib.util

    need = {"slurm": ("submitit", "slurm"), "ray": ("ray", "ray")}.get(launcher)
    if need and importlib.util.find_spec(need[0]) is None:
        raise SweepError(f"--launcher {launcher} needs {need[0]}: pip install '{DIST_NAME}[{need[1]}]'")


def _main(argv: list[str]) -> int:
    """``python -m ami.train.sweep ROOT JOB``: run one job of ROOT/sweep.json (the local launcher's
    child process; also handy to rerun one job by hand)."""
    if len(argv) != 2:
        print("usage: python -m ami.train.sweep ROOT JOB_ID", file=sys.stderr)
        return 2
    root, jid = Path(argv[0]), argv[1]
    manifest = load_manifest(root)
    if not manifest:
        print(f"{root / MANIFEST} not found", file=sys.stderr)
        return 2
    job = next((j for j in manifest["jobs"] if j["id"] == jid), None)
    if job is None:
        print(f"no job {jid!r} in {root / MANIFEST}", file=sys.stderr)
        return 2
    try:
        run_job(job, "local")
    except JobBusy as e:
        print(str(e), file=sys.stderr)
        return BUSY_EXIT
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        raise
    except Exception as e:  # recorded in the job's record; the full traceback goes to the log
        import traceback

        traceback.print_exc()
        print(f"job {jid} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
