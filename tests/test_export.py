"""ami-export on CPU: ONNX export of a real (tiny) training run, its self-checks, int8, --best.

The run is a real ``ami.train.fit`` run of the edge model (1 epoch, 2 folds) on generated crops in
the real layout whose training part is the pinned folds' crops (conftest's synthetic_folds_root);
every check runs on those training crops, so no real data is needed. A failing export must leave nothing
behind and keep whatever the user had at the output path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from ami.export import ExportError, onnx_file
from ami.export import onnx_export as OE
from ami.export.checks import CheckFailed, load_images, session, training_samples, validate_contract
from ami.export.cli import app
from ami.export.quantize import int8_verdict
from ami.export.source import choose_threshold, pick_best, resolve_source
from ami.runtime.artifact import META_KEY, ArtifactMeta
from ami.runtime.metrics import best_threshold
from ami.runtime.sampling import stratified_subset as stratified

FAST = dict(check_crops=16, check_batch=8, threads=1)
runner = CliRunner()


def _meta_of(path: Path) -> ArtifactMeta:
    s = session(path, 1)
    return ArtifactMeta.from_json(s.get_modelmeta().custom_metadata_map[META_KEY])


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_folds_root):
    """A real 2-fold run of the edge model (32 training crops, 1 epoch, 32 validation crops)."""
    import torch

    from ami.train.fit import RunSpec, run

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("runs") / "edge-tiny"
    spec = RunSpec(model="edge", run_dir=d, data_root=synthetic_folds_root, max_train=32, max_eval=32,
                   recipe_overrides={"epochs": 1, "batch_size": 32}, eval_sets=(), threads=1)
    run(spec, [0, 1], log=lambda *a: None)
    return d


@pytest.fixture(scope="module")
def images(synthetic_folds_root):
    from ami.train.registry import get

    return load_images(stratified(training_samples(synthetic_folds_root), 5, seed=7), get("edge").preprocess)


def _torch_probs(run_dir, folds, images):
    from ami.export.ensemble import reference_probs
    from ami.train.foldmodel import load_fold_model

    src = resolve_source(run_dir, ",".join(map(str, folds)))
    return [reference_probs([load_fold_model(run_dir, f)], src.cfg.preprocess, images) for f in folds]


# ---------------------------------------------------------------------------------------------
# ONNX export


def test_single_fold_export_metadata_and_batches(run_dir, synthetic_folds_root, images, tmp_path):
    out = tmp_path / "fold0.onnx"
    got = OE.export_onnx(run_dir / "fold0", out, data_root=synthetic_folds_root, **FAST, log=lambda *a: None)
    assert got == out and out.is_file() and not _leftovers(tmp_path)
    m = onnx.load(str(out))
    assert m.opset_import[0].version >= 17
    meta = validate_contract(out)
    # metadata round-trips through ArtifactMeta (as written == as read by onnxruntime)
    raw = {p.key: p.value for p in m.metadata_props}[META_KEY]
    assert ArtifactMeta.from_json(raw).to_json() == raw
    assert _meta_of(out).to_json() == raw
    assert meta.model == "edge" and meta.method == "full" and meta.folds == [0] and meta.precision == "fp32"
    assert meta.head_modules == ["head.fc"]  # the run's own registry entry's head, for the int8 step
    split = json.loads((run_dir / "split.json").read_text())
    assert meta.source["folds_sha256"] == split["folds_sha256"]
    assert meta.source["train_fingerprint"] == split["train_fingerprint"]
    assert meta.source["run"] == run_dir.name and len(meta.source["weights_sha256"]["0"]) == 64
    val = json.loads((run_dir / "fold0" / "metrics.json").read_text())["validation"]
    assert meta.validation["folds"]["0"]["balanced_accuracy"] == val["balanced_accuracy"]
    assert not any("test" in k.lower() for k in meta.validation["folds"]["0"])
    assert meta.extra["self_check"]["max_abs_diff"] <= 1e-4 and meta.extra["self_check"]["batch_sizes"][0] == 1
    for key in ("torch", "onnx", "onnxruntime", "ami"):
        assert meta.versions[key]
    # dynamic batch: 1 and N against PyTorch
    ref = _torch_probs(run_dir, [0], images)[0]
    s = session(out, 1)
    p1 = np.concatenate([s.run(None, {"pixels": images[i:i + 1]})[0] for i in range(len(images))])
    pn = s.run(None, {"pixels": images})[0]
    assert pn.shape == (len(images),) and pn.dtype == np.float32
    assert np.abs(p1 - ref).max() <= 1e-4 and np.abs(pn - ref).max() <= 1e-4


def test_ensemble_is_mean_of_fold_probabilities(run_dir, synthetic_folds_root, images, tmp_path):
    out = tmp_path / "ens.onnx"
    OE.export_onnx(run_dir, out, folds="all", data_root=synthetic_folds_root, **FAST, log=lambda *a: None)
    meta = _meta_of(out)
    assert meta.folds == [0, 1] and "2-fold ensemble" in meta.display
    assert sorted(meta.validation["folds"]) == ["0", "1"]
    p0, p1 = _torch_probs(run_dir, [0, 1], images)
    got = session(out, 1).run(None, {"pixels": images})[0]
    np.testing.assert_allclose(got, (p0 + p1) / 2, atol=1e-5)
    # the runtime's own loader reads it (if that engineer's module is present)
    engine = pytest.importorskip("ami.runtime.engines")
    eng = engine.load_engine(out, provider="cpu", threads=1)
    np.testing.assert_allclose(eng.predict(images), got, atol=1e-6)
    assert eng.threshold == meta.threshold


def test_threshold_comes_from_validation_only(run_dir):
    from ami.runtime.metrics import cross_validated_threshold

    src = resolve_source(run_dir, "all")
    t, rule, det = choose_threshold(src)
    folds = [(np.array([r[1] for r in src.metrics[k]["predictions"]["validation"]]),
              np.array([r[2] for r in src.metrics[k]["predictions"]["validation"]])) for k in ("0", "1")]
    y, p = np.concatenate([f[0] for f in folds]), np.concatenate([f[1] for f in folds])
    bt, _ = best_threshold(y, p)
    if cross_validated_threshold(folds)["tuned_beats_0.5"] and bt != 0.5:
        assert t == bt and rule.startswith("validation")
    else:
        assert t == 0.5 and rule.startswith("default 0.5")
    assert det["n"] == len(y) and det["folds"] == [0, 1]
    t2, rule2, _ = choose_threshold(src, 0.3)
    assert t2 == 0.3 and "user-specified" in rule2
    with pytest.raises(ExportError):
        choose_threshold(src, 1.5)


def test_threshold_rule_cases(tmp_path):
    from ami.export.source import RunSource

    def src(*folds):
        return RunSource(tmp_path, {"model": "edge", "method": "full"}, {}, list(range(len(folds))),
                         {str(k): {"predictions": {"validation": rows}} for k, rows in enumerate(folds)})

    good = [["a", 0, 0.1], ["b", 0, 0.4], ["c", 1, 0.6], ["d", 1, 0.9]]
    low = [["a", 0, 0.1], ["b", 0, 0.2], ["c", 1, 0.3], ["d", 1, 0.4]]  # every atypical crop below 0.5
    # 0.5 is already the best: default kept
    t, rule, _ = choose_threshold(src(good, good))
    assert t == 0.5 and rule.startswith("default 0.5")
    # a lower threshold tuned on one fold also wins on the other: adopted, and the rule says why
    t, rule, det = choose_threshold(src(low, low))
    assert t == pytest.approx(0.3) and rule.startswith("validation") and det["cross_validated"]["tuned_beats_0.5"]
    # one fold alone cannot show that a tuned threshold generalises: 0.5 stays
    t, rule, _ = choose_threshold(src(low))
    assert t == 0.5 and "at least two folds" in rule
    # no predictions at all
    t, rule, _ = choose_threshold(src([]))
    assert t == 0.5 and "no validation predictions" in rule


def test_wrong_model_is_refused_and_nothing_is_lost(run_dir, synthetic_folds_root, tmp_path, monkeypatch):
    import torch

    real = OE._torch_export

    def tampered(graph, path, size, opset):  # the exported weights differ from the checked model
        import copy

        g = copy.deepcopy(graph)
        with torch.no_grad():
            for p in g.folds[0].parameters():
                p.add_(0.05 * torch.randn_like(p))
        real(g, path, size, opset)

    monkeypatch.setattr(OE, "_torch_export", tampered)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's precious file")
    with pytest.raises(CheckFailed, match=r"max \|delta probability\|"):
        OE.export_onnx(run_dir / "fold0", out, data_root=synthetic_folds_root, force=True, **FAST, log=lambda *a: None)
    assert out.read_bytes() == b"the user's precious file"
    assert not _leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_large_models_use_external_data(run_dir, synthetic_folds_root, tmp_path, monkeypatch):
    """Above the size limit (2 GB; lowered here) the weights go to OUT.data beside OUT, and both
    are moved into place together."""
    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_BYTES", 1000)
    out = tmp_path / "big.onnx"
    OE.export_onnx(run_dir / "fold0", out, data_root=synthetic_folds_root, **FAST, log=lambda *a: None)
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and data.stat().st_size > 5 * out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert validate_contract(out).folds == [0]
    x = np.zeros((2, 128, 128, 3), np.uint8)
    assert session(out, 1).run(None, {"pixels": x})[0].shape == (2,)


def test_existing_output_needs_force(run_dir, synthetic_folds_root, tmp_path):
    out = tmp_path / "x.onnx"
    out.write_text("keep")
    with pytest.raises(ExportError, match="already exists"):
        OE.export_onnx(run_dir / "fold0", out, data_root=synthetic_folds_root, **FAST, log=lambda *a: None)
    assert out.read_text() == "keep"


def test_bad_weights_are_refused_clearly(run_dir, synthetic_folds_root, tmp_path):
    from ami.train.registry import get

    bad = tmp_path / "bad-run"
    shutil.copytree(run_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"] = "efficientnetv2_m"  # weights of a RegNet, config says EfficientNetV2
    cfg["registry_entry"] = get("efficientnetv2_m").to_dict()
    cfg["tiny_stand_in"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="do not fit"):
        OE.export_onnx(bad / "fold0", tmp_path / "o.onnx", data_root=synthetic_folds_root, **FAST, log=lambda *a: None)
    (bad / "fold1" / "best.safetensors").write_bytes(b"\0" * 10)
    cfg["model"], cfg["tiny_stand_in"], cfg["registry_entry"] = "edge", False, get("edge").to_dict()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="unreadable weights"):
        OE.export_onnx(bad / "fold1", tmp_path / "o.onnx", data_root=synthetic_folds_root, **FAST, log=lambda *a: None)
    assert not (tmp_path / "o.onnx").exists() and not _leftovers(tmp_path)


def test_source_errors(run_dir, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        resolve_source(tmp_path / "nope")
    with pytest.raises(ExportError, match="not a training run"):
        resolve_source(tmp_path)
    with pytest.raises(ExportError, match="fold 3 of"):
        resolve_source(run_dir, "3")
    with pytest.raises(ExportError, match="--folds"):
        resolve_source(run_dir, "7")
    assert resolve_source(run_dir, "all").folds == [0, 1]
    assert resolve_source(run_dir / "fold1").folds == [1]


# ---------------------------------------------------------------------------------------------
# broken and foreign ONNX files


@pytest.fixture(scope="module")
def float_model(run_dir, synthetic_folds_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("float") / "fold1.onnx"
    OE.export_onnx(run_dir / "fold1", out, data_root=synthetic_folds_root, **FAST, log=lambda *a: None)
    return out


def test_corrupt_truncated_and_foreign_onnx_are_refused(float_model, synthetic_folds_root, tmp_path):
    data = float_model.read_bytes()
    cases = {
        "truncated.onnx": (data[: len(data) // 3], "truncated or corrupt|no graph|checker"),
        "garbage.onnx": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "truncated or corrupt|no graph|checker"),
        "empty.onnx": (b"", "empty"),
    }
    for name, (blob, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(ExportError, match=msg):
            OE.export_onnx(p, tmp_path / "q.onnx", engine="onnx-int8", data_root=synthetic_folds_root,
                           log=lambda *a: None)
        r = runner.invoke(app, [str(p), "--engine", "onnx-int8", "-o", str(tmp_path / "q.onnx"),
                                "--data-root", str(synthetic_folds_root)])
        assert r.exit_code != 0 and "error:" in r.output
    # a valid ONNX model without ami metadata
    m = onnx.load(str(float_model))
    del m.metadata_props[:]
    p = tmp_path / "foreign.onnx"
    onnx.save(m, str(p))
    with pytest.raises(ExportError, match="not an ami artefact"):
        OE.export_onnx(p, tmp_path / "q.onnx", engine="onnx-int8", data_root=synthetic_folds_root,
                       log=lambda *a: None)
    assert not (tmp_path / "q.onnx").exists() and not _leftovers(tmp_path)


def test_int8_option_errors(float_model, synthetic_folds_root, tmp_path):
    for kw, msg in ((dict(activations="fp8"), "activations must be"), (dict(per_channel="maybe"), "per_channel"),
                    (dict(calibration="median"), "calibration method")):
        with pytest.raises(ExportError, match=msg):
            OE.export_onnx(float_model, tmp_path / "q.onnx", engine="onnx-int8", data_root=synthetic_folds_root,
                           log=lambda *a: None, **kw)
    assert not list(tmp_path.iterdir())


def _with_io(model, dtype=None, dims=None, out_dims=None):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if dtype is not None:
        m.graph.input[0].type.tensor_type.elem_type = dtype
    for value, dims_ in ((m.graph.input[0], dims), (m.graph.output[0], out_dims)):
        if dims_ is None:
            continue
        shp = value.type.tensor_type.shape
        del shp.dim[:]
        for d in dims_:
            x = shp.dim.add()
            if isinstance(d, int):
                x.dim_value = d
            else:
                x.dim_param = d
    return m


@pytest.mark.parametrize("change, message", [
    (dict(dtype=onnx.TensorProto.FLOAT, dims=["N", 3, 128, 128]), r"input 'pixels' is float \['N', 3, 128, 128\]"),
    (dict(dims=["N", 224, 224, 3]), r"input size 128"),
    (dict(dims=[1, 128, 128, 3]), "batch axis .* fixed"),
    (dict(out_dims=["N", 2]), r"output 'prob_atypical' is float \['N', 2\]"),
])
def test_wrong_shape_models_are_refused(float_model, tmp_path, change, message):
    p = tmp_path / "wrong.onnx"
    onnx.save(_with_io(onnx.load(str(float_model)), **change), str(p))
    with pytest.raises(ExportError, match=message):
        validate_contract(p)
    r = runner.invoke(app, [str(p), "--engine", "onnx-int8", "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 2 and "error:" in r.output and not (tmp_path / "q.onnx").exists()


# ---------------------------------------------------------------------------------------------
# int8


def test_int8_verdict():
    f = {"balanced_accuracy": 0.80, "auroc": 0.88}
    assert int8_verdict(f, {"balanced_accuracy": 0.795, "auroc": 0.878})[0]
    assert not int8_verdict(f, {"balanced_accuracy": 0.785, "auroc": 0.88})[0]  # BA lost 0.015
    assert not int8_verdict(f, {"balanced_accuracy": 0.80, "auroc": 0.874})[0]  # AUROC lost 0.006
    assert not int8_verdict(f, {"balanced_accuracy": 0.82, "auroc": 0.88})[0]  # |delta| counts both ways
    ok, msg = int8_verdict(f, f, 0.0, 0.0)
    assert ok and "limit 0" in msg


@pytest.fixture(scope="module")
def probe_run(run_dir, synthetic_folds_root, tmp_path_factory):
    """The tiny run with fold 0 replaced by a RegNet whose head is fitted (logistic regression) on its
    random features of 256 training crops of fold 0: probabilities spread over (0, 1) like a trained
    model's, which the int8 acceptance test needs (the 1-epoch model outputs ~0.5 everywhere)."""
    import torch
    from safetensors.torch import save_file
    from sklearn.linear_model import LogisticRegression

    from ami.runtime.splits import fold_samples
    from ami.train import data as D
    from ami.train.models import create
    from ami.train.registry import get

    d = tmp_path_factory.mktemp("probe") / "edge-probe"
    shutil.copytree(run_dir, d)
    cfg = get("edge")
    train, _ = fold_samples(synthetic_folds_root, 0)
    fit = stratified(train, 256, seed=3)
    x = load_images(fit, cfg.preprocess)
    torch.manual_seed(0)
    m = create(cfg, "full").eval()
    with torch.no_grad():
        f = m.net.forward_head(m.net.forward_features(D.eval_batch(torch.from_numpy(x), cfg.preprocess)), pre_logits=True)
    lr = LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced").fit(f.numpy(), [s.label for s in fit])
    with torch.no_grad():
        m.net.head.fc.weight.copy_(torch.tensor(lr.coef_, dtype=torch.float32))
        m.net.head.fc.bias.copy_(torch.tensor(lr.intercept_, dtype=torch.float32))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "fold0" / "best.safetensors"))
    return d


