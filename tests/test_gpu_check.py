"""ami-bench gpu-check: the prepared device check runs green on a CPU-only machine (every GPU part
skipped with its reason), and its GPU code runs end to end in the CPU rehearsal (tiny stand-ins)."""

from __future__ import annotations

import importlib
import json

import pytest

from ami.bench import gpu_check as GC

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
    assert list(rep["sections"]) == list(GC.SECTIONS)  # the order
    env = rep["sections"]["environment"]
    assert env["status"] == "info"
    d = env["data"]
    assert d["torch"]["cuda_available"] is False and d["versions"]["onnxruntime"]
    assert d["onnxruntime_providers"]["CPUExecutionProvider"] == "loads"
    assert "libnvinfer_loads" in d["tensorrt"] and d["tensorrt"]["libnvinfer"]
    for key in GC.SECTIONS[1:]:
        sec = rep["sections"][key]
        assert sec["status"] == "skipped" and "no CUDA GPU" in sec["reason"], (key, sec)
    assert "TensorRT" in rep["sections"]["tensorrt_round_trip"]["reason"]
    md = (tmp_path / "gc" / "gpu-check.md").read_text()
    positions = [md.index(f"## {GC.TITLES[k]}") for k in GC.SECTIONS]
    assert positions == sorted(positions)
    assert md.count("Status: **skipped**") == 4


def test_cpu_rehearsal_runs_the_gpu_code(tmp_path):
    """--device cpu: the same code as on a GPU (torch_runner, run_latency, timed training steps and
    their projections) with tiny stand-ins on the CPU; TensorRT skipped with its reason here."""
    rc = GC.main(["--out", str(tmp_path / "r"), "--device", "cpu", "--only",
                  "pytorch_cuda,tensorrt_round_trip,latency,training_steps", "--models", "uni:linear,uni:lora"])
    rep = json.loads((tmp_path / "r" / "gpu-check.json").read_text())
    secs = rep["sections"]
    assert rc == (1 if rep["status"] == "fail" else 0)
    assert rep["rehearsal"] and secs["environment"]["status"] == "skipped"  # not selected
    p = secs["pytorch_cuda"]
    assert p["status"] == "pass", p
    assert [b["batch"] for b in p["batches"]] == list(GC.ROUND_TRIP_BATCHES) and p["max_abs_dp"] <= 1e-4
    t = secs["tensorrt_round_trip"]
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        assert t["status"] == "skipped" and "tensorrt" in t["reason"].lower()
    lat = secs["latency"]
    assert lat["status"] == "pass", lat
    assert lat["rows"] >= 2 and (tmp_path / "r" / "latency.json").is_file()
    tr = secs["training_steps"]
    assert tr["status"] == "pass", tr
    rows = {(r["model"], r["method"]): r for r in tr["rows"]}
    assert set(rows) == {("uni", "linear"), ("uni", "lora")}
    lin, lora = rows["uni", "linear"], rows["uni", "lora"]
    assert lin["steps"] == 2 and lin["step_s_median"] > 0 and lin["embeddings_once_s"] > 0
    assert lora["params_trainable"] < lora["params"]  # adapters + head only
    assert lora["fold_100_epochs_s"] == pytest.approx(
        100 * lora["epoch_s"] + -(-GC.FINAL_EVAL_CROPS // lora["eval_batch"]) * lora["eval_batch_s"])
    md = (tmp_path / "r" / "gpu-check.md").read_text()
    assert "CPU REHEARSAL" in md and "TINY STAND-INS" in md and "one fold, 100 epochs" in md


def test_projection_arithmetic():
    full = GC.projections({"method": "full", "step_s_median": 0.1, "eval_batch_s": 0.5, "eval_batch": 128, "batch": 8})
    assert full["epoch_s"] == pytest.approx(289 * 0.1 + 5 * 0.5)  # 579 validation crops = 5 batches of 128
    assert full["fold_100_epochs_s"] == pytest.approx(100 * full["epoch_s"] + 34 * 0.5)  # 4258 crops = 34 batches
    assert full["five_folds_s"] == pytest.approx(5 * full["fold_100_epochs_s"])
    lin = GC.projections({"method": "linear", "step_s_median": 0.02, "eval_batch_s": 0.1, "eval_batch": 128, "batch": 8})
    assert lin["embeddings_once_s"] == pytest.approx(822 * 0.02)  # 6573 crops = 822 batches of 8
    assert GC.parse_models("uni:lora,edge") == [("uni", "lora"), ("edge", "full")] and GC.parse_models("") is None
