"""A sweep's jobs: running one (its lock, its records under ``ROOT/logs``) and reading its state.
Part of ``ami-train --sweep`` (:mod:`ami.train.sweep`); no torch at import time.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ami.runtime.errors import BadInput

from .registry import label
from .sweep_plan import (
    RECORD_FIELDS,
    SLURM_DIR,
    fold_dir,
    fold_value,
    load_json,
    log_path,
    read_record,
    record_path,
    timestamp,
    write_record,
)

# -- the job ----------------------------------------------------------------------------------------











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


class JobBusy(BadInput, RuntimeError):
    """The job holds its lock in another process (it is running elsewhere)."""


class JobLock:
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
    with JobLock(rec_path.with_suffix(".lock")):
        attempt = (load_json(rec_path) or {}).get("attempt", 0) + 1
        rec = {"id": job["id"], "state": "running", "launcher": launcher, "host": socket.gethostname(),
               "pid": os.getpid(), "attempt": attempt, "started": timestamp(), "started_ts": time.time(),
               **_scheduler_ids()}
        write_record(rec_path, rec)
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
                write_record(rec_path, {**rec, "state": "failed", "ended": timestamp(), "error": e.code})
            else:  # submitit's requeue after a time-limit / pre-emption signal, or an exit request
                write_record(rec_path, {**rec, "state": "interrupted", "ended": timestamp(),
                                        "detail": "stopped by a signal; resumes when run again"})
            raise
        except KeyboardInterrupt:
            write_record(rec_path, {**rec, "state": "interrupted", "ended": timestamp(), "detail": "interrupted"})
            raise
        except BaseException as e:
            write_record(rec_path, {**rec, "state": "failed", "ended": timestamp(),
                                    "error": f"{type(e).__name__}: {e}".strip()})
            raise
        summary = {"id": job["id"], "validation_ba": (metrics.get("validation") or {}).get("balanced_accuracy"),
                   "train_seconds": metrics.get("train_seconds")}
        write_record(rec_path, {**rec, "state": "done", "ended": timestamp(), "ended_ts": time.time(), **summary})
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
        epochs = (fd.run.config() if fd.run.is_run() else {}).get("recipe", {}).get("epochs")
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
    rec = read_record(record_path(job), RECORD_FIELDS) or {}
    launch = read_record(record_path(job, "launch"), RECORD_FIELDS) or {}
    lp = log_path(job)
    log_hint = f" (log {lp})" if lp.exists() else ""
    if fd.is_finished():
        m = fd.metrics()
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


