"""ami.runtime.engines: the plug-in registry, loading artefacts with every engine, refusing bad
ones with the same messages whichever engine reads them, running them, ``engine="auto"``.

Uses tiny ONNX models built by tests/onnx_factory.py (no trained model needed). OpenVINO tests
skip with the reason where ``ami-mitosis[openvino]`` is not installed; TensorRT tests that need a GPU skip
with the reason on CPU machines."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from ami.runtime import engines as E
from ami.runtime import engines as R
from ami.runtime.artifact import ArtifactError, ArtifactMeta
from ami.runtime.engines import onnxruntime as ORT
from ami.runtime.engines import tensorrt as T
from ami.runtime.preprocess import Preprocess
from onnx_factory import TINY_PRE, build_model, reference_probs, tiny_meta, write_model

OV_MISSING = R.backend("openvino").unavailable()
needs_openvino = pytest.mark.skipif(OV_MISSING is not None, reason=str(OV_MISSING))


def _need(engine: str) -> None:
    """Skip (with the reason) a parametrised case whose engine is not installed here."""
    if engine != "auto":
        why = R.backend(engine).unavailable()
        if why:
            pytest.skip(why)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny.onnx")


def _pixels(n, s=128, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, s, s, 3), dtype=np.uint8)


def test_loads_and_matches_reference(tiny):
    eng = E.load_engine(tiny, provider="cpu", threads=1)
    assert eng.provider == "CPUExecutionProvider"
    assert eng.input_size == 128 and eng.threshold == 0.5
    assert eng.meta.model == "tiny-test" and eng.meta.preprocess == TINY_PRE
    for n in (1, 7, 64):
        x = _pixels(n, seed=n)
        p = eng.predict(x)
        assert p.dtype == np.float32 and p.shape == (n,)
        np.testing.assert_allclose(p, reference_probs(x), atol=1e-6)
    assert eng.predict(_pixels(0)).shape == (0,)
    assert "tiny-test" in eng.describe() and "CPUExecutionProvider" in eng.describe()


def test_auto_provider_is_a_real_one(tiny):
    eng = E.load_engine(tiny, engine="onnxruntime")  # auto provider: whatever this onnxruntime build has, CPU at worst
    assert eng.provider in ORT.PROVIDER_NAMES.values() and eng.engine == "onnxruntime"


def test_predict_rejects_wrong_arrays(tiny):
    eng = E.load_engine(tiny, provider="cpu")
    with pytest.raises(ValueError, match="pixels must be a uint8 numpy array, got float32"):
        eng.predict(_pixels(2).astype(np.float32))
    with pytest.raises(ValueError, match=r"must have shape \[N, 128, 128, 3\] \(NHWC RGB\), got \[2, 64, 64, 3\]"):
        eng.predict(_pixels(2, s=64))
    with pytest.raises(ValueError, match=r"must have shape \[N, 128, 128, 3\] \(NHWC RGB\), got \[2, 3, 128, 128\]"):
        eng.predict(np.zeros((2, 3, 128, 128), np.uint8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(meta=None), r"has no 'ami' metadata: it is not an ami artefact \(export it with `ami-export`"),
    (dict(meta="{not json"), r"artefact metadata is not valid JSON: Expecting property name"),
    (dict(meta=json.dumps({"format": "ami-artifact/1"})),
     r"artefact metadata is malformed: lacks model, method, preprocess, class_names, threshold, threshold_rule, "
     r"precision$"),
    (dict(meta=json.dumps({**json.loads(tiny_meta().to_json()), "format": "other/9"})),
     r"artefact metadata is malformed: format 'other/9' is not 'ami-artifact/1'"),
    (dict(meta=json.dumps({**json.loads(tiny_meta().to_json()), "preprocess": "224"})),
     r"artefact metadata is malformed: preprocess must be an object, got str"),
    (dict(input_dtype=TensorProto.FLOAT), r"input 'pixels' is tensor\(float\), expected tensor\(uint8\)"),
    (dict(graph_size=64), r"input 'pixels' has shape \[\S+, 64, 64, 3\], expected \[N, 128, 128, 3\]"),
    (dict(input_name="images"), r"inputs are \['images'\], expected exactly one named 'pixels'"),
    (dict(output_name="logits"), r"outputs are \['logits'\], expected one named 'prob_atypical'"),
    (dict(output_rank=2), r"output 'prob_atypical' has shape \[\S+, 1\], expected \[N\]"),
])
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_refuses_contract_violations(tmp_path, kwargs, message, engine):
    _need(engine)
    path = write_model(tmp_path / "bad.onnx", **kwargs)
    with pytest.raises(ArtifactError, match=message) as e:
        E.load_engine(path, engine=engine)
    assert str(e.value).startswith(str(path))  # the message names the file first


@pytest.mark.parametrize("engine", ["auto", "onnxruntime", "openvino"])
def test_refuses_broken_files(tmp_path, tiny, engine):
    _need(engine)
    data = tiny.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 100)
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "dir.onnx").mkdir()
    unloadable = r"{} is not a loadable ONNX model \(corrupted or truncated\?\): \S"
    cases = {"trunc.onnx": unloadable, "junk.onnx": unloadable, "empty.onnx": "model file is empty: {}$",
             "dir.onnx": "model path is a directory, not a file: {}$", "missing.onnx": "model file not found: {}$"}
    for name, message in cases.items():
        with pytest.raises(ArtifactError, match=message.format(re.escape(str(tmp_path / name)))):
            E.load_engine(tmp_path / name, engine=engine)


def test_default_model(monkeypatch, tmp_path, tiny):
    monkeypatch.setattr(R, "DEFAULT_MODEL", tmp_path / "assets" / "edge.onnx")
    with pytest.raises(ArtifactError, match=r"no shipped model found at .*edge\.onnx"):
        E.load_engine()
    monkeypatch.setattr(R, "DEFAULT_MODEL", tiny)
    assert E.load_engine().meta.model == "tiny-test"


def test_default_model_path_is_in_the_package():
    assert E.DEFAULT_MODEL.parent.name == "assets" and E.DEFAULT_MODEL.parent.parent == Path(E.__file__).parent.parent


def test_provider_errors(tiny):
    with pytest.raises(E.EngineError, match=r"unknown provider 'npu'; choose one of auto, cpu, cuda, tensorrt$"):
        E.load_engine(tiny, provider="npu")
    import onnxruntime as ort

    for p in ("cuda", "tensorrt"):
        if ORT.PROVIDER_NAMES[p] in ort.get_available_providers():
            continue
        with pytest.raises(E.EngineError, match=f"{ORT.PROVIDER_NAMES[p]} is not available.*onnxruntime-gpu"):
            E.load_engine(tiny, provider=p)


@pytest.mark.filterwarnings("ignore:Specified provider")  # ORT's own warning about the simulated provider
def test_gpu_provider_failures_are_explained(monkeypatch, tiny):
    """Simulated GPU providers: ORT silently falling back, or raising at session creation."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession
    # the silent fallback itself is simulated (a CPU-only session), so this holds where CUDA really works too
    monkeypatch.setattr(ort, "InferenceSession", lambda path, sess_options=None, providers=None:
                        real(path, sess_options=sess_options, providers=["CPUExecutionProvider"]))
    with pytest.raises(E.EngineError, match="asked for CUDAExecutionProvider but ONNX Runtime fell back"):
        E.load_engine(tiny, provider="cuda")

    def flaky(path, sess_options=None, providers=None):
        if any((p if isinstance(p, str) else p[0]) != "CPUExecutionProvider" for p in providers):
            raise RuntimeError("CUDA failure 35: CUDA driver version is insufficient\nmore lines")
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", flaky)
    with pytest.raises(E.EngineError, match=r"CUDAExecutionProvider could not run tiny\.onnx: CUDA failure 35"):
        E.load_engine(tiny, provider="cuda")
    eng = E.load_engine(tiny)  # auto: falls back to the CPU and says why
    assert eng.provider == "CPUExecutionProvider" and "driver version is insufficient" in eng.fallback
    assert "running on the CPU" in eng.describe()


