"""ami-bench parity on real crops: a tiny real run exported with ami.export must pass; the same
engine with perturbed weights must fail and say where; the shipped edge model must pass when it
is in the package.

The tiny run is the edge architecture trained for one epoch on 64 AMi-Br training crops (fold 0),
so the whole file runs in about a minute on a laptop CPU. Parity uses a class-stratified sample
of 64 crops per test set; the shipped-model test uses the full sets (int8's balanced-accuracy
tolerance of 0.01 is finer than one label flip on a small sample).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from ami.bench import parity as P  # noqa: E402
from ami.runtime.datasets import TEST_SETS, load_eval_set  # noqa: E402
from ami.runtime.artifact import stamp_weights_digest  # noqa: E402

SAMPLE = 64


def cli_app(module):
    import typer

    app = typer.Typer(add_completion=False, rich_markup_mode=None)

    @app.callback()
    def _root():
        pass

    module.register(app)
    return app


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_root):
    """A real (1-epoch, 64-crop) edge run, fold 0, exported to fp32 ONNX by ami.export."""
    from ami.export import export_onnx
    from ami.train.fit import RunSpec, run

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("parity")
    # trained as the shipped model is (bf16 training step on CPU, float32 evaluation and export)
    spec = RunSpec(model="edge", run_dir=base / "run", data_root=data_root, max_train=64, max_eval=32,
                   recipe_overrides={"epochs": 1}, threads=1, amp="bf16")
    run(spec, [0], log=_quiet)
    engine = export_onnx(base / "run", base / "tiny.onnx", folds="0", data_root=data_root, check_crops=16, threads=1,
                         log=_quiet)
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
    fp32 = P.tolerance_for("fp32")
    ok = P.evaluate_checks(fp32, d_ba=0.0, d_auroc=5e-5, max_dp=5e-5, flips=0, n=100)
    assert [c.metric for c in ok] == ["labels", "AUROC", "max |Δp|"] and all(c.ok for c in ok)
    bad = P.evaluate_checks(fp32, d_ba=0.0, d_auroc=-2e-4, max_dp=2e-4, flips=1, n=100)
    assert [c.metric for c in bad if not c.ok] == ["labels", "AUROC", "max |Δp|"]
    assert "1 of 100 differ" in bad[0].text and "> 0.0001" in bad[2].text

    for prec in ("int8", "fp16", "bf16"):
        tol = P.tolerance_for(prec)
        # reduced precision: label flips and |Δp| are allowed, the task metrics are not
        loose = P.evaluate_checks(tol, d_ba=0.0099, d_auroc=-0.0049, max_dp=0.3, flips=7, n=100)
        assert [c.metric for c in loose] == ["BA", "AUROC"] and all(c.ok for c in loose)
        tight = P.evaluate_checks(tol, d_ba=-0.011, d_auroc=0.006, max_dp=0.0, flips=0, n=100)
        assert [c.ok for c in tight] == [False, False]
        assert "|ΔBA| = 0.0110 > 0.01" in tight[0].text
    undefined = P.evaluate_checks(fp32, d_ba=None, d_auroc=None, max_dp=0.0, flips=0, n=5)
    assert [c.ok for c in undefined] == [True, None, True]  # AUROC undefined: reported, not a pass


def test_sample_crops_is_stratified_and_deterministic(data_root):
    s = load_eval_set(data_root, "AtNorM-MD")
    a, b = P.sample_crops(s, SAMPLE), P.sample_crops(s, SAMPLE)
    assert [x.name for x in a] == [x.name for x in b] and len(a) == SAMPLE
    frac = sum(x.label for x in s) / len(s)
    assert abs(sum(x.label for x in a) - frac * SAMPLE) <= 1
    assert P.sample_crops(s, 0) == list(s)


def test_engine_without_pytorch_side_is_refused(tmp_path):
    with pytest.raises(P.ParityError, match="--run DIR"):
        P.parity(tmp_path, engines=[tmp_path / "x.onnx"])
    with pytest.raises(P.ParityError, match="either --run or --weights"):
        P.parity(tmp_path, engines=[tmp_path / "x.onnx"], run=tmp_path, weights=tmp_path / "w.safetensors")


# -- the tiny exported model ---------------------------------------------------------------------

def test_pytorch_side_reproduces_the_runs_own_predictions(tiny, data_root):
    """The PyTorch model rebuilt from the run gives the probabilities training recorded."""
    rec = json.loads((tiny["run"] / "fold0" / "metrics.json").read_text())["predictions"]["AtNorM-MD"]
    by_name = {s.name: s for s in load_eval_set(data_root, "AtNorM-MD")}
    samples = [by_name[r[0]] for r in rec]
    models, cfg, _ = P.build_run_models(tiny["run"], [0])
    ref = P.TorchReference(models, cfg.preprocess, "fold 0")
    p = ref.predict(P.decode_pixels(samples, cfg.preprocess, show=False), show=False)
    assert np.abs(p - np.array([r[2] for r in rec])).max() <= 2e-6


def test_tiny_fp32_engine_passes(tiny, data_root):
    rep = P.parity(data_root, run=tiny["run"], engines=[tiny["engine"]], max_crops=SAMPLE, threads=1,
                   show_progress=False, keep_predictions=True, log=_quiet)
    assert rep.ok, rep.failures()
    present = [ds for ds in TEST_SETS if (data_root / ("AMi-Br" if ds == "AMi-Br-test" else ds)).is_dir()]
    assert [r.dataset for r in rep.results] == present and "AMi-Br-test" in present and "AtNorM-MD" in present
    for ds in set(TEST_SETS) - set(present):
        assert "not present" in rep.absent[ds]
    (info,) = rep.engines
    assert info.precision == "fp32" and info.folds == [0] and "match" in info.provenance
    for r in rep.results:
        assert r.n == SAMPLE and 0 < r.n_atypical < SAMPLE and r.precision == "fp32"
        assert [c.metric for c in r.checks] == ["labels", "AUROC", "max |Δp|"]
        assert r.n_flips == 0 and r.agreement == 1.0 and r.max_abs_dp <= 1e-4
        assert r.torch_auroc is not None and abs(r.d_auroc) <= 1e-4
        pr = r.predictions
        assert len(pr["names"]) == SAMPLE
        assert r.max_abs_dp == pytest.approx(np.abs(np.array(pr["torch"]) - np.array(pr["engine"])).max())
    # the three renderings
    d = json.loads(rep.to_json())
    assert d["verdict"] == "pass" and d["failures"] == [] and d["schema"] == P.SCHEMA
    md = rep.to_markdown()
    assert "| AMi-Br-test | tiny.onnx | fp32 |" in md and "PASS on AMi-Br-test" in md
    rows = rep.to_csv().splitlines()
    assert rows[0].startswith("dataset,engine,precision,status") and len(rows) == 1 + len(TEST_SETS)


def test_perturbed_engine_fails_and_names_dataset_and_metric(tiny, broken, data_root, tmp_path):
    from typer.testing import CliRunner

    out = tmp_path / "parity.json"
    res = CliRunner().invoke(cli_app(P), ["parity", "--data-root", str(data_root), "--run", str(tiny["run"]),
                                          "--engine", str(tiny["engine"]), "--engine", str(broken), "--max-crops",
                                          str(SAMPLE), "--threads", "1", "--format", "json", "-o", str(out)])
    assert res.exit_code == 1, res.output
    text = res.output
    assert "tiny.onnx (fp32): PASS" in text
    assert "broken.onnx (fp32): FAIL on AMi-Br-test" in text and "AtNorM-MD" in text
    assert "max |Δp| = " in text and "PARITY FAILED" in text
    d = json.loads(out.read_text())
    assert d["verdict"] == "fail"
    assert any(f.startswith("broken.onnx (fp32) on AMi-Br-test: max |Δp|") for f in d["failures"])
    assert any(f.startswith("broken.onnx (fp32) on AtNorM-MD: max |Δp|") for f in d["failures"])
    assert not any(f.startswith("tiny.onnx") for f in d["failures"])
    status = {(r["dataset"], r["engine"]): r["status"] for r in d["results"]}
    assert status[("AMi-Br-test", "tiny.onnx")] == "pass" and status[("AMi-Br-test", "broken.onnx")] == "fail"


def test_missing_run_weights_is_a_setup_error(tiny, tmp_path, data_root):
    from typer.testing import CliRunner

    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    (run / "fold0" / "best.safetensors").unlink()
    res = CliRunner().invoke(cli_app(P), ["parity", "--data-root", str(data_root), "--run", str(run), "--engine",
                                          str(tiny["engine"]), "--max-crops", "8"])
    assert res.exit_code == 2 and "best.safetensors" in res.output


# -- the shipped edge model ----------------------------------------------------------------------

def test_shipped_edge_model_parity(data_root):
    fp32 = P.SHIPPED_ENGINES[0]
    if not fp32.is_file():
        pytest.skip(f"the shipped edge model is not in the package yet ({fp32.name} missing from {fp32.parent})")
    assert P.SHIPPED_WEIGHTS.is_file(), (f"{fp32.name} ships without its PyTorch weights {P.SHIPPED_WEIGHTS.name}: "
                                         "its parity cannot be checked")
    rep = P.parity(data_root, max_crops=0, show_progress=False, log=_quiet)
    assert rep.ok, "\n".join(rep.verdict_lines())
    names = {e.name: e.precision for e in rep.engines}
    assert names.get("edge.onnx") == "fp32"
    if P.SHIPPED_ENGINES[1].is_file():
        assert names.get("edge-int8.onnx") == "int8"
    checked = {r.dataset for r in rep.results}
    assert {"AMi-Br-test", "AtNorM-MD"} <= checked
