"""ami-bench parity: a tiny real run exported with ami.export must pass; the same engine with
perturbed weights must fail and say where; the shipped edge model must pass on the real crops
when it is in the package.

The tiny run is the edge architecture trained for one epoch on 64 training crops (fold 0) of
the generated data in the real layout (conftest's synthetic_folds_root, whose training part is
the pinned folds' crops), so it runs without the real data, in about a minute on a laptop CPU.
Parity uses a class-stratified sample of 64 crops per test set; the shipped-model test uses the
full real sets (int8's balanced-accuracy tolerance of 0.01 is finer than one label flip on a
small sample)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

import onnx
import torch

from ami.bench import common as C
from ami.bench import parity as P
from ami.bench import parity_report as PR
from ami.runtime.artifact import stamp_weights_digest
from ami.runtime.datasets import TEST_SETS, load_eval_set
from bench_cli import cli_app

SAMPLE = 64




def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, synthetic_folds_root):
    """A real (1-epoch, 64-crop) edge run, fold 0, exported to fp32 ONNX by ami.export."""
    from ami.export import export_onnx
    from ami.train.fit import RunSpec, run

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("parity")
    # trained as the shipped model is (bf16 training step on CPU, float32 evaluation and export)
    spec = RunSpec(model="edge", run_dir=base / "run", data_root=synthetic_folds_root, max_train=64, max_eval=32,
                   recipe_overrides={"epochs": 1}, threads=1, amp="bf16")
    run(spec, [0], log=_quiet)
    engine = export_onnx(base / "run", base / "tiny.onnx", folds="0", data_root=synthetic_folds_root, check_crops=16,
                         threads=1, log=_quiet)
    return {"run": base / "run", "engine": Path(engine), "base": base}


@pytest.fixture(scope="module")
def broken(tiny):
    """The tiny engine with every convolution weight perturbed (metadata unchanged but for the weights
    digest, stamped again: this stands for an export that went wrong, which a digest cannot catch;
    a corrupted copy, which it does, is tested in test_infer_faults.py)."""
    m = onnx.load(str(tiny["engine"]))
    rng = np.random.default_rng(0)
    n = 0
    for init in m.graph.initializer:
        if len(init.dims) == 4 and init.data_type == onnx.TensorProto.FLOAT:
            w = onnx.numpy_helper.to_array(init)
            w = w + rng.normal(0.0, 0.5 * float(w.std()) + 1e-3, w.shape).astype(np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
            n += 1
    assert n > 10, "expected the convolution weights of a RegNet"
    path = tiny["base"] / "broken.onnx"
    onnx.save(m, str(path))
    stamp_weights_digest(path)
    return path


# -- tolerances (pure) ---------------------------------------------------------------------------

def test_tolerance_checks():
    fp32 = PR.tolerance_for("fp32")
    ok = PR.evaluate_checks(fp32, d_ba=0.0, d_auroc=5e-5, max_dp=5e-5, flips=0, n=100)
    assert [c.metric for c in ok] == ["labels", "AUROC", "max |Δp|"] and all(c.ok for c in ok)
    bad = PR.evaluate_checks(fp32, d_ba=0.0, d_auroc=-2e-4, max_dp=2e-4, flips=1, n=100)
    assert [c.metric for c in bad if not c.ok] == ["labels", "AUROC", "max |Δp|"]
    assert "1 of 100 differ" in bad[0].text and "> 0.0001" in bad[2].text

    for prec in ("int8", "fp16", "bf16"):
        tol = PR.tolerance_for(prec)
        # reduced precision: label flips and |Δp| are allowed, the task metrics are not
        loose = PR.evaluate_checks(tol, d_ba=0.0099, d_auroc=-0.0049, max_dp=0.3, flips=7, n=100)
        assert [c.metric for c in loose] == ["BA", "AUROC"] and all(c.ok for c in loose)
        tight = PR.evaluate_checks(tol, d_ba=-0.011, d_auroc=0.006, max_dp=0.0, flips=0, n=100)
        assert [c.ok for c in tight] == [False, False]
        assert "|ΔBA| = 0.0110 > 0.01" in tight[0].text
    undefined = PR.evaluate_checks(fp32, d_ba=None, d_auroc=None, max_dp=0.0, flips=0, n=5)
    assert [c.ok for c in undefined] == [True, None, True]  # AUROC undefined: reported, not a pass


def test_sample_crops_is_stratified_and_deterministic(synthetic_root):
    from ami.runtime.sampling import stratified_subset

    s = load_eval_set(synthetic_root, "AtNorM-MD")
    a, b = stratified_subset(s, SAMPLE), stratified_subset(s, SAMPLE)
    assert [x.name for x in a] == [x.name for x in b] and len(a) == SAMPLE
    frac = sum(x.label for x in s) / len(s)
    assert abs(sum(x.label for x in a) - frac * SAMPLE) <= 1
    assert stratified_subset(s, 0) == list(s)


def test_engine_without_pytorch_side_is_refused(tmp_path):
    with pytest.raises(P.ParityError, match="--run DIR"):
        P.parity(tmp_path, engines=[tmp_path / "x.onnx"])
    with pytest.raises(P.ParityError, match="either --run or --weights"):
        P.parity(tmp_path, engines=[tmp_path / "x.onnx"], run=tmp_path, weights=tmp_path / "w.safetensors")


# -- the tiny exported model ---------------------------------------------------------------------

def test_pytorch_side_reproduces_the_runs_own_predictions(tiny, synthetic_folds_root):
    """The PyTorch model rebuilt from the run gives the probabilities training recorded."""
    rec = json.loads((tiny["run"] / "fold0" / "metrics.json").read_text())["predictions"]["AtNorM-MD"]
    by_name = {s.name: s for s in load_eval_set(synthetic_folds_root, "AtNorM-MD")}
    samples = [by_name[r[0]] for r in rec]
    models, cfg, _ = C.build_run_models(tiny["run"], [0])
    ref = P.TorchReference(models, cfg.preprocess, "fold 0")
    p = ref.predict(C.decode_crops([s.path for s in samples], cfg.preprocess, show=False), show=False)
    # the run scored its predictions on the device it trained on: float32 on a CPU (2e-6: the recorded six
    # decimals and summation order); on CUDA under the run's bf16 autocast (4.2e-5 measured on an H200)
    trained_on = json.loads((tiny["run"] / "config.json").read_text())["device"]
    assert np.abs(p - np.array([r[2] for r in rec])).max() <= (2e-6 if trained_on == "cpu" else 5e-4)


def _variants() -> list[tuple[str, str]]:
    """(engine title, precision) rows parity makes for an fp32 ONNX file on this machine."""
    from ami.runtime.engines import backends

    return [(b.title, q) for b in backends() if b.accepts("x.onnx") and b.unavailable() is None
            for q in b.precisions("fp32")]


def test_tiny_fp32_engine_passes(tiny, synthetic_folds_root):
    # fp32 only: a 1-epoch model's probabilities crowd around 0.5, where bf16 rounding reorders them
    # (its AUROC moves ~0.01 on 64 crops); bf16 is checked on the shipped model, on the full sets.
    rep = P.parity(synthetic_folds_root, run=tiny["run"], engines=[tiny["engine"]], max_crops=SAMPLE, threads=1,
                   show_progress=False, keep_predictions=True, precisions=["fp32"], log=_quiet)
    assert rep.ok, rep.failures()
    present = [ds for ds in TEST_SETS if (synthetic_folds_root / ("AMi-Br" if ds == "AMi-Br-test" else ds)).is_dir()]
    variants = [v for v in _variants() if v[1] == "fp32"]
    assert ("ONNX Runtime", "fp32") in variants
    assert [r.dataset for r in rep.results] == [ds for ds in present for _ in variants]
    assert "AMi-Br-test" in present and "AtNorM-MD" in present
    for ds in set(TEST_SETS) - set(present):
        assert "not present" in rep.absent[ds]
    assert [(i.name, i.precision) for i in rep.engines] == [(f"tiny.onnx / {t}", q) for t, q in variants]
    for info in rep.engines:
        assert info.artefact_precision == "fp32" and info.folds == [0] and "match" in info.provenance
    for r in rep.results:
        assert r.n == SAMPLE and 0 < r.n_atypical < SAMPLE
        assert r.precision == "fp32"  # ONNX Runtime and OpenVINO f32: the strict limits
        assert [c.metric for c in r.checks] == ["labels", "AUROC", "max |Δp|"]
        assert r.n_flips == 0 and r.agreement == 1.0 and r.max_abs_dp <= 1e-4
        assert r.torch_auroc is not None and abs(r.d_auroc) <= 1e-4
        pr = r.predictions
        assert len(pr["names"]) == SAMPLE
        assert r.max_abs_dp == pytest.approx(np.abs(np.array(pr["torch"]) - np.array(pr["engine"])).max())
    # the three renderings
    d = json.loads(rep.to_json())
    assert d["verdict"] == "pass" and d["failures"] == [] and d["schema"] == PR.SCHEMA
    md = rep.to_markdown()
    assert "| AMi-Br-test | tiny.onnx / ONNX Runtime | fp32 |" in md and "PASS on AMi-Br-test" in md
    rows = rep.to_csv().splitlines()
    assert rows[0].startswith("dataset,engine,precision,status")
    assert len(rows) == 1 + len(present) * len(variants) + len(set(TEST_SETS) - set(present))


def test_perturbed_engine_fails_and_names_dataset_and_metric(tiny, broken, synthetic_folds_root, tmp_path):
    from typer.testing import CliRunner

    out = tmp_path / "parity.json"
    res = CliRunner().invoke(cli_app(P), ["parity", "--data-root", str(synthetic_folds_root), "--run", str(tiny["run"]),
                                          "--model", str(tiny["engine"]), "--model", str(broken), "--max-crops",
                                          str(SAMPLE), "--threads", "1", "--format", "json", "-o", str(out),
                                          "--precision", "fp32"])
    assert res.exit_code == 1, res.output
    text = res.output
    for title, _ in {v for v in _variants() if v[1] == "fp32"}:  # every installed engine fails the broken file
        assert f"tiny.onnx / {title} (fp32): PASS" in text
        assert f"broken.onnx / {title} (fp32): FAIL on AMi-Br-test" in text
    assert "AtNorM-MD" in text and "max |Δp| = " in text and "PARITY FAILED" in text
    d = json.loads(out.read_text())
    assert d["verdict"] == "fail"
    assert any(f.startswith("broken.onnx / ONNX Runtime (fp32) on AMi-Br-test: max |Δp|") for f in d["failures"])
    assert any(f.startswith("broken.onnx / ONNX Runtime (fp32) on AtNorM-MD: max |Δp|") for f in d["failures"])
    assert not any(f.startswith("tiny.onnx") for f in d["failures"])
    status = {(r["dataset"], r["engine"]): r["status"] for r in d["results"]}
    assert status[("AMi-Br-test", "tiny.onnx / ONNX Runtime")] == "pass"
    assert status[("AMi-Br-test", "broken.onnx / ONNX Runtime")] == "fail"
    assert {r["precision"] for r in d["results"]} == {"fp32"}  # --precision fp32: no bf16 rows


def test_missing_run_weights_is_a_setup_error(tiny, tmp_path, synthetic_folds_root):
    from typer.testing import CliRunner

    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    (run / "fold0" / "best.safetensors").unlink()
    res = CliRunner().invoke(cli_app(P), ["parity", "--data-root", str(synthetic_folds_root), "--run", str(run),
                                          "--model", str(tiny["engine"]), "--max-crops", "8"])
    assert res.exit_code == 2 and "best.safetensors" in res.output


# -- the shipped edge model ----------------------------------------------------------------------

def test_shipped_edge_model_parity(data_root):
    fp32 = C.SHIPPED_ENGINES[0]
    if not fp32.is_file():
        pytest.skip(f"the shipped edge model is not in the package yet ({fp32.name} missing from {fp32.parent})")
    assert C.SHIPPED_WEIGHTS.is_file(), (f"{fp32.name} ships without its PyTorch weights {C.SHIPPED_WEIGHTS.name}: "
                                         "its parity cannot be checked")
    rep = P.parity(data_root, max_crops=0, show_progress=False, log=_quiet)
    assert rep.ok, "\n".join(rep.verdict_lines())
    got = {(e.name, e.precision) for e in rep.engines}
    assert ("edge.onnx / ONNX Runtime", "fp32") in got
    for title, q in _variants():  # every installed engine, every precision it offers here
        assert (f"edge.onnx / {title}", q) in got
    if C.SHIPPED_ENGINES[1].is_file():
        assert ("edge-int8.onnx / ONNX Runtime", "int8") in got
        if ("OpenVINO", "fp32") in _variants():
            assert ("edge-int8.onnx / OpenVINO", "int8") in got
    checked = {r.dataset for r in rep.results}
    assert checked == set(TEST_SETS)  # all three sets (the real data holds AtNorM-Br)


def test_engines_are_enumerated_from_the_registry(tmp_path, monkeypatch):
    """Each file on every installed engine that takes it, at each precision; named engines must exist."""
    from ami.runtime.engines import backend
    from onnx_factory import write_model

    m = write_model(tmp_path / "m.onnx")
    engines, notes = C.load_variants([m], threads=1, error=P.ParityError)
    assert [(e.engine, e.precision) for e in engines] == [
        (n, q) for n in ("onnxruntime", "openvino") if backend(n).unavailable() is None
        for q in backend(n).precisions("fp32")]
    with pytest.raises(P.ParityError, match="unknown engine 'npu'"):
        C.load_variants([m], runtimes=["npu"], error=P.ParityError)
    engines, notes = C.load_variants([m], runtimes=["onnxruntime"], precisions=["fp32", "bf16"], error=P.ParityError)
    assert [e.precision for e in engines] == ["fp32"]
    assert any("bf16 not available" in n for n in notes)
    monkeypatch.setattr(type(backend("openvino")), "unavailable", lambda self: "OpenVINO is not installed (test)")
    engines, notes = C.load_variants([m], error=P.ParityError)
    assert [e.engine for e in engines] == ["onnxruntime"]
    assert any("OpenVINO is not installed here" in n and "not checked" in n for n in notes)
    with pytest.raises(P.ParityError, match=r"OpenVINO cannot run m\.onnx here: OpenVINO is not installed"):
        C.load_variants([m], runtimes=["openvino"], error=P.ParityError)
