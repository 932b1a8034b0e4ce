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

import os
import re
import sys
from pathlib import Path

from ami.runtime import DIST_NAME

from .sweep_jobs import JobBusy, JobLock, format_dry_run, format_status, job_status, run_job, status
from .sweep_launch import (
    describe_resources,
    job_resources,
    launch_local,
    launch_ray,
    launch_submitit,
    load_resources,
    parse_time,
    pending,
    resource_groups,
    visible_gpus,
)
from .sweep_plan import (
    BUSY_EXIT,
    LAUNCHERS,
    MANIFEST,
    JobOptions,
    SweepError,
    expand,
    load_manifest,
    record_path,
    timestamp,
    write_manifest,
    write_record,
)

# the names the CLI and the tests use, one import away (each defined in its own module above)
__all__ = ["BUSY_EXIT", "LAUNCHERS", "MANIFEST", "JobBusy", "JobLock", "JobOptions", "SweepError", "describe_resources",
           "expand", "format_dry_run", "format_status", "job_resources", "job_status", "launch_local", "launch_ray",
           "launch_submitit", "load_manifest", "load_resources", "parse_time", "pending", "record_path",
           "resource_groups", "run_job", "status", "sweep_command", "timestamp", "visible_gpus", "write_manifest",
           "write_record"]

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
