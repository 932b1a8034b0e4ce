"""TensorRT plans from a real (tiny) run: GPU + TensorRT 10/11 only; skipped with the reason elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ami.export import onnx_export as OE
from ami.export.checks import load_images, session, stratified, training_samples


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


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_root):
    from ami.train.fit import RunSpec, run

    d = tmp_path_factory.mktemp("runs") / "edge-trt"
    run(RunSpec(model="edge", run_dir=d, data_root=data_root, max_train=64, max_eval=32,
                recipe_overrides={"epochs": 1}, eval_sets=()), [0, 1], log=lambda *a: None)
    return d


@needs_trt
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_plan_from_run(run_dir, data_root, tmp_path, precision):
    plan = tmp_path / f"edge-{precision}.plan"
    OE.export_onnx(run_dir, plan, engine="trt", precision=precision, batch=(1, 8, 32), data_root=data_root,
                   check_crops=40, timing_cache=tmp_path / "timing.cache", log=print)
    side = json.loads((tmp_path / f"{plan.name}.json").read_text())
    assert side["precision"] == precision and side["folds"] == [0, 1]
    assert side["tensorrt_version"] and side["gpu_name"] and side["compute_capability"]
    assert side["profile"]["min"] == 1 and side["profile"]["max"] == 32
    assert side["extra"]["tensorrt"]["self_check"]["max_abs_diff"] <= (1e-2 if precision == "fp16" else 1e-4)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    from ami.runtime.engine import load_engine

    eng = load_engine(plan)
    x = load_images(stratified(training_samples(data_root), 40, seed=5), eng.meta.preprocess)
    flt = tmp_path / "f.onnx"
    OE.export_onnx(run_dir, flt, data_root=data_root, check_crops=16, log=print)
    ref = session(flt).run(None, {"pixels": x})[0]
    got = eng.predict(x)
    one = np.concatenate([eng.predict(x[i:i + 1]) for i in range(4)])
    assert np.abs(got - ref).max() <= (1e-2 if precision == "fp16" else 1e-4)
    np.testing.assert_allclose(one, got[:4], atol=2e-3 if precision == "fp16" else 1e-5)


@needs_trt
def test_plan_from_onnx_file_and_existing_files_kept(run_dir, data_root, tmp_path):
    flt = tmp_path / "f.onnx"
    OE.export_onnx(run_dir / "fold0", flt, data_root=data_root, check_crops=16, log=print)
    plan = tmp_path / "f.plan"
    OE.export_onnx(flt, plan, engine="trt", batch="1,4,16", data_root=data_root, check_crops=16, log=print)
    assert plan.is_file() and (tmp_path / "f.plan.json").is_file()
    before = plan.read_bytes()
    with pytest.raises(Exception, match="already exists"):
        OE.export_onnx(flt, plan, engine="trt", data_root=data_root, log=print)
    assert plan.read_bytes() == before
