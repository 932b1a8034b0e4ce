"""ami-bench gpu-check: the prepared device check runs green on a CPU-only machine (every GPU part
skipped with its reason), and its GPU code runs end to end in the CPU rehearsal (tiny stand-ins)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ami.bench import gpu_check as GC
from ami.bench import gpu_env as GE
from ami.bench import gpu_report as GR
from ami.bench import gpu_train as GT
from ami.runtime.engines import ASSETS

torch = pytest.importorskip("torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run for real (minutes)")
def test_cpu_only_machine_skips_every_gpu_part_with_its_reason(tmp_path):
    from typer.testing import CliRunner

    from ami.bench.cli import _register, app

    _register()
    res = CliRunner().invoke(app, ["gpu-check", "--out", str(tmp_path / "gc")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "gc" / "gpu-check.json").read_text())
    assert rep["schema"] == GC.SCHEMA and rep["status"] == "pass" and rep["device"] == "none"
    assert list(rep["sections"]) == list(GR.SECTIONS)  # the order
    env = rep["sections"]["environment"]
    assert env["status"] == "info"
    d = env["data"]
    assert d["torch"]["cuda_available"] is False and d["versions"]["onnxruntime"]
    assert d["onnxruntime_providers"]["CPUExecutionProvider"] == "loads"
    assert "libnvinfer_loads" in d["tensorrt"] and d["tensorrt"]["libnvinfer"]
    for key in GR.SECTIONS[1:]:
        sec = rep["sections"][key]
        assert sec["status"] == "skipped" and "no CUDA GPU" in sec["reason"], (key, sec)
    assert "TensorRT" in rep["sections"]["tensorrt_round_trip"]["reason"]
    md = (tmp_path / "gc" / "gpu-check.md").read_text()
    positions = [md.index(f"## {GR.TITLES[k]}") for k in GR.SECTIONS]
    assert positions == sorted(positions)
    assert md.count("Status: **skipped**") == len(GR.SECTIONS) - 1


def test_cpu_rehearsal_runs_the_gpu_code(tmp_path):
    """--device cpu: the same code as on a GPU (torch_runner, run_latency, ami-infer end to end,
    timed training steps beside bare steps, their projections) with tiny stand-ins on the CPU;
    TensorRT skipped with its reason here."""
    rc = GC.main(["--out", str(tmp_path / "r"), "--device", "cpu", "--only",
                  "pytorch_cuda,tensorrt_round_trip,latency,end_to_end,training_steps", "--models", "uni:linear,uni:lora",
                  "--crops", str(ASSETS / "samples"), "--e2e-crops", "16"])
    rep = json.loads((tmp_path / "r" / "gpu-check.json").read_text())
    secs = rep["sections"]
    assert rc == (1 if rep["status"] == "fail" else 0)
    assert rep["rehearsal"] and secs["environment"]["status"] == "skipped"  # not selected
    p = secs["pytorch_cuda"]
    assert p["status"] == "pass", p
    assert [b["batch"] for b in p["batches"]] == list(GE.ROUND_TRIP_BATCHES) and p["max_abs_dp"] <= 1e-4
    t = secs["tensorrt_round_trip"]
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        assert t["status"] == "skipped" and "tensorrt" in t["reason"].lower()
    lat = secs["latency"]
    assert lat["status"] == "pass", lat
    assert lat["rows"] >= 2 and (tmp_path / "r" / "latency.json").is_file()
    _check_end_to_end(secs["end_to_end"])
    tr = secs["training_steps"]
    assert tr["status"] == "pass", tr
    rows = {(r["model"], r["method"]): r for r in tr["rows"]}
    assert set(rows) == {("uni", "linear"), ("uni", "lora")}
    lin, lora = rows["uni", "linear"], rows["uni", "lora"]
    assert lin["steps"] == 2 and lin["step_s_median"] > 0 and lin["embeddings_once_s"] > 0
    assert lora["params_trainable"] < lora["params"]  # adapters + head only
    assert lora["fold_100_epochs_s"] == pytest.approx(
        100 * lora["epoch_s"] + -(-GT.FINAL_EVAL_CROPS // lora["eval_batch"]) * lora["eval_batch_s"])
    for r in (lin, lora):  # the loop beside its bare step, split into host and device time
        assert r["bare_step_s_median"] > 0 and 0 < r["host_s_median"] < r["step_s_median"], r
        assert r["loop_overhead"] == pytest.approx(r["step_s_median"] / r["bare_step_s_median"])
        assert r["host_s_median"] + r["device_s_median"] == pytest.approx(r["step_s_median"])
        assert r["host_fraction"] == pytest.approx(r["host_s_median"] / r["step_s_median"])
    assert "PEFT LoRA" in lora["bare_what"] and lin["bare_what"].startswith("no_grad forward")
    md = (tmp_path / "r" / "gpu-check.md").read_text()
    assert "CPU REHEARSAL" in md and "TINY STAND-INS" in md and "one fold, 100 epochs" in md
    assert f"| {lora['loop_overhead']:.2f}x | {lora['host_s_median']:.3f} | {lora['device_s_median']:.3f} |" in md
    assert f"{secs['end_to_end']['decode_crops_per_s']:.0f} crops/s on this box's" in md


def _check_end_to_end(e: dict) -> None:
    """The end-to-end part: ami-infer's rows on the given crops, each against the decode bound."""
    assert e["status"] == "pass", e
    assert e["crops"] == 16 and e["source"].endswith("samples") and e["decode_crops_per_s"] > 0
    assert e["rows"][0]["engine"] == "ONNX Runtime"
    for r in e["rows"]:
        assert r["crops"] == 16 and r["model"] == "edge.onnx" and r["crops_per_s"] > 0
        assert r["bound_crops_per_s"] == pytest.approx(1 / (1 / r["model_only_crops_per_s"] + 1 / e["decode_crops_per_s"]))
        assert r["bound_crops_per_s"] < e["decode_crops_per_s"]  # decoding alone is the box's bound
        assert r["fraction_of_bound"] == pytest.approx(r["crops_per_s"] / r["bound_crops_per_s"])


