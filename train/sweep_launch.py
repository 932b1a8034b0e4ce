"""Launching a sweep's jobs: resources (SLURM / Ray) and the three launchers (local processes,
submitit, Ray). Part of ``ami-train --sweep`` (:mod:`ami.train.sweep`); no torch at import time.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from ami.runtime import DIST_NAME

from .sweep_jobs import SweepJob, run_job, status
from .sweep_plan import BUSY_EXIT, LOGS, SLURM_DIR, SweepError, log_path, record_path, timestamp, write_record

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
        launch = {"launcher": "local", "host": socket.gethostname(), "submitted": timestamp(), "slot": slot}
        try:
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = slot
            lp = log_path(job)
            lp.parent.mkdir(parents=True, exist_ok=True)
            write_record(record_path(job, "launch"), launch)
            with open(lp, "ab") as out:
                p = subprocess.Popen([python or sys.executable, "-u", "-m", "ami.train.sweep", job["root"], job["id"]],
                                     stdout=out, stderr=subprocess.STDOUT, env=env)
                procs[job["id"]] = p
                rc = p.wait()
            write_record(record_path(job, "launch"), {**launch, "ended": timestamp(), "returncode": rc})
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
            write_record(record_path(j, "launch"), {"launcher": "slurm" if cluster == "slurm" else f"submitit-{cluster}",
                                                    "slurm_job_id": str(s.job_id), "submitted": timestamp(),
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
            write_record(record_path(j, "launch"), {"launcher": "ray", "ray_task": ref.hex()[:16], "submitted": timestamp()})
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