class _FakeOrt:
    __version__ = "9.9.9"

    def __init__(self, providers):
        self._p = providers

    def get_available_providers(self):
        return self._p


def test_provider_list_auto_order_and_trt_profile(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr("ami.runtime.gpu.tensorrt_libraries", lambda: (True, "libnvinfer (simulated)"))
    ort = _FakeOrt(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    lst = ORT._provider_list(ort, "auto", 128, tmp_path / "cache", 256, 0)
    assert [p if isinstance(p, str) else p[0] for p in lst] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    opts = lst[0][1]
    assert opts["trt_profile_min_shapes"] == "pixels:1x128x128x3"
    assert opts["trt_profile_opt_shapes"] == "pixels:64x128x128x3"
    assert opts["trt_profile_max_shapes"] == "pixels:256x128x128x3"
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert lst[1] == ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0})  # fp32 means fp32: no TF32
    assert ORT.cuda_options("1.17.3", 1) == {"device_id": 1}  # before 1.18 ONNX Runtime had no such option
    assert ORT._provider_list(ort, "cpu", 0, None, 256, 0) == ["CPUExecutionProvider"]
    assert [p[0] if isinstance(p, tuple) else p for p in ORT._provider_list(ort, "cuda", 0, None, 256, 0)] == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    cpu_only = _FakeOrt(["CPUExecutionProvider"])
    assert ORT._provider_list(cpu_only, "auto", 0, None, 256, 0) == ["CPUExecutionProvider"]


