"""TensorRT plans on a GPU with TensorRT 10/11; skipped with the reason elsewhere.

The first tests need no data: a tiny generated ami model (:mod:`ami.export.synthetic`, the same
/pre, /folds.0, /post graph as a real export) and generated crops go through ``fp16_graph``,
``build_engine`` (with its timing cache), ``run_plan`` and ``load_engine`` at batches 1, 3, 16 and
37 against ONNX Runtime on the CPU. The last two export a real (tiny) training run, trained on
generated crops in the real layout (conftest's synthetic_folds_root)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ami.export import ExportError
from ami.export import onnx_export as OE
from ami.export.checks import load_images, session, training_samples
from ami.runtime.sampling import stratified_subset as stratified


def _trt_reason() -> str | None:
    from ami.export.tensorrt import TensorRTUnavailable, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailable as e:
        return str(e)
    return None


pytestmark = [pytest.mark.trt, pytest.mark.gpu]
REASON = _trt_reason()
needs_trt = pytest.mark.skipif(REASON is not None, reason=f"TensorRT plan tests need TensorRT and a CUDA GPU: {REASON}")


BATCHES = (1, 3, 16, 37)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    from ami.export.synthetic import synthetic_crops, tiny_onnx

    d = tmp_path_factory.mktemp("gen")
    path, _ = tiny_onnx(d / "tiny.onnx")
    x = synthetic_crops(max(BATCHES), 64, seed=7)
    ref = session(path).run(None, {"pixels": x})[0].astype(np.float64)
    return path, x, ref


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_engine_round_trip_on_a_generated_model(generated, tmp_path, precision):
    import onnx

    from ami.export.onnx_file import write_model
    from ami.export.tensorrt import TOLERANCE, build_engine, fp16_graph, run_plan
    from ami.runtime.engines import load_engine
    from ami.runtime.engines.tensorrt import write_plan_sidecar

    path, x, ref = generated
    src = path
    meta = load_engine(path, provider="cpu").meta
    if precision == "fp16":
        src = tmp_path / "fp16.onnx"
        write_model(fp16_graph(onnx.load(str(path))), src, meta)
    plan, cache = tmp_path / f"tiny-{precision}.plan", tmp_path / "timing.cache"
    info = build_engine(src, plan, input_size=64, batches=(1, 16, 37), precision=precision, timing_cache=cache)
    assert info["timing_cache_state"] == "absent" and cache.stat().st_size > 0
    write_plan_sidecar(plan, meta, tensorrt_version=info["version"], gpu_name=info["gpu_name"],
                       compute_capability=info["compute_capability"], profile=dict(info["profile"]))
    p_all, p_one = run_plan(plan, x, 1, 37)
    tol = TOLERANCE[precision]
    assert np.abs(p_all - ref).max() <= tol and np.abs(p_one - ref[:len(p_one)]).max() <= tol
    eng = load_engine(plan)
    assert eng.provider.startswith("TensorRT") and eng.max_batch == 37
    for b in BATCHES:
        assert np.abs(eng.predict(x[:b]) - ref[:b]).max() <= tol, f"batch {b}"
    assert np.abs(eng.predict(np.concatenate([x, x])) - np.concatenate([ref, ref])).max() <= tol  # > max: split
    # the timing cache is reused by the next build, and a corrupted one is treated as absent
    again = build_engine(src, tmp_path / "again.plan", input_size=64, batches=(1, 16, 37), precision=precision,
                         timing_cache=cache)
    assert again["timing_cache_state"] == "reused"
    cache.write_bytes(b"\x00 not a timing cache " * 64)
    logs = []
    bad = build_engine(src, tmp_path / "bad.plan", input_size=64, batches=(1, 16, 37), precision=precision,
                       timing_cache=cache, log=logs.append)
    # whatever TensorRT makes of the garbage (an exception, None, or an empty cache), the build goes on
    assert bad["timing_cache_state"] in ("corrupt", "foreign", "reused"), logs
    assert (tmp_path / "bad.plan").stat().st_size > 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_folds_root):
    from ami.train.fit import RunSpec, run

    d = tmp_path_factory.mktemp("runs") / "edge-trt"
    run(RunSpec(model="edge", run_dir=d, data_root=synthetic_folds_root, max_train=64, max_eval=32,
                recipe_overrides={"epochs": 1}, eval_sets=()), [0, 1], log=lambda *a: None)
    return d


@needs_trt
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_plan_from_run(run_dir, synthetic_folds_root, tmp_path, precision):
    plan = tmp_path / f"edge-{precision}.plan"
    OE.export_onnx(run_dir, plan, engine="trt", precision=precision, batch=(1, 8, 32), data_root=synthetic_folds_root,
                   check_crops=40, timing_cache=tmp_path / "timing.cache", log=print)
    side = json.loads((tmp_path / f"{plan.name}.json").read_text())
    assert side["precision"] == precision and side["folds"] == [0, 1]
    assert side["tensorrt_version"] and side["gpu_name"] and side["compute_capability"]
    assert side["profile"]["min"] == 1 and side["profile"]["max"] == 32
    assert side["extra"]["tensorrt"]["self_check"]["max_abs_diff"] <= (1e-2 if precision == "fp16" else 1e-4)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    from ami.runtime.engines import load_engine

    eng = load_engine(plan)
    x = load_images(stratified(training_samples(synthetic_folds_root), 40, seed=5), eng.meta.preprocess)
    flt = tmp_path / "f.onnx"
    OE.export_onnx(run_dir, flt, data_root=synthetic_folds_root, check_crops=16, log=print)
    ref = session(flt).run(None, {"pixels": x})[0]
    got = eng.predict(x)
    one = np.concatenate([eng.predict(x[i:i + 1]) for i in range(4)])
    assert np.abs(got - ref).max() <= (1e-2 if precision == "fp16" else 1e-4)
    np.testing.assert_allclose(one, got[:4], atol=2e-3 if precision == "fp16" else 1e-5)


@needs_trt
def test_plan_from_onnx_file_and_existing_files_kept(run_dir, synthetic_folds_root, tmp_path):
    flt = tmp_path / "f.onnx"
    OE.export_onnx(run_dir / "fold0", flt, data_root=synthetic_folds_root, check_crops=16, log=print)
    plan = tmp_path / "f.plan"
    OE.export_onnx(flt, plan, engine="trt", batch="1,4,16", data_root=synthetic_folds_root, check_crops=16, log=print)
    assert plan.is_file() and (tmp_path / "f.plan.json").is_file()
    before = plan.read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        OE.export_onnx(flt, plan, engine="trt", data_root=synthetic_folds_root, log=print)
    assert plan.read_bytes() == before
