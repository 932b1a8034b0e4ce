"""ami-bench evaluate: a folder, a CSV with groups and a dataset name, for the shipped ONNX artefact
(torch-free) and for a run directory; its numbers are parity's and table's on the same crops; the
data check finds byte-identical and conflicting crops; user errors are one line and exit 2."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
from typer.testing import CliRunner

from ami.bench import evaluate as E
from ami.runtime.datasets import load_eval_set
from ami.runtime.metrics import auroc, balanced_accuracy, rates
from bench_cli import cli_app

REPO = Path(__file__).resolve().parents[1]
EDGE = REPO / "runtime" / "assets" / "edge.onnx"
FAST = ["--resamples", "200", "--engine", "onnxruntime", "--threads", "1"]




def _run(*args):
    return CliRunner().invoke(cli_app(E), ["evaluate", *map(str, args)])


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _check_point_metrics(rep: dict) -> None:
    """The report's point metrics are the metrics of its own per-crop predictions."""
    y = np.array([r["label"] for r in rep["predictions"]])
    p = np.array([r["probability"] for r in rep["predictions"]])
    want = rates(y, p, rep["model"]["threshold"])
    for k, v in want.items():
        assert rep["all"]["point"][k] == pytest.approx(v, abs=1e-12), k
        lo, hi = rep["all"]["ci"][k]
        assert lo <= v + 1e-12 and v - 1e-12 <= hi, (k, lo, v, hi)