def test_trt_ep_cache_key_follows_weights(tmp_path):
    a = write_model(tmp_path / "a.onnx")
    b = write_model(tmp_path / "b.onnx", pre=Preprocess(128, None, "bicubic", (0.4, 0.5, 0.6), (0.2, 0.2, 0.2)))
    meta = tiny_meta()

    def entry(path, version="1.0", **kw):
        return ORT.trt_ep_cache(tmp_path / "c", path, meta, version, kw.get("max_batch", 256), kw.get("device", 0)).dir

    ka, kb = entry(a), entry(b)
    assert ka != kb and ka == entry(a) and ka != entry(a, "1.1")
    assert ka != entry(a, max_batch=64) and ka != entry(a, device=1)
    assert ka.parent == tmp_path / "c" and ka.is_dir()


# -- TensorRT plans ------------------------------------------------------------------------------

def test_plan_sidecar_roundtrip_and_refusals(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"not really a plan")
    with pytest.raises(ArtifactError, match=r"no side file m\.plan\.json"):
        T.read_plan_sidecar(plan)
    meta = tiny_meta()
    side = T.write_plan_sidecar(plan, meta, tensorrt_version="10.9.0.34", gpu_name="NVIDIA H100",
                                compute_capability="9.0", profile={"min": 1, "opt": 64, "max": 256})
    assert side.name == "m.plan.json"
    m, build = T.read_plan_sidecar(plan)
    assert m == meta
    assert build == {"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100", "compute_capability": "9.0",
                     "profile": {"min": 1, "opt": 64, "max": 256}}
    # the side file is the artefact metadata plus build facts: ArtifactMeta reads it as is
    assert ArtifactMeta.from_json(side.read_text()) == meta
    d = json.loads(side.read_text())
    del d["compute_capability"]
    side.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="lacks compute_capability"):
        T.read_plan_sidecar(plan)
    with pytest.raises(ValueError, match="gpu_name"):
        T.write_plan_sidecar(plan, meta, tensorrt_version="10", compute_capability="9.0")