@pytest.fixture(scope="module")
def int8_model(probe_run, synthetic_folds_root, tmp_path_factory):
    """float export of the probe fold, then int8 from that ONNX file (the shipped-model route)."""
    folder = tmp_path_factory.mktemp("int8")
    fl = folder / "probe.onnx"
    OE.export_onnx(probe_run / "fold0", fl, data_root=synthetic_folds_root, threshold=0.5, **FAST, log=lambda *a: None)
    q = folder / "probe-int8.onnx"
    logs = []
    OE.export_onnx(fl, q, engine="onnx-int8", data_root=synthetic_folds_root, calib_crops=48, per_channel="on",
                   threads=1, check_batch=32, log=logs.append)
    return fl, q, logs


def test_int8_accepted_keeps_contract_and_records_calibration(int8_model, images):
    fl, q, logs = int8_model
    meta = validate_contract(q)
    assert meta.precision == "int8" and meta.folds == [0] and meta.threshold == 0.5
    c = meta.calibration
    assert c["calibration_n"] == 48 and "never test crops" in c["calibration_set"]
    # evaluated on the whole validation fold 0 (a BA tolerance of 0.01 needs > 50 atypical crops to allow
    # even one flipped label), calibrated on crops of the other folds
    assert c["evaluation_set"].startswith("validation crops of fold(s) 0") and c["evaluation_n"] > 500
    acc = c["acceptance"]
    assert acc["accepted"] and abs(acc["int8"]["balanced_accuracy"] - acc["float"]["balanced_accuracy"]) <= 0.01
    assert abs(acc["int8"]["auroc"] - acc["float"]["auroc"]) <= 0.005
    assert any(line.startswith("int8: accepted") for line in logs)
    g = onnx.load(str(q))
    ops = {n.op_type for n in g.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # preprocessing (and the head, sigmoid, mean) stay float: no Q/DQ touches the /pre/ nodes
    producer = {o: n for n in g.graph.node for o in n.output}
    pre = [n for n in g.graph.node if n.name.startswith("/pre/")]
    assert {n.op_type for n in pre} >= {"Cast", "Mul", "Sub", "Div", "Transpose"}
    for n in pre:
        assert all(producer[i].op_type != "DequantizeLinear" for i in n.input if i in producer), n.name
    # the classifier head comes from the artefact's own metadata (no registry fallback) and keeps float weights
    assert meta.head_modules == ["head.fc"] and not any("does not record its classifier head" in x for x in logs)
    float_init = {t.name for t in g.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    head = [n for n in g.graph.node if "/head/fc/" in n.name and n.op_type == "Gemm"]
    assert head and all(n.input[1] in float_init for n in head)
    # uint8 in, probabilities out, batch 1 and N, close to the float model
    s, sf = session(q, 1), session(fl, 1)
    pn = s.run(None, {"pixels": images})[0]
    p1 = np.concatenate([s.run(None, {"pixels": images[i:i + 1]})[0] for i in range(len(images))])
    np.testing.assert_allclose(p1, pn, atol=1e-5)
    assert np.abs(pn - sf.run(None, {"pixels": images})[0]).max() < 0.05


def test_int8_refused_when_outside_tolerance(int8_model, probe_run, synthetic_folds_root, tmp_path):
    """Same model, crops and calibration as the accepted export, with a zero tolerance on a metric
    that differed there: refused, exit non-zero, nothing written."""
    _, q, _ = int8_model
    acc = validate_contract(q).calibration["acceptance"]
    d_ba = abs(acc["int8"]["balanced_accuracy"] - acc["float"]["balanced_accuracy"])
    d_au = abs(acc["int8"]["auroc"] - acc["float"]["auroc"])
    if d_ba == 0 and d_au == 0:
        pytest.skip("int8 matched float exactly on both metrics here: a zero tolerance cannot refuse it")
    tol = ["--ba-tol", "0"] if d_ba > 0 else ["--auroc-tol", "0"]
    out = tmp_path / "refused.onnx"
    r = runner.invoke(app, [str(probe_run / "fold0"), "--engine", "onnx-int8", "-o", str(out), "--threshold", "0.5",
                            "--data-root", str(synthetic_folds_root), "--calib-crops", "48",
                            "--per-channel", "on", "--check-crops", "16", "--threads", "1", *tol])
    assert r.exit_code == 1, r.output
    assert "int8 model REFUSED" in r.output and "limit 0" in r.output
    assert not out.exists() and not _leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# --best


def _fake_run(root: Path, name: str, method: str, val: list[float], test: list[float]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model": "edge", "method": method}))
    for k, (v, t) in enumerate(zip(val, test)):
        f = d / f"fold{k}"
        f.mkdir()
        (f / "best.safetensors").write_bytes(b"")
        (f / "metrics.json").write_text(json.dumps({
            "validation": {"balanced_accuracy": v, "auroc": v},
            "tests": {"AMi-Br-test": {"balanced_accuracy": t, "auroc": t}}}))
    return d


def test_best_uses_validation_never_test(tmp_path):
    a = _fake_run(tmp_path, "a-lora", "lora", [0.80, 0.82, 0.81, 0.79, 0.80], [0.50] * 5)  # best on validation
    _fake_run(tmp_path, "b-lora", "lora", [0.70] * 5, [0.95] * 5)  # best on test
    c = _fake_run(tmp_path, "c-full", "full", [0.90] * 5, [0.40] * 5)
    _fake_run(tmp_path, "d-lora", "lora", [0.99] * 3, [0.99] * 3)  # only 3 folds
    best, scores = pick_best(tmp_path, method="lora")
    assert best == a
    assert [s.run_dir.name for s in scores if not s.reason] == ["a-lora", "b-lora"]
    assert any(s.run_dir.name == "d-lora" and "fewer than 5" in s.reason for s in scores)
    assert pick_best(tmp_path)[0] == c
    assert pick_best(tmp_path, min_folds=3)[0].name == "d-lora"
    with pytest.raises(ExportError, match="no eligible run"):
        pick_best(tmp_path, method="linear")
    # the command prints the ranking, marks the validation-best run, then exports it
    r = runner.invoke(app, ["--best", str(tmp_path), "--method", "lora", "-o", str(tmp_path / "o.onnx")])
    assert "* 0.8040" in r.output and "a-lora" in r.output
    assert r.exit_code == 2  # the fake run has no real weights: refused, not crashed


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_help_and_usage_errors(tmp_path):
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "Examples:" in r.output and "--engine" in r.output and "--best" in r.output
    r = runner.invoke(app, ["-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "SOURCE or --best" in r.output
    r = runner.invoke(app, [str(tmp_path), "-o", str(tmp_path / "x.plan")])
    assert r.exit_code == 2 and ".onnx" in r.output


def test_trt_profile_from_batch_list():
    from ami.export.tensorrt import parse_batches

    assert parse_batches("1,32,128") == (1, 32, 128)
    assert parse_batches([8]) == (8, 8, 8)
    assert parse_batches("64,1") == (1, 64, 64)
    for bad in ("0,4", "a,b", ""):
        with pytest.raises(ExportError):
            parse_batches(bad)


def test_trt_without_tensorrt_or_gpu_is_a_clear_error(run_dir, tmp_path):
    from ami.export.tensorrt import TensorRTUnavailable, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailable:
        pass
    else:
        pytest.skip("TensorRT and a GPU are present: the GPU tests cover this machine")
    r = runner.invoke(app, [str(run_dir), "--engine", "trt", "-o", str(tmp_path / "m.plan")])
    assert r.exit_code == 3, r.output
    assert "TensorRT" in r.output and ("GPU" in r.output or "not installed" in r.output)
    assert not list(tmp_path.iterdir())


def test_cli_exports_and_python_api_is_importable(run_dir, synthetic_folds_root, tmp_path):
    from ami.export import export_onnx

    assert export_onnx is OE.export_onnx
    out = tmp_path / "cli.onnx"
    r = runner.invoke(app, [str(run_dir), "--folds", "1", "-o", str(out), "--data-root", str(synthetic_folds_root),
                            "--check-crops", "16", "--threads", "1", "--threshold", "0.5"])
    assert r.exit_code == 0, r.output
    assert "labels identical" in r.output and f"wrote {out}" in r.output
    meta = _meta_of(out)
    assert meta.folds == [1] and meta.threshold == 0.5 and "user-specified" in meta.threshold_rule


def test_fp16_graph_keeps_the_contract(float_model, images, tmp_path):
    """The TensorRT fp16 path's graph rewrite, checked on the CPU: uint8 in, float32 out, float32
    pre/post-processing, float16 network weights, and ONNX Runtime agrees with the float model."""
    from ami.export.tensorrt import fp16_graph

    m16 = fp16_graph(onnx.load(str(float_model)))
    p = tmp_path / "fp16.onnx"
    onnx.save(m16, str(p))
    onnx.checker.check_model(str(p))
    assert m16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert m16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    inits = {i.name: i.data_type for i in m16.graph.initializer}
    producer = {o: n for n in m16.graph.node for o in n.output}

    def source(name):  # follow Identity nodes (de-duplicated initializers) to the initializer
        while name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return name

    conv_w = [source(n.input[1]) for n in m16.graph.node if n.op_type == "Conv"]
    assert conv_w and {inits[w] for w in conv_w} == {onnx.TensorProto.FLOAT16}
    casts = [n for n in m16.graph.node if n.op_type == "Cast" and not n.name.startswith("/folds.")]
    to = {a.i for n in casts for a in n.attribute if a.name == "to"}
    # uint8->fp32 at the input, fp32->fp16 into the network, fp16->fp32 out of it: no round trips left
    assert len([n for n in casts if n.name.startswith("/pre/") and "fp16" in n.name]) == 1
    assert to <= {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    a = session(float_model, 1).run(None, {"pixels": images})[0]
    b = session(p, 1).run(None, {"pixels": images})[0]
    assert np.abs(a - b).max() < 1e-2