def test_end_to_end_without_crops_says_how_to_give_them(tmp_path):
    e = GC.end_to_end(None, None, 8, lambda s: None, True)
    assert e == {"status": "skipped", "reason": "no crops given: pass --data-root D, or --crops DIR (a folder of "
                                                "crops carried with the checkout)"}
    e = GC.end_to_end(None, tmp_path, 8, lambda s: None, True)  # an empty folder
    assert e["status"] == "skipped" and e["reason"] == f"no crops found under {tmp_path}"


def test_an_unknown_part_is_a_usage_error(tmp_path, capsys):
    assert GC.main(["--out", str(tmp_path / "x"), "--only", "latency,warp_drive"]) == 2
    assert "unknown part(s) warp_drive" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_runs_from_a_checkout_that_is_not_installed(tmp_path):
    """``python bench/gpu_check.py``: the file imports ``ami`` from the checkout it sits in, with no
    PYTHONPATH and from any working folder."""
    script = Path(GC.__file__).resolve()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--out" in res.stdout and "--crops" in res.stdout and "python bench/gpu_check.py" in res.stdout
    probe = ("import runpy, sys; m = runpy.run_path(sys.argv[1]); m['use_this_checkout'](); "
             "import ami.bench.gpu_report as r; print(r.__file__)")
    res = subprocess.run([sys.executable, "-c", probe, str(script)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).resolve() == script.parent / "gpu_report.py"


def test_projection_arithmetic():
    full = GT.projections({"method": "full", "step_s_median": 0.1, "eval_batch_s": 0.5, "eval_batch": 128, "batch": 8})
    assert full["epoch_s"] == pytest.approx(289 * 0.1 + 5 * 0.5)  # 579 validation crops = 5 batches of 128
    assert full["fold_100_epochs_s"] == pytest.approx(100 * full["epoch_s"] + 34 * 0.5)  # 4258 crops = 34 batches
    assert full["five_folds_s"] == pytest.approx(5 * full["fold_100_epochs_s"])
    lin = GT.projections({"method": "linear", "step_s_median": 0.02, "eval_batch_s": 0.1, "eval_batch": 128, "batch": 8})
    assert lin["embeddings_once_s"] == pytest.approx(822 * 0.02)  # 6573 crops = 822 batches of 8
    assert GC.parse_models("uni:lora,edge") == [("uni", "lora"), ("edge", "full")] and GC.parse_models("") is None


H200 = Path(__file__).resolve().parents[1] / "results" / "gpu" / "h200-2026-12-04"


def test_gpu_hours_table_is_the_measured_step_times_times_the_work():
    """The committed GPU-hour table: each row = measured step x 289 steps x 100 epochs x 5 folds,
    recomputed by hand from the committed H200 report for one row, and the file is what the
    generator writes from that JSON today."""
    from ami.bench import gpu_hours as GH

    rep = json.loads((H200 / "gpu-check.json").read_text())
    uni = next(r for r in rep["sections"]["training_steps"]["rows"] if (r["model"], r["method"]) == ("uni", "lora"))
    by_hand = uni["step_s_median"] * 289 * 100 * 5 / 3600
    row = next(r for r in GH.gpu_hours(rep) if (r["model"], r["method"]) == ("uni", "lora"))
    assert row["training_h"] == pytest.approx(by_hand) and row["with_evaluation_h"] == pytest.approx(
        uni["five_folds_s"] / 3600)
    md = GH.to_markdown(rep, "h200-2026-12-04/gpu-check.json")
    assert f"| UNI (lora) | {uni['step_s_median']:.3f} | - | 289 x 100 x 5 | {by_hand:.2f} |" in md
    assert (H200.parent / "gpu-hours.md").read_text() == md  # regenerate with ami-bench gpu-hours
    lin = next(r for r in GH.gpu_hours(rep) if (r["model"], r["method"]) == ("uni", "linear"))
    assert lin["embedding_batches"] == 822 and lin["training_h"] == pytest.approx(822 * lin["step_s"] / 3600)


def test_gpu_hours_refuses_a_report_without_training_rows(tmp_path):
    from typer.testing import CliRunner

    from ami.bench.cli import _register, app

    _register()
    bad = tmp_path / "gc.json"
    bad.write_text(json.dumps({"sections": {"training_steps": {"status": "skipped", "reason": "no CUDA GPU"}}}))
    res = CliRunner().invoke(app, ["gpu-hours", str(bad)])
    assert res.exit_code == 2
    assert "ami-bench gpu-hours: the report holds no measured training step" in res.output