def test_plan_compatibility_check():
    build = {"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    T.check_plan_compatible(build, "10.9.0.34", {"gpu_name": "NVIDIA H100 PCIe", "compute_capability": "9.0"})
    with pytest.raises(E.EngineError, match=r"built with TensorRT 10\.9\.0\.34 but TensorRT 10\.13\.0 is installed"):
        T.check_plan_compatible(build, "10.13.0", {"gpu_name": "x", "compute_capability": "9.0"})
    with pytest.raises(E.EngineError, match=r"compute capability 9\.0 .*NVIDIA L4 \(compute capability 8\.9\)"):
        T.check_plan_compatible(build, "10.9.0.34", {"gpu_name": "NVIDIA L4", "compute_capability": "8.9"})


def test_plan_needs_sidecar_before_anything(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x" * 100)
    with pytest.raises(ArtifactError, match="side file"):
        E.load_engine(plan)
    with pytest.raises(E.EngineError, match="runs on TensorRT only"):
        E.load_engine(plan, provider="cpu")
    for name in ("onnxruntime", "openvino"):
        with pytest.raises(E.EngineError, match=r"is a TensorRT plan.*runs on TensorRT only"):
            E.load_engine(plan, engine=name)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_plan_without_tensorrt_is_a_clear_error(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x" * 100)
    T.write_plan_sidecar(plan, tiny_meta(), tensorrt_version="10.9.0.34", gpu_name="g", compute_capability="9.0")
    with pytest.raises(E.EngineError, match="TensorRT is not installed"):
        E.load_engine(plan)


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (CPU machine): `pip install 'ami-mitosis[trt]'` on a GPU box"
    try:
        T.gpu_info()
    except Exception as e:
        return f"no usable CUDA GPU: {e}"
    return None


def _build_plan(onnx_path, plan_path, max_batch=32):
    """Build an fp32 plan from the tiny ONNX with ami.export's build_engine (what ami-export runs)."""
    from ami.export.tensorrt import build_engine

    info = build_engine(onnx_path, plan_path, input_size=TINY_PRE.input_size, batches=(1, 8, max_batch),
                        precision="fp32", timing_cache=plan_path.with_name("timing.cache"))
    T.write_plan_sidecar(plan_path, tiny_meta(), tensorrt_version=info["version"], gpu_name=info["gpu_name"],
                         compute_capability=info["compute_capability"], profile={"min": 1, "opt": 8, "max": max_batch})


@pytest.mark.trt
@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_plan_runs_and_matches_reference(tmp_path, tiny):
    plan = tmp_path / "tiny.plan"
    _build_plan(tiny, plan, max_batch=32)
    eng = E.load_engine(plan)
    assert eng.provider.startswith("TensorRT") and eng.max_batch == 32
    for n in (1, 5, 32, 70):  # 70 > profile max: split into chunks
        x = _pixels(n, seed=n)
        np.testing.assert_allclose(eng.predict(x), reference_probs(x), atol=1e-5)
    # a plan recorded for another TensorRT version is refused before deserialising
    d = json.loads(T.sidecar_path(plan).read_text())
    d["tensorrt_version"] = "0.0.1"
    T.sidecar_path(plan).write_text(json.dumps(d))
    with pytest.raises(E.EngineError, match=r"built with TensorRT 0\.0\.1"):
        E.load_engine(plan)


@pytest.mark.gpu
@pytest.mark.skipif(not any(p in __import__("onnxruntime").get_available_providers()
                            for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")),
                    reason="this onnxruntime build has no CUDA/TensorRT execution provider (CPU machine)")
def test_gpu_providers_match_reference(tiny, tmp_path):
    import onnxruntime as ort

    usable, trt_note = ORT.usable_providers(ort)
    for p in ("cuda", "tensorrt"):
        if ORT.PROVIDER_NAMES[p] not in usable:
            continue
        eng = E.load_engine(tiny, provider=p, cache_dir=tmp_path / "cache", max_batch=64)
        assert eng.provider == ORT.PROVIDER_NAMES[p]
        for n in (1, 64):
            x = _pixels(n, seed=n)
            np.testing.assert_allclose(eng.predict(x), reference_probs(x), atol=1e-5)
    if trt_note:
        pytest.skip(f"TensorRT execution provider not checked: {trt_note}")


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_build_model_helper_is_valid():
    """The factory the refusal tests rely on: its default graph keeps the whole contract and computes
    reference_probs, and each defect knob breaks exactly the one thing it names."""
    import onnx
    import onnxruntime as ort

    m = build_model()
    onnx.checker.check_model(m, full_check=True)
    assert [p.key for p in m.metadata_props] == ["ami"]
    assert ArtifactMeta.from_json(m.metadata_props[0].value).to_json() == tiny_meta().to_json()
    (inp,), (out,) = m.graph.input, m.graph.output
    assert (inp.name, inp.type.tensor_type.elem_type, _dims(inp)) == ("pixels", TensorProto.UINT8, ["N", 128, 128, 3])
    assert (out.name, out.type.tensor_type.elem_type, _dims(out)) == ("prob_atypical", TensorProto.FLOAT, ["N"])
    assert m.opset_import[0].version == 17
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _pixels(5, seed=3)
    got = s.run(None, {"pixels": x})[0]
    assert got.shape == (5,) and len(set(got.tolist())) == 5  # five different crops, five probabilities
    np.testing.assert_allclose(got, reference_probs(x), atol=1e-6)
    # one knob, one defect; everything else stays as in the default graph
    assert len(build_model(meta=None).metadata_props) == 0
    assert build_model(meta="{not json").metadata_props[0].value == "{not json"
    assert build_model(input_dtype=TensorProto.FLOAT).graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert _dims(build_model(graph_size=64).graph.input[0]) == ["N", 64, 64, 3]
    assert [v.name for v in build_model(input_name="images").graph.input] == ["images"]
    assert [v.name for v in build_model(output_name="logits").graph.output] == ["logits"]
    assert _dims(build_model(output_rank=2).graph.output[0]) == ["N", 1]
    assert _dims(build_model(output_rank=2).graph.input[0]) == ["N", 128, 128, 3]


# -- the plug-in registry ------------------------------------------------------------------------

def test_registry_lists_every_engine_as_one_plugin():
    assert list(R.REGISTRY) == ["onnxruntime", "openvino", "tensorrt"]
    assert R.ENGINE_CHOICES == ("auto", "onnxruntime", "openvino", "tensorrt")
    for name in R.REGISTRY:
        b = R.backend(name)
        assert isinstance(b, R.Backend) and b.name == name and b.title and b.suffixes and b.install
    rows = {r["name"]: r for r in R.engine_table()}
    assert rows["onnxruntime"]["installed"] and rows["onnxruntime"]["version"]
    assert rows["openvino"]["installed"] == (OV_MISSING is None)
    if not rows["tensorrt"]["installed"]:
        assert "pip install 'ami-mitosis[trt-cu12]'" in rows["tensorrt"]["reason"]
    with pytest.raises(E.EngineError, match="unknown engine 'npu'; choose one of auto, onnxruntime, openvino, tensorrt"):
        E.load_engine(None, engine="npu")
    with pytest.raises(E.EngineError, match="unknown precision 'fp8'"):
        E.load_engine(None, precision="fp8")


def test_cli_choices_come_from_the_backends():
    assert R.engine_choices() == ("auto", "onnxruntime", "openvino", "tensorrt") == R.ENGINE_CHOICES
    assert R.provider_choices() == ("auto", "cpu", "cuda", "tensorrt")
    assert R.precision_choices() == ("auto", "fp32", "bf16", "fp16", "int8")
    from ami.runtime.cli import infer as cli

    assert [m.value for m in cli.Precision] == list(R.precision_choices())  # fp16 included
    assert [m.value for m in cli.Provider] == list(R.provider_choices())
    assert [m.value for m in cli.EngineName] == list(R.engine_choices())
    rows = {r["name"]: r for r in R.engine_table()}
    assert rows["onnxruntime"]["providers"] == ["cpu", "cuda", "tensorrt"] and rows["tensorrt"]["providers"] == []
    assert rows["openvino"]["precisions"] == ["fp32", "bf16", "int8"]
    assert "cache_dir" in rows["openvino"]["options"] and rows["tensorrt"]["suffixes"] == [".plan", ".engine", ".trt"]


def test_engine_errors_carry_their_exit_codes():
    from ami.runtime.errors import AmiError, Fault, Unavailable

    missing, fault = R.EngineError("no such library"), R.EngineFault("nonsense")
    assert isinstance(missing, Unavailable) and isinstance(missing, RuntimeError) and missing.exit_code == 3
    assert isinstance(fault, Fault) and isinstance(fault, R.EngineError) and fault.exit_code == 4
    assert isinstance(fault, AmiError) and isinstance(fault, RuntimeError)


def test_rows_for_parity_and_latency_come_from_the_backend(tiny, monkeypatch):
    eng = E.load_engine(tiny, engine="onnxruntime", provider="cpu")
    rows, notes = R.engine_rows(eng, provider="cpu")
    assert rows == [R.Row("onnxruntime", "ONNX Runtime", "fp32", "cpu")] and notes == [] and rows[0].matches(eng)
    monkeypatch.setattr(type(ORT.BACKEND), "gpu_providers", lambda self: ["CUDAExecutionProvider"])
    rows, _ = R.engine_rows(eng, provider="cpu", gpu_providers=True)
    assert [(r.title, r.provider) for r in rows] == [("ONNX Runtime", "cpu"), ("ONNX Runtime CUDA", "cuda")]
    assert not rows[1].matches(eng) and rows[1].load_kwargs() == {"engine": "onnxruntime", "precision": "fp32",
                                                                  "provider": "cuda"}
    assert R.gpu_rows(eng) == [rows[1]] and rows[1].device == "cuda" and rows[0].device == "cpu"
    rows, notes = R.engine_rows(eng, provider="cpu", precisions=["bf16"])
    assert rows == [] and notes == ["tiny.onnx / ONNX Runtime: bf16 not available here (it runs this fp32 file at fp32)"]
    if OV_MISSING is None:
        from ami.runtime.engines import openvino as OV

        ov = E.load_engine(tiny, engine="openvino")
        rows, _ = R.engine_rows(ov, provider="cpu")
        want = ["fp32", "bf16"] if "BF16" in OV.cpu_capabilities() else ["fp32"]
        assert [(r.precision, r.provider) for r in rows] == [(q, "auto") for q in want] and rows[0].matches(ov)
        assert R.gpu_rows(ov) == []


FAKE_PLUGIN = """
from dataclasses import replace

import numpy as np
from ami.runtime.engines.base import Backend, Engine
from ami.runtime.engines.onnxruntime import BACKEND as ORT

class Doubling(Engine):
    engine, title = "fake", "Fake engine"

    def __init__(self, inner):
        self.inner, self.meta, self.path, self.provider = inner, inner.meta, inner.path, "fake CPU"

    def predict(self, pixels):
        return self.inner.predict(pixels) * np.float32(0.5)

class FakeBackend(Backend):
    name, title, suffixes, install = "fake", "Fake engine", (".onnx",), "nothing to install"
    providers, precisions_known = ("npu",), ("fp8",)

    def auto_rank(self, path):
        return 1000.0, "it is the fake engine of a test"

    def load(self, path, precision, opts):
        return Doubling(ORT.load(path, precision, replace(opts, provider="cpu")))

BACKEND = FakeBackend()
"""


def test_adding_an_engine_is_one_file_and_one_registry_line(tmp_path, monkeypatch, tiny):
    (tmp_path / "ami_fake_engine.py").write_text(FAKE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(R.REGISTRY, "fake", "ami_fake_engine")
    assert "fake" in {r["name"] for r in R.engine_table()}
    assert R.engine_choices()[-1] == "fake" and R.provider_choices()[-1] == "npu"
    assert R.precision_choices() == ("auto", "fp32", "bf16", "fp16", "int8")  # fp8 is no precision ami knows
    assert E.load_engine(tiny, provider="npu").engine == "fake"  # its provider names it
    eng = E.load_engine(tiny, engine="fake")
    x = _pixels(3)
    np.testing.assert_allclose(eng.predict(x), 0.5 * reference_probs(x), atol=1e-6)
    auto = E.load_engine(tiny)  # the highest rank wins, and says so
    assert auto.engine == "fake" and "auto picked Fake engine: it is the fake engine of a test" in auto.choice


def test_auto_picks_the_best_installed_engine_and_says_why(tiny, monkeypatch):
    eng = E.load_engine(tiny)
    assert eng.choice.startswith(f"auto picked {eng.title}: ")
    best = R.candidates(tiny)[0][0]
    assert eng.engine == best.name
    if OV_MISSING is None and not ORT.BACKEND.gpu_providers():
        assert eng.engine == "openvino" and "fastest installed CPU engine" in eng.choice
        assert "also installed: ONNX Runtime" in eng.choice
    # without OpenVINO: ONNX Runtime, and the hint how to get the faster engine
    monkeypatch.setattr(type(R.backend("openvino")), "unavailable", lambda self: "OpenVINO is not installed (test)")
    eng = E.load_engine(tiny)
    if not ORT.BACKEND.gpu_providers():
        assert eng.engine == "onnxruntime" and eng.provider == "CPUExecutionProvider"
        assert "not installed: OpenVINO (pip install 'ami-mitosis[openvino]')" in eng.choice
    with pytest.raises(E.EngineError, match="OpenVINO is not installed \\(test\\)"):
        E.load_engine(tiny, engine="openvino")


@needs_openvino
def test_auto_falls_back_when_an_engine_fails_on_this_machine(tiny, monkeypatch):
    from ami.runtime.engines import openvino as OV

    def broken(*a, **k):
        raise E.EngineError("OpenVINO could not compile tiny.onnx for the CPU: simulated")

    monkeypatch.setattr(OV, "OpenVinoEngine", broken)
    eng = E.load_engine(tiny)
    assert eng.engine == "onnxruntime" and "simulated" in eng.fallback and "simulated" in eng.choice
    assert "running on ONNX Runtime" in eng.describe()
    with pytest.raises(E.EngineError, match="simulated"):
        E.load_engine(tiny, engine="openvino")


def test_an_ort_provider_names_onnxruntime(tiny):
    eng = E.load_engine(tiny, provider="cpu")
    assert eng.engine == "onnxruntime" and eng.choice == ""
    if OV_MISSING is None:
        with pytest.raises(E.EngineError, match="--provider cuda is an ONNX Runtime execution provider"):
            E.load_engine(tiny, engine="openvino", provider="cuda")


# -- OpenVINO ------------------------------------------------------------------------------------

@needs_openvino
def test_openvino_fp32_matches_reference_and_onnxruntime(tiny, tmp_path):
    eng = E.load_engine(tiny, engine="openvino", threads=1, cache_dir=tmp_path / "ov")
    ort_eng = E.load_engine(tiny, engine="onnxruntime", threads=1)
    assert eng.engine == "openvino" and eng.title == "OpenVINO" and eng.device == "cpu"
    assert eng.precision == "fp32" and "(fp32, 1 threads)" in eng.provider
    assert eng.meta == ort_eng.meta and eng.input_size == 128 and eng.threshold == 0.5
    for n in (1, 7, 64):
        x = _pixels(n, seed=n)
        p = eng.predict(x)
        assert p.dtype == np.float32 and p.shape == (n,)
        np.testing.assert_allclose(p, reference_probs(x), atol=1e-6)
        np.testing.assert_allclose(p, ort_eng.predict(x), atol=1e-6)
    assert eng.predict(_pixels(0)).shape == (0,)
    with pytest.raises(ValueError, match="uint8"):
        eng.predict(_pixels(2).astype(np.float32))
    assert "engine OpenVINO" in eng.describe()


@needs_openvino
def test_openvino_precision_is_explicit(tiny, tmp_path):
    from ami.runtime.engines import openvino as OV

    has_bf16 = "BF16" in OV.cpu_capabilities()
    assert R.backend("openvino").precisions("fp32") == (("fp32", "bf16") if has_bf16 else ("fp32",))
    x = _pixels(16, seed=3)
    if has_bf16:
        eng = E.load_engine(tiny, engine="openvino", precision="bf16", cache_dir=tmp_path / "ov")
        assert eng.precision == "bf16" and eng.meta.precision == "fp32" and "run in bf16" in eng.describe()
        d = np.abs(eng.predict(x) - reference_probs(x)).max()
        assert 0 < d < 2e-2  # bf16 really ran: close, not identical
    else:
        with pytest.raises(E.EngineError, match="bf16 needs a CPU with bf16 instructions"):
            E.load_engine(tiny, engine="openvino", precision="bf16")
    # "f32" is OpenVINO's spelling of fp32
    assert E.load_engine(tiny, engine="openvino", precision="f32", cache_dir=tmp_path / "ov").precision == "fp32"
    # an int8 artefact runs as int8 (its float layers in f32), and only so
    int8 = write_model(tmp_path / "int8.onnx", meta=dataclasses.replace(tiny_meta(), precision="int8"))
    eng = E.load_engine(int8, engine="openvino", cache_dir=tmp_path / "ov")
    assert eng.precision == "int8" and "(int8," in eng.provider
    np.testing.assert_allclose(eng.predict(x), reference_probs(x), atol=1e-6)
    for p in ("fp32", "bf16"):
        with pytest.raises(E.EngineError, match="int8 artefact: OpenVINO runs it as int8"):
            E.load_engine(int8, engine="openvino", precision=p)
    with pytest.raises(E.EngineError, match=r"ONNX Runtime runs int8\.onnx at its own precision \(int8\) only"):
        E.load_engine(int8, engine="onnxruntime", precision="fp32")


@needs_openvino
def test_openvino_caches_compiled_models_on_disk(tiny, tmp_path, monkeypatch):
    from ami.runtime.engines import openvino as OV

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert OV.default_cache_dir() == tmp_path / "xdg" / "ami" / "openvino"
    a = E.load_engine(tiny, engine="openvino")
    assert a.cache_dir.parent == OV.default_cache_dir()  # its own entry, keyed by weights, version, precision, ...
    blobs = sorted(a.cache_dir.glob("*.blob"))
    assert blobs, "OpenVINO wrote no compiled model to its cache"
    b = E.load_engine(tiny, engine="openvino")  # the second start imports the blob
    x = _pixels(5)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    assert sorted(b.cache_dir.glob("*.blob")) == blobs  # the same model: no second blob
    E.load_engine(tiny, engine="openvino", cache_dir=tmp_path / "elsewhere")
    assert list((tmp_path / "elsewhere").glob("*/*.blob"))
    assert OV.clear_cache(tmp_path / "elsewhere") >= 1 and not list((tmp_path / "elsewhere").rglob("*.blob"))


@needs_openvino
def test_openvino_read_failure_on_a_good_file_falls_back(tiny, monkeypatch):
    """A file only OpenVINO cannot read is an engine problem (auto falls back), not a bad artefact."""
    from ami.runtime.engines import openvino as OV

    class NoRead:
        available_devices = ("CPU",)

        def read_model(self, path):
            raise RuntimeError("Check 'op' failed: unsupported operation (simulated)\nmore")

        def get_property(self, *a):
            return ["FP32"]

    monkeypatch.setattr(OV, "core", lambda: NoRead())
    with pytest.raises(E.EngineError, match=r"OpenVINO .* cannot read tiny\.onnx \(ONNX Runtime can\): Check 'op' failed"):
        E.load_engine(tiny, engine="openvino")
    eng = E.load_engine(tiny)
    assert eng.engine == "onnxruntime" and "cannot read" in eng.fallback