def test_folder_onnx(tmp_path, synthetic_root):
    out = tmp_path / "eval"
    res = _run(EDGE, synthetic_root / "AtNorM-MD", "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    rep = _report(out)
    samples = load_eval_set(synthetic_root, "AtNorM-MD")
    assert rep["crops"] == {"name": "AtNorM-MD", "kind": "folder", "n": len(samples),
                            "atypical": sum(s.label for s in samples), "normal": sum(1 - s.label for s in samples)}
    assert rep["data_check"]["duplicate_groups"] == [] and "deduplicated" not in rep
    assert rep["bootstrap"]["resamples"] == 200 and "stratified" in rep["bootstrap"]["method"]
    _check_point_metrics(rep)
    assert rep["reference"]["source"] == "edge-card.json" and "AMi-Br-test" in rep["reference"]["tests"]
    md = (out / "report.md").read_text()
    assert "| balanced accuracy | " in md and "200 resamples, seed 0" in md and "From `edge-card.json`." in md
    for name in ("roc.svg", "reliability.svg"):
        root = ElementTree.parse(out / name).getroot()  # well-formed SVG with a drawn curve
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert any(e.get("d", "").startswith("M") for e in root.iter("{http://www.w3.org/2000/svg}path"))
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == len(samples)
    # a second run into the same folder needs --overwrite
    res = _run(EDGE, synthetic_root / "AtNorM-MD", "-o", out, *FAST)
    assert res.exit_code == 2 and "--overwrite" in res.output and len(res.output.strip().splitlines()) == 1
    assert _run(EDGE, synthetic_root / "AtNorM-MD", "-o", out, "--overwrite", *FAST).exit_code == 0


def test_csv_with_groups_and_duplicates(tmp_path, synthetic_root):
    """Groups get their own metrics; a byte-identical copy and a copy with the other label are
    reported, and the de-duplicated metrics leave them out."""
    samples = load_eval_set(synthetic_root, "AtNorM-MD")
    crops = tmp_path / "crops"
    crops.mkdir()
    rows = []
    for i, s in enumerate(samples):
        shutil.copy(s.path, crops / f"c{i}.png")
        rows.append((f"crops/c{i}.png", "Atypical" if s.label else "normal", "site-a" if i % 3 else "site-b"))
    atyp = next(i for i, s in enumerate(samples) if s.label)
    norm = next(i for i, s in enumerate(samples) if not s.label)
    shutil.copy(samples[atyp].path, crops / "same.png")  # same bytes, same label: a copy
    shutil.copy(samples[norm].path, crops / "clash.png")  # same bytes, other label: a conflict
    rows += [("crops/same.png", "1", "site-a"), ("crops/clash.png", "1", "site-b")]
    table = tmp_path / "crops.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        w.writerows(rows)
    out = tmp_path / "eval"
    res = _run(EDGE, table, "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    rep = _report(out)
    chk = rep["data_check"]
    assert len(chk["duplicate_groups"]) == 2
    assert sorted(g["conflicting"] for g in chk["duplicate_groups"]) == [False, True]
    assert len(chk["dropped_copies"]) == 1 and len(chk["dropped_conflicts"]) == 2
    assert rep["all"]["n"] == len(samples) + 2 and rep["deduplicated"]["n"] == len(samples) - 1
    kept = [r for r in rep["predictions"] if r["kept_in_deduplicated"]]
    y, p = [r["label"] for r in kept], [r["probability"] for r in kept]
    assert rep["deduplicated"]["point"]["balanced_accuracy"] == pytest.approx(balanced_accuracy(y, p, 0.5), abs=1e-12)
    assert sorted(rep["groups"]) == ["site-a", "site-b"]
    for g, b in rep["groups"].items():
        sub = [r for r in rep["predictions"] if r["group"] == g]
        assert b["n"] == len(sub)
        assert b["point"]["auroc"] == pytest.approx(auroc([r["label"] for r in sub], [r["probability"] for r in sub]))
    md = (out / "report.md").read_text()
    assert "Conflicting labels, same bytes: " in md and "## Per group" in md and "| site-b |" in md


def test_dataset_name_matches_parity(tmp_path, synthetic_root):
    """evaluate's BA / AUROC on a dataset name are ami-bench parity's engine column on the same crops."""
    pytest.importorskip("torch")
    from ami.bench import parity as P

    out = tmp_path / "eval"
    res = _run(EDGE, "AtNorM-MD", "--data-root", synthetic_root, "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    rep = _report(out)
    assert rep["crops"]["kind"] == "dataset" and rep["same_data_as_reference"] == "AtNorM-MD"
    par = P.parity(synthetic_root, engines=[EDGE], weights=P.SHIPPED_WEIGHTS, runtimes=["onnxruntime"], precisions=["fp32"],
                   datasets=["AtNorM-MD"], show_progress=False, threads=1, log=lambda *a: None)
    (row,) = [r for r in par.results if r.dataset == "AtNorM-MD"]
    assert rep["all"]["n"] == row.n and rep["crops"]["atypical"] == row.n_atypical
    assert rep["all"]["point"]["balanced_accuracy"] == pytest.approx(row.engine_ba, abs=1e-12)
    assert rep["all"]["point"]["auroc"] == pytest.approx(row.engine_auroc, abs=1e-12)


def test_artefact_path_is_torch_free(tmp_path, synthetic_root):
    code = ("import sys; from pathlib import Path; from ami.bench import evaluate as E; "
            "s = E.artefact_scorer(Path(sys.argv[1]), 'onnxruntime', threads=1); "
            "r = E.evaluate_set(s, E.load_crop_set(sys.argv[2]), n_boot=100, show=False); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(r['all']['n'])")
    r = subprocess.run([sys.executable, "-c", code, str(EDGE), str(synthetic_root / "AtNorM-MD")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) == len(load_eval_set(synthetic_root, "AtNorM-MD"))


@pytest.mark.parametrize("args, message", [
    (["nowhere/"], "no such folder or CSV, and not a dataset name"),
    (["AtNorM-Br"], "dataset AtNorM-Br is not present"),
])
def test_bad_crops_are_one_line_exit_2(tmp_path, synthetic_root, args, message):
    res = _run(EDGE, *args, "--data-root", synthetic_root, "-o", tmp_path / "o", *FAST)
    assert res.exit_code == 2 and message in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_bad_csv_names_the_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.png,Atypical\nb.png,mitosis\n")
    res = _run(EDGE, bad, "-o", tmp_path / "o", *FAST)
    assert res.exit_code == 2 and "bad.csv, line 3: needs a path and a label" in res.output


def test_unreadable_crop_is_reported_not_fatal(tmp_path, synthetic_root):
    folder = tmp_path / "set"
    shutil.copytree(synthetic_root / "AtNorM-MD", folder)
    (folder / "Normal" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "eval"
    res = _run(EDGE, folder, "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    rep = _report(out)
    assert list(rep["data_check"]["unreadable"]) == [str(folder / "Normal" / "broken.png")]
    assert rep["all"]["n"] == rep["data_check"]["n_files"] - 1


def test_size_warning(tmp_path, synthetic_root):
    from PIL import Image

    folder = tmp_path / "set"
    shutil.copytree(synthetic_root / "AtNorM-MD", folder)
    first = sorted((folder / "Atypical").iterdir())[0]
    Image.open(first).resize((256, 256)).save(first)
    out = tmp_path / "eval"
    assert _run(EDGE, folder, "-o", out, "--mpp", "0.5", *FAST).exit_code == 0
    w = _report(out)["data_check"]["warnings"]
    assert any(x.startswith("1 of ") and "256x256 px (1)" in x for x in w)
    assert any("0.5 um/px, the training crops at 0.25 um/px" in x for x in w)


# -- a run directory ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synthetic_folds_root):
    """A real 1-epoch edge run on 64 training crops, fold 0, every test crop scored by training."""
    torch = pytest.importorskip("torch")
    from ami.train.fit import RunSpec, run

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("evaluate-run")
    spec = RunSpec(model="edge", run_dir=base / "run", data_root=synthetic_folds_root, max_train=64,
                   recipe_overrides={"epochs": 1}, threads=1)
    run(spec, [0], log=lambda *a: None)
    return base / "run"


def test_run_directory_matches_table(tmp_path, tiny_run, synthetic_folds_root):
    """evaluate on a run's fold = ami-bench table's value for that fold on the same test set."""
    from ami.bench.table import collect

    (cfg,) = collect([tiny_run], warn=lambda s: None)
    for args in (["--fold", "0"], []):  # one fold; the ensemble of every finished fold (here: fold 0 only)
        out = tmp_path / f"eval{len(args)}"
        res = _run(tiny_run, "AtNorM-MD", "--data-root", synthetic_folds_root, "-o", out, "--resamples", "200", *args)
        assert res.exit_code == 0, res.output
        rep = _report(out)
        assert rep["model"]["kind"] == "run" and rep["model"]["threshold"] == 0.5
        for metric in ("balanced_accuracy", "auroc"):
            (want,), why = cfg.values("AtNorM-MD", metric)
            assert why is None and rep["all"]["point"][metric] == pytest.approx(want, abs=1e-6)
            assert rep["reference"]["tests"]["AtNorM-MD"][metric] == pytest.approx(want, abs=1e-12)


def test_record_fills_an_absent_set_as_training_would(tmp_path, tiny_run, synthetic_folds_root):
    """--record scores a fold's checkpoint on a set its metrics.json has as absent; the table then
    shows what training recorded for it."""
    from ami.bench.table import collect

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = run / "fold0" / "metrics.json"
    m = json.loads(path.read_text())
    trained = m["tests"]["AtNorM-MD"]
    m["tests"]["AtNorM-MD"] = {"absent": "dataset AtNorM-MD is not present (test)"}
    del m["predictions"]["AtNorM-MD"]
    path.write_text(json.dumps(m))
    res = _run(run, "AtNorM-MD", "--record", "--data-root", synthetic_folds_root)
    assert res.exit_code == 0 and "recorded AtNorM-MD for fold(s) 0" in res.output, res.output
    m = json.loads(path.read_text())
    assert "recorded_after_training" in m["tests"]["AtNorM-MD"]
    assert m["tests"]["AtNorM-MD"]["auroc"] == pytest.approx(trained["auroc"], abs=1e-6)
    (cfg,) = collect([run], warn=lambda s: None)
    assert cfg.values("AtNorM-MD", "balanced_accuracy")[0] == [pytest.approx(trained["balanced_accuracy"], abs=1e-6)]
    res = _run(run, "AtNorM-MD", "--record", "--data-root", synthetic_folds_root)  # nothing absent any more
    assert res.exit_code == 0 and "recorded AtNorM-MD for fold(s) none" in res.output
