"""ami-train --sweep: expansion, dry run, the local launcher, status, and the SLURM path through
submitit without a cluster (its local executor for running and requeueing jobs; fake sbatch/srun
commands for the submission scripts). Jobs are tiny random-init stand-ins on a few generated crops
(conftest's synthetic_folds_root)."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ami.runtime.datasets import DatasetMissing
from ami.train import sweep as S
from ami.train.registry import REGISTRY, table3_configs

TINY = ["--tiny", "--random-init", "--max-train", "16", "--max-eval", "8", "--epochs", "1", "--threads", "1"]


def _cli(args: list[str], code: int = 0):
    from ami.train.cli import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == code, res.output + repr(res.exception)
    return res


def _opts(data, tmp_path, **kw) -> S.JobOptions:
    base = dict(data_root=str(data), tiny=True, random_init=True, max_train=16, max_eval=8, threads=1,
                recipe_overrides={"epochs": 1}, cache_dir=str(tmp_path / "cache"), device="cpu")
    base.update(kw)
    return S.JobOptions(**base)


# -- expansion and dry run -------------------------------------------------------------------------

def test_table3_expands_to_85_jobs_one_per_configuration_and_fold(tmp_path):
    jobs = S.expand("table3", tmp_path / "t3")
    assert len(jobs) == 85
    configs = list(dict.fromkeys((j["model"], j["method"]) for j in jobs))
    assert configs == table3_configs() and len(configs) == 17
    assert sum(1 for _, m in configs if m == "full") == 3
    assert sum(1 for _, m in configs if m == "linear") == 7 and sum(1 for _, m in configs if m == "lora") == 7
    for c in configs:
        assert [j["fold"] for j in jobs if (j["model"], j["method"]) == c] == [0, 1, 2, 3, 4]
    assert len({j["id"] for j in jobs}) == 85 and len({j["run_dir"] for j in jobs}) == 85
    for j in jobs:
        assert Path(j["run_dir"]) == (tmp_path / "t3" / f"{j['model']}-{j['method']}-fold{j['fold']}").absolute()
        assert j["method"] in REGISTRY[j["model"]].methods


def test_dry_run_prints_one_line_per_job_and_starts_nothing(tmp_path):
    root = tmp_path / "t3"
    out = _cli(["--sweep", "table3", "--dry-run", "--out", str(root)]).stdout.strip().splitlines()
    assert out[-1] == "85 jobs"
    rows = out[1:-1]
    assert len(rows) == 85
    assert rows[0].split()[:5] == ["EfficientNetV2", "efficientnetv2_m", "full", "0", str(root / "efficientnetv2_m-full-fold0")]
    assert sum(1 for r in rows if r.startswith("Virchow2 (LoRA) ")) == 5
    assert sum(1 for r in rows if " lora " in r) == 35
    assert not root.exists()  # nothing was written


def test_lists_edge_and_method_filters(tmp_path):
    assert [j["id"] for j in S.expand("edge", tmp_path)] == [f"edge-full-fold{k}" for k in range(5)]
    assert [j["id"] for j in S.expand("edge", tmp_path, folds="all,full")][-1] == "edge-full-all"
    assert len(S.expand("table3", tmp_path, methods="lora")) == 35
    skipped = []
    jobs = S.expand("uni,virchow2:lora,efficientnetv2_m", tmp_path, methods="linear,full", folds="0,2",
                    warn=skipped.append)
    assert [(j["model"], j["method"], j["fold"]) for j in jobs] == [
        ("uni", "linear", 0), ("uni", "linear", 2), ("virchow2", "lora", 0), ("virchow2", "lora", 2),
        ("efficientnetv2_m", "full", 0), ("efficientnetv2_m", "full", 2)]
    assert any("uni: no full" in s for s in skipped)
    for bad, msg in [("nope", "neither a named sweep"), ("efficientnetv2_m:lora", "supports full, not 'lora'")]:
        with pytest.raises(S.SweepError, match=msg):
            S.expand(bad, tmp_path)
    with pytest.raises(S.SweepError, match="fold 7 out of range"):
        S.expand("uni", tmp_path, folds="7")
    with pytest.raises(S.SweepError, match="bad recipe for uni"):
        S.expand("uni", tmp_path, options=S.JobOptions(recipe_overrides={"no_such_key": 1}))
    res = _cli(["--sweep", "uni:full", "--dry-run", "--out", str(tmp_path)], code=2)
    assert "uni supports linear or lora, not 'full'" in res.output and "Traceback" not in res.output


def test_resources_from_file_and_flags(tmp_path):
    conf_path = tmp_path / "res.json"
    conf_path.write_text(json.dumps({"defaults": {"mem_gb": 96, "time": "8:00:00", "partition": "gpu"},
                                     "jobs": {"*-linear-*": {"time": 60, "mem_gb": 128}},
                                     "sbatch": {"account": "proj"}}))
    conf = S.load_resources(conf_path)
    jobs = S.expand("uni", tmp_path, folds="0")
    lin, lora = (S.job_resources(j, conf, {"cpus": 4}) for j in jobs)
    assert (lin["time_min"], lin["mem_gb"], lin["partition"], lin["cpus"], lin["gpus"]) == (60, 128, "gpu", 4, 1)
    assert (lora["time_min"], lora["mem_gb"]) == (480, 96)
    assert S.job_resources(jobs[1], conf, {"time": "1-00:00:00"})["time_min"] == 24 * 60  # the command line wins
    assert [len(g) for _, g in S.resource_groups(S.expand("uni", tmp_path), conf, {})] == [5, 5]
    assert [S.parse_time(t) for t in (90, "90", "45:30", "2:00:00", "1-12", "1-00:30", "0-0:0:1")] == \
        [90, 90, 46, 120, 36 * 60, 24 * 60 + 30, 1]
    (tmp_path / "bad.json").write_text(json.dumps({"defaults": {"gpu": 2}}))
    with pytest.raises(S.SweepError, match=r"unknown key\(s\) \['gpu'\]"):
        S.load_resources(tmp_path / "bad.json")
    out = _cli(["--sweep", "uni", "--launcher", "slurm", "--dry-run", "--resources", str(conf_path), "--out",
                str(tmp_path / "r")]).stdout
    assert "# slurm: 5 job(s), each asking for 1 GPU, 8 CPUs, 128 GB, 1:00 h, partition gpu" in out
    assert "# slurm: 5 job(s), each asking for 1 GPU, 8 CPUs, 96 GB, 8:00 h, partition gpu" in out


# -- the local launcher ------------------------------------------------------------------------------

def _max_overlap(recs: list[dict]) -> int:
    events = sorted([(r["started_ts"], 1) for r in recs] + [(r["ended_ts"], -1) for r in recs],
                    key=lambda e: (e[0], e[1]))
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


@pytest.mark.slow
def test_local_launcher_runs_four_jobs_two_at_a_time_and_the_table_merges_them(synthetic_folds_root, tmp_path):
    from ami.bench.cli import _register
    from ami.bench.cli import app as bench_app

    root = tmp_path / "sweep"
    args = ["--sweep", "edge_200mf,uni", "--methods", "full,linear", "--folds", "0,1", *TINY, "--jobs", "2",
            "--out", str(root), "--data-root", str(synthetic_folds_root), "--cache-dir", str(tmp_path / "cache")]
    res = _cli(args)
    # where the pool runs depends on the box: CPU slots without a GPU, else the visible GPUs' ids
    gpus = S.visible_gpus()
    where = f"GPU{'s' if len(gpus) > 1 else ''} {','.join(gpus)}" if gpus else "CPU"
    assert f"4 job(s), 2 at a time on {where}" in res.stderr and "4 of 4 job(s) finished" in res.stdout
    ids = ["edge_200mf-full-fold0", "edge_200mf-full-fold1", "uni-linear-fold0", "uni-linear-fold1"]
    recs = [json.loads((root / "logs" / f"{i}.json").read_text()) for i in ids]
    assert [r["state"] for r in recs] == ["done"] * 4 and {r["attempt"] for r in recs} == {1}
    assert _max_overlap(recs) == 2  # the pool ran two jobs at once, never more
    for i in ids:  # each job trained exactly its fold, in its own run directory
        folds = sorted(p.name for p in (root / i).glob("fold*"))
        assert folds == [f"fold{i[-1]}"] and (root / i / folds[0] / "metrics.json").is_file()

    st = _cli(["--sweep", "edge_200mf,uni", "--status", "--out", str(root)]).stdout
    assert st.strip().splitlines()[-1] == "4 jobs: 4 done"

    # relaunching is idempotent: nothing is retrained
    again = _cli(args)
    assert "4 of 4 jobs need nothing: 4 done" in again.stderr
    assert json.loads((root / "logs" / "uni-linear-fold0.json").read_text())["attempt"] == 1

    # one table row per configuration: folds trained by different jobs merge
    _register()
    table = CliRunner().invoke(bench_app, ["table", str(root)])
    assert table.exit_code == 0, table.output
    rows = [ln for ln in table.stdout.splitlines() if ln.startswith("| ") and "folds" not in ln]
    assert len(rows) == 2
    assert all(r.split(" | ")[1] == "0,1" for r in rows)
    assert any(r.startswith("| UNI (linear) [random init, tiny stand-in, subset 16/8]") for r in rows)


def test_status_reports_failed_and_not_started_jobs(tmp_path, synthetic_folds_root):
    root = tmp_path / "s"
    jobs = S.expand("uni", root, methods="linear", folds="0,1,2", options=_opts(synthetic_folds_root, tmp_path))
    S.write_manifest(root, "uni", jobs)
    # fold 0: a job that failed (record written by the job), fold 1: a process that vanished
    S.write_record(S.record_path(jobs[0]), {"id": jobs[0]["id"], "state": "failed", "started": S.timestamp(),
                                            "error": "RuntimeError: out of memory", "host": "x", "pid": 1})
    S.write_record(S.record_path(jobs[1]), {"id": jobs[1]["id"], "state": "running", "started": S.timestamp(),
                                            "launcher": "local", "host": os.uname().nodename, "pid": 2 ** 22 + 7})
    res = _cli(["--sweep", "uni", "--status", "--out", str(root)], code=1)  # exit 1: a job failed
    lines = res.stdout.splitlines()
    assert lines[1].startswith("failed") and "out of memory" in lines[1]
    assert lines[2].startswith("interrupted") and "is gone" in lines[2]
    assert lines[3].startswith("not started")
    assert lines[-1] == "3 jobs: 1 interrupted, 1 failed, 1 not started"
    # a real failure is recorded by the job itself, with the reason
    broken = dict(jobs[2], data_root=str(tmp_path / "no-data-here"))
    with pytest.raises(DatasetMissing, match="no-data-here"):  # the job's own error, re-raised once recorded
        S.run_job(broken, log=lambda s: None)
    rec = json.loads(S.record_path(broken).read_text())
    assert rec["state"] == "failed" and "no-data-here" in rec["error"]
    assert S.job_status(broken)[0] == "failed"
    # a job runs once at a time: a second process for the same job refuses (exit 75) and changes nothing
    with S.JobLock(S.record_path(jobs[0]).with_suffix(".lock")):
        assert S._main([str(root), jobs[0]["id"]]) == S.BUSY_EXIT
    assert json.loads(S.record_path(jobs[0]).read_text())["state"] == "failed"
    S.record_path(broken).unlink()
    # a relaunch picks up exactly the jobs that need it
    assert [j["id"] for j in S.pending(jobs, lambda s: None)] == [j["id"] for j in jobs]
    # other result-deciding options into the same root are refused
    other = S.expand("uni", root, methods="linear", folds="0",
                     options=_opts(synthetic_folds_root, tmp_path, max_train=32))
    with pytest.raises(S.SweepError, match=r"uni-linear-fold0 \(max_train\)"):
        S.write_manifest(root, "uni", other)


# -- the SLURM path through submitit ---------------------------------------------------------------------

def _history_epochs(run_dir: Path, fold: int) -> list[int]:
    with open(run_dir / f"fold{fold}" / "history.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _wait_for(cond, timeout: float = 120.0, what: str = ""):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_submitit_job_is_requeued_on_its_signal_and_resumes_also_after_a_kill(synthetic_folds_root, tmp_path):
    pytest.importorskip("submitit")
    root = tmp_path / "sw"
    epochs = 16
    (job,) = S.expand("edge_200mf", root, folds="0", options=_opts(synthetic_folds_root, tmp_path, recipe_overrides={
        "epochs": epochs, "batch_size": 8}))
    S.write_manifest(root, "edge_200mf", [job])
    # submitit's local executor runs the same SweepJob as on SLURM, with its signal handling and requeueing
    (sub,) = S.launch_submitit([job], {}, {"gpus": 0, "time": 30}, cluster="local", log=lambda s: None)
    rec = S.record_path(job)
    state = Path(job["run_dir"]) / "fold0" / "state.pt"
    _wait_for(lambda: state.exists(), what="the first completed epoch")
    first = json.loads(rec.read_text())
    assert first["attempt"] == 1 and first["launcher"] == "submitit-local"
    os.kill(first["pid"], signal.SIGUSR2)  # what SLURM sends before the time limit (--signal=USR2@120)
    _wait_for(lambda: (json.loads(rec.read_text()).get("attempt", 0) == 2), what="the requeued attempt")
    second = json.loads(rec.read_text())
    n1 = len(_history_epochs(Path(job["run_dir"]), 0))
    _wait_for(lambda: len(_history_epochs(Path(job["run_dir"]), 0)) > n1, what="progress after the requeue")
    os.kill(second["pid"], signal.SIGKILL)  # a hard kill: no checkpoint, no requeue
    _wait_for(lambda: S.job_status(job)[0] == "interrupted", timeout=30, what="the kill to show")
    sub.wait()
    done_before = len(_history_epochs(Path(job["run_dir"]), 0))
    assert 0 < done_before < epochs
    # resubmitted: it resumes after its last completed epoch instead of restarting
    (sub2,) = S.launch_submitit([job], {}, {"gpus": 0, "time": 30}, cluster="local", log=lambda s: None)
    summary = sub2.result()
    assert summary["id"] == job["id"]
    third = json.loads(rec.read_text())
    assert third["state"] == "done" and third["attempt"] == 3
    assert _history_epochs(Path(job["run_dir"]), 0) == list(range(epochs))  # every epoch once: no restart
    out = sub.stdout() + sub2.stdout()
    assert "resuming after epoch" in out and out.count("resuming after epoch") == 2, out[-3000:]
    assert "this job is preempted" in (sub.stderr() or "")
    assert S.job_status(job)[0] == "done"


FAKE_SBATCH = """#!/bin/sh
# records the script it is given and answers like sbatch; runs nothing
n=$(ls "$FAKE_SLURM_DIR" | wc -l)
cp "$1" "$FAKE_SLURM_DIR/script-$n.sh"
echo "Submitted batch job $((4242 + n))"
"""


def test_slurm_submission_scripts_ask_for_the_requested_resources(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    bin_dir, rec = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir()
    rec.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 1\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(rec))
    conf = {"defaults": {"partition": "gpu-a100", "mem_gb": 80}, "jobs": {"*-linear-*": {"time": "0:45:00"}},
            "sbatch": {"account": "pathology", "qos": "normal"}, "setup": ["module load cuda/12.4"]}
    root = tmp_path / "t3"
    jobs = S.expand("uni", root, folds="0,1,2", options=S.JobOptions(amp="bf16"))
    S.write_manifest(root, "uni", jobs)
    subs = S.launch_submitit(jobs, conf, {"cpus": 6}, max_parallel=2, log=lambda s: None)
    # the file's pattern gives the linear probes their own time limit, so they form their own job array
    assert [s.job_id for s in subs] == ["4242_0", "4242_1", "4242_2", "4243_0", "4243_1", "4243_2"]
    assert len(list(rec.iterdir())) == 2  # one sbatch per set of resources, not one per job
    scripts = [(rec / f"script-{i}.sh").read_text() for i in range(2)]
    for text, minutes in zip(scripts, (45, 240)):
        for flag in ("--gpus-per-node=1", "--cpus-per-task=6", "--mem=80GB", f"--time={minutes}",
                     "--partition=gpu-a100", "--array=0-2%2", "--signal=USR2@120", "--ntasks-per-node=1",
                     "--nodes=1", "--account=pathology", "--qos=normal", "--job-name=ami-sweep"):
            assert f"#SBATCH {flag}\n" in text, (flag, text)
        assert "module load cuda/12.4" in text and "submitit.core._submit" in text
    # the sweep's status knows the jobs are queued on SLURM (no sacct here: from the launcher's records)
    rows = S.status(jobs)
    assert [st for _, st, _ in rows] == ["queued"] * 6 and "slurm 4242_0" in rows[0][2]
    # the command line wins over the file: one time limit, so one array of 6
    rec2 = tmp_path / "submitted2"
    rec2.mkdir()
    monkeypatch.setenv("FAKE_SLURM_DIR", str(rec2))
    S.launch_submitit(S.expand("uni", tmp_path / "t3b", folds="0,1,2"), conf, {"time": "6:00:00"}, log=lambda s: None)
    (script,) = [p.read_text() for p in rec2.iterdir()]
    assert "#SBATCH --time=360\n" in script and "#SBATCH --array=0-5%6\n" in script


# -- Ray (optional extra: skipped where Ray is not installed) ------------------------------------------

@pytest.mark.slow
def test_ray_launcher_runs_a_job_per_task(synthetic_folds_root, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'ami-mitosis[ray]')")
    root = tmp_path / "ray"
    (job,) = S.expand("uni", root, methods="linear", folds="0", options=_opts(synthetic_folds_root, tmp_path))
    S.write_manifest(root, "uni", [job])
    failed = S.launch_ray([job], {}, {"gpus": 0, "cpus": 1}, log=lambda s: None,
                          init_kwargs={"num_cpus": 1, "include_dashboard": False, "log_to_driver": False})
    assert failed == 0
    rec = json.loads(S.record_path(job).read_text())
    assert rec["state"] == "done" and rec["launcher"] == "ray"
    assert json.loads(S.record_path(job, "launch").read_text())["launcher"] == "ray"
    assert S.job_status(job)[0] == "done"
