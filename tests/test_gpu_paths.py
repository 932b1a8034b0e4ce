"""GPU code paths, checked on a CPU: a `meta` device stands in for CUDA, fake sessions / fake
TensorRT / fake cuda-python modules stand in for the libraries (issue 16, items 1-10). Each test
fails on the code before its fix; the real-GPU versions are in test_export_trt.py and in
`ami-bench gpu-check`."""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomllib

from ami.runtime import engines as E
from ami.runtime import gpu as G
from ami.runtime.engines import tensorrt as T
from ami.runtime.preprocess import Preprocess
from onnx_factory import write_model

REPO = Path(__file__).resolve().parents[1]
PRE = Preprocess(input_size=8, resize=None, interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny.onnx")


# -- 1. normalisation on the batch's device ------------------------------------------------------

def test_eval_batch_stays_on_the_batch_device():
    """The PyTorch-eager CUDA rows of ami-bench latency: a [1,3,1,1] CPU mean minus a CUDA batch is an
    error; the meta device shows the same device check without a GPU."""
    import torch

    from ami.train.data import eval_batch, normalize

    x = torch.zeros(2, 8, 8, 3, dtype=torch.uint8, device="meta")
    y = eval_batch(x, PRE)
    assert y.device.type == "meta" and tuple(y.shape) == (2, 3, 8, 8)
    assert normalize(torch.zeros(1, 3, 4, 4, device="meta"), PRE).device.type == "meta"
    # and the numbers on the CPU are unchanged: (x/255 - mean) / std per channel
    cpu = eval_batch(torch.full((1, 2, 2, 3), 255, dtype=torch.uint8), PRE)
    np.testing.assert_allclose(cpu[0, :, 0, 0].numpy(), [(1 - m) / s for m, s in zip(PRE.mean, PRE.std)], rtol=1e-6)


# -- 2. / 7. ONNX Runtime GPU providers, simulated at the session ---------------------------------

class _Session:
    """A real CPU session that reports other providers, as ORT does after a silent fallback."""

    def __init__(self, real, reported):
        self._real, self._reported = real, reported

    def get_providers(self):
        return list(self._reported)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _fake_ort_session(monkeypatch, available, reported, seen):
    import onnxruntime as ort

    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(available))

    def session(path, sess_options=None, providers=None):
        seen.append([p if isinstance(p, str) else p[0] for p in providers])
        s = real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        return _Session(s, reported(seen[-1]))

    monkeypatch.setattr(ort, "InferenceSession", session)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_provider_that_works_is_used(monkeypatch, tiny):
    """What onnxruntime-gpu does on a GPU box (why the old fallback test failed there): CUDA is
    asked for, CUDA runs, and load_engine reports it."""
    seen = []
    _fake_ort_session(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"], lambda asked: asked, seen)
    eng = E.load_engine(tiny, provider="cuda")
    assert eng.provider == "CUDAExecutionProvider" and not eng.fallback
    assert seen[-1] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_tensorrt_provider_is_not_claimed_when_tensorrt_does_not_load(monkeypatch, tiny):
    seen = []
    trt, cuda, cpu = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
    # ORT lists TensorRT, then cannot create it and silently runs the rest
    _fake_ort_session(monkeypatch, [trt, cuda, cpu], lambda asked: [p for p in asked if p != trt], seen)
    monkeypatch.setattr(G, "tensorrt_libraries", lambda: (False, "libnvinfer.so.10: cannot open shared object file"))
    eng = E.load_engine(tiny)  # auto
    assert trt not in seen[-1]  # never asked for
    assert eng.provider == cuda
    assert "TensorRT does not load" in eng.fallback and "libnvinfer.so.10" in eng.fallback
    assert f"running on {cuda}" in eng.describe()
    with pytest.raises(E.EngineError, match=r"TensorRT does not load.*libnvinfer"):
        E.load_engine(tiny, provider="tensorrt")


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_auto_says_when_ort_silently_dropped_its_first_choice(monkeypatch, tiny):
    seen = []
    trt, cuda, cpu = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
    _fake_ort_session(monkeypatch, [trt, cuda, cpu], lambda asked: [p for p in asked if p != trt], seen)
    monkeypatch.setattr(G, "tensorrt_libraries", lambda: (True, "libnvinfer.so.10"))
    eng = E.load_engine(tiny, cache_dir=Path(str(tiny) + "-cache"))
    assert seen[-1][0] == trt and eng.provider == cuda
    assert f"{trt} did not load" in eng.fallback and cuda in eng.fallback


def test_tensorrt_library_probe_gives_a_reason():
    G.tensorrt_libraries.cache_clear()
    ok, why = G.tensorrt_libraries()
    assert isinstance(ok, bool) and why
    if not ok:
        assert "libnvinfer" in why


# -- 4. CUDA-major extras and GPU facts without cuda-python ---------------------------------------

def test_trt_extras_pin_one_cuda_major_each():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for major in G.CUDA_MAJORS:
        reqs = extras[f"trt-cu{major}"]
        assert any(r.startswith(f"tensorrt-cu{major}") for r in reqs), reqs
        cp = next(r for r in reqs if r.startswith("cuda-python"))
        assert f">={major}" in cp and f"<{major + 1}" in cp, cp
        assert not any(r.split(">")[0].split("<")[0].strip() == "tensorrt" for r in reqs)  # the metapackage picks CUDA 13
    assert G.trt_extra(12) == "ami-mitosis[trt-cu12]" and G.trt_extra(13) == "ami-mitosis[trt-cu13]"
    assert G.trt_extra(14) == "ami-mitosis[trt-cu13]" and G.trt_extra(None) == "ami-mitosis[trt-cu12]"


def test_cuda_python_newer_than_the_driver_is_explained(monkeypatch):
    monkeypatch.setattr(G, "cuda_python_version", lambda: "13.0.1")
    monkeypatch.setattr(G, "driver_cuda_version", lambda: (12, 4))
    msg = G.cuda_python_mismatch()
    assert "cuda-python 13.0.1 is built for CUDA 13" in msg and "CUDA 12.4" in msg and "ami-mitosis[trt-cu12]" in msg
    monkeypatch.setattr(G, "driver_cuda_version", lambda: (13, 0))
    assert G.cuda_python_mismatch() == ""

    class Err(int):
        name = "cudaErrorInsufficientDriver"

    monkeypatch.setattr(G, "driver_cuda_version", lambda: (12, 4))
    with pytest.raises(E.EngineError, match=r"cudaErrorInsufficientDriver; cuda-python 13.0.1 .* 'ami-mitosis\[trt-cu12\]'"):
        T._ck(None, (Err(35),))


def test_export_gpu_facts_fall_back_to_torch_when_cuda_python_fails(monkeypatch):
    from ami.export import tensorrt as X

    def broken(device_id=0):
        raise E.EngineError("CUDA call failed: cudaErrorInsufficientDriver")

    monkeypatch.setattr(X, "_have_cudart", lambda: True)
    monkeypatch.setattr(T, "gpu_info", broken)
    monkeypatch.setattr(X, "_torch_gpu", lambda: {"gpu_name": "NVIDIA H200", "compute_capability": "9.0", "source": "torch.cuda"})
    g = X.gpu_info()
    assert g["gpu_name"] == "NVIDIA H200" and g["compute_capability"] == "9.0" and g["source"] == "torch.cuda"
    assert "InsufficientDriver" in g["cuda_python_error"]
    monkeypatch.setattr(X, "_torch_gpu", lambda: None)
    with pytest.raises(X.TensorRTUnavailable, match=r"cuda-python found none .*InsufficientDriver"):
        X.gpu_info()


# -- 5. stream handles without the deprecated int() -----------------------------------------------

def test_plan_runner_passes_the_native_stream_handle(monkeypatch):
    class Stream:
        def __int__(self):
            warnings.warn("int(cuda_obj) is deprecated; use get_cuda_native_handle", DeprecationWarning, stacklevel=2)
            return 1234

    utils = types.ModuleType("cuda.bindings.utils")
    utils.get_cuda_native_handle = lambda obj: 1234
    bindings = types.ModuleType("cuda.bindings")
    bindings.utils = utils
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, mod in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)

    class Ctx:
        handle = None

        def set_input_shape(self, name, shape):
            return True

        def set_tensor_address(self, name, ptr):
            assert isinstance(ptr, int)

        def execute_async_v3(self, stream):
            Ctx.handle = stream
            return True

    cudart = types.SimpleNamespace(
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2),
        cudaMemcpyAsync=lambda *a: (0,), cudaStreamSynchronize=lambda s: (0,))
    eng = object.__new__(T.TrtPlanEngine)
    eng._cudart, eng._ctx, eng._stream, eng._d_in, eng._d_out = cudart, Ctx(), Stream(), 10, 20
    eng._bufs, eng.min_batch, eng.max_batch = [], 1, 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        out = eng._run_chunk(np.zeros((2, 4, 4, 3), np.uint8))
    assert Ctx.handle == 1234 and out.shape == (2,)
    eng._cudart = None  # nothing to free


# -- 6. timing cache: reused, corrupt, foreign -----------------------------------------------------

class _Cache:
    def __init__(self, blob: bytes):
        self.blob = blob

    def serialize(self):
        return b"TRTCACHE" + self.blob[8:] + b"+"


def _fake_tensorrt(corrupt: str = "raise"):
    """Just enough of TensorRT 10's builder API for build_engine, recording what it was given."""
    rec = {"set_cache": [], "profile": None}

    class Config:
        cache = None

        def set_memory_pool_limit(self, *a):
            pass

        def clear_flag(self, f):
            rec["cleared"] = f

        def add_optimization_profile(self, p):
            pass

        def create_timing_cache(self, blob):
            blob = bytes(blob)
            if blob and not blob.startswith(b"TRTCACHE"):
                if corrupt == "raise":
                    raise RuntimeError("[TRT] ITimingCache: deserialization failed\nmore")
                return None
            return _Cache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            if not isinstance(cache, _Cache):
                raise TypeError("set_timing_cache(): incompatible function arguments")
            rec["set_cache"].append(cache.blob)
            self.cache = cache
            return not cache.blob.startswith(b"TRTCACHEforeign")

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, *shapes):
            rec["profile"] = (name, shapes)

    class Net:
        num_inputs = 1

        def get_input(self, i):
            return types.SimpleNamespace(name="pixels")

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Net()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, net, cfg):
            return b"PLAN"

    class Parser:
        num_errors = 0

        def __init__(self, net, logger):
            pass

        def parse_from_file(self, path):
            return True

    trt = types.SimpleNamespace(
        __version__="10.9.0.34", Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Builder=Builder, OnnxParser=Parser, BuilderFlag=types.SimpleNamespace(TF32=7),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=0),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE=0))
    return trt, rec


@pytest.mark.parametrize("corrupt", ["raise", "none"])
def test_timing_cache_reused_corrupt_and_foreign(monkeypatch, tmp_path, corrupt):
    from ami.export import tensorrt as X

    trt, rec = _fake_tensorrt(corrupt)
    monkeypatch.setattr(X, "require_tensorrt", lambda: (trt, 10, {"gpu_name": "Fake GPU", "compute_capability": "9.0"}))
    cache = tmp_path / "timing.cache"
    logs = []

    def build():
        logs.clear()
        return X.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", input_size=64, batches=(1, 3, 16, 37),
                              precision="fp32", timing_cache=cache, log=logs.append)

    info = build()  # absent: fresh cache, saved
    assert info["timing_cache_state"] == "absent" and cache.read_bytes().startswith(b"TRTCACHE")
    assert (tmp_path / "m.plan").read_bytes() == b"PLAN" and rec["cleared"] == 7
    assert info["profile"]["min"] == 1 and info["profile"]["max"] == 37
    before = cache.read_bytes()
    info = build()  # reused: the saved blob goes back into the builder
    assert info["timing_cache_state"] == "reused" and rec["set_cache"][-1] == before
    cache.write_bytes(b"\x00garbage, not a timing cache")
    info = build()  # corrupt: a warning, treated as absent, replaced by a good one
    assert info["timing_cache_state"] == "corrupt"
    assert any("warning" in m and "treating it as absent" in m for m in logs), logs
    assert cache.read_bytes().startswith(b"TRTCACHE") and rec["set_cache"][-1] == b""
    cache.write_bytes(b"TRTCACHEforeign-version")
    info = build()  # another TensorRT/GPU: fresh cache, the file is kept
    assert info["timing_cache_state"] == "foreign" and cache.read_bytes() == b"TRTCACHEforeign-version"
    assert any("does not fit" in m for m in logs)


# -- 8. the generated model the TensorRT tests and gpu-check build plans from ----------------------

def test_generated_model_keeps_the_contract_and_survives_fp16(tmp_path):
    import onnx
    import onnxruntime as ort

    from ami.export.checks import validate_contract
    from ami.export.synthetic import synthetic_crops, tiny_onnx
    from ami.export.tensorrt import fp16_graph

    path, graph = tiny_onnx(tmp_path / "tiny.onnx")
    meta = validate_contract(path)
    assert meta.model == "tiny-generated" and meta.preprocess.input_size == 64
    names = [n.name for n in onnx.load(str(path)).graph.node]
    assert any(n.startswith("/folds.0/") for n in names) and any(n.startswith("/pre/") for n in names)
    x = synthetic_crops(37, 64, seed=3)
    assert x.dtype == np.uint8 and x.shape == (37, 64, 64, 3)
    p32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    assert p32.std() > 0.1 and 0.01 < p32.min() and p32.max() < 0.99  # spread, not saturated
    import torch

    with torch.no_grad():
        np.testing.assert_allclose(graph(torch.from_numpy(x)).numpy(), p32, atol=1e-5)
    m16 = fp16_graph(onnx.load(str(path)))
    onnx.save(m16, str(tmp_path / "t16.onnx"))
    p16 = ort.InferenceSession(str(tmp_path / "t16.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    assert np.abs(p16 - p32).max() < 5e-3  # well inside the fp16 plan tolerance (1e-2)


# -- 9. a plan on another GPU model of the same architecture --------------------------------------

def test_plan_on_another_gpu_model_warns():
    build = {"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    w = T.check_plan_compatible(build, "10.9.0.34", {"gpu_name": "NVIDIA H200", "compute_capability": "9.0"}, "m.plan")
    assert len(w) == 1 and "built on NVIDIA H100 80GB HBM3" in w[0] and "NVIDIA H200" in w[0]
    assert T.check_plan_compatible(build, "10.9.0.34", {"gpu_name": "NVIDIA H100 80GB HBM3",
                                                        "compute_capability": "9.0"}) == []


# -- 10. resuming a CUDA fp16 run --------------------------------------------------------------------

def test_resumable_state_keeps_grad_scaler_and_cuda_rng(monkeypatch, tmp_path):
    import torch

    from ami.train import fit as F

    class Scaler:
        def __init__(self):
            self.state = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                          "_growth_tracker": 7}

        def state_dict(self):
            return dict(self.state)

        def load_state_dict(self, d):
            self.state = dict(d)

    rng = {"now": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": rng["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": rng.__setitem__("now", state.clone()))
    cuda = torch.device("cuda")
    saved = F.cuda_state(Scaler(), cuda)
    torch.save(saved, tmp_path / "state.pt")
    st = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)  # as Run.fit loads it
    fresh = Scaler()
    fresh.state = {"scale": 65536.0, "_growth_tracker": 0}
    rng["now"] = torch.zeros(16, dtype=torch.uint8)
    F.restore_cuda_state(st, fresh, cuda)
    assert fresh.state["scale"] == 1024.0 and fresh.state["_growth_tracker"] == 7
    assert torch.equal(rng["now"], torch.arange(16, dtype=torch.uint8))
    # a CPU run records neither, and restores from an old state file without them
    assert F.cuda_state(None, torch.device("cpu")) == {}
    F.restore_cuda_state({}, None, torch.device("cpu"))


# -- 11. an NVIDIA GPU without a GPU engine is said once, with what to install (issue 26) -----------

FAKE_SMI = """#!/bin/sh
case "$1" in
  --query-gpu=*) echo "NVIDIA H200, 580.159.04, 9.0, 143771 MiB" ;;
  *) echo "| NVIDIA-SMI 580.159.04    Driver Version: 580.159.04    CUDA Version: {cuda}     |" ;;
esac
"""


def _fake_nvidia_smi(monkeypatch, tmp_path, cuda: str | None):
    """A PATH holding only a fake nvidia-smi (None: no nvidia-smi at all); no libcuda, no /proc entry."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    if cuda is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text(FAKE_SMI.format(cuda=cuda))
        smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(G, "driver_cuda_version", lambda: None)
    monkeypatch.setattr(G, "PROC_NVIDIA", tmp_path / "no-proc")
    G.nvidia_gpu.cache_clear()


@pytest.fixture
def fresh_gpu_probe():
    G.nvidia_gpu.cache_clear()
    yield
    G.nvidia_gpu.cache_clear()


@pytest.mark.parametrize("cuda, extra", [("13.0", "ami-mitosis[trt-cu13]"), ("12.4", "ami-mitosis[trt-cu12]")])
def test_auto_on_the_cpu_of_a_gpu_box_says_what_to_install(monkeypatch, tmp_path, tiny, fresh_gpu_probe, cuda, extra):
    from ami.runtime import DIST_NAME

    _fake_nvidia_smi(monkeypatch, tmp_path, cuda)
    monkeypatch.setattr(type(E.backend("onnxruntime")), "gpu_providers", lambda self: [])  # a CPU-only onnxruntime
    assert G.nvidia_gpu() == {"name": "NVIDIA H200", "cuda_version": cuda, "cuda_major": int(cuda.split(".")[0])}
    eng = E.load_engine(tiny)
    assert eng.device == "cpu"
    note = (f"this machine has an NVIDIA GPU (NVIDIA H200, driver CUDA {cuda}) but no GPU engine is installed, so the "
            f"model runs on the CPU; to run it on the GPU: `pip uninstall onnxruntime && pip install onnxruntime-gpu "
            f"'{extra}'`")
    assert eng.choice.endswith("; " + note) and eng.choice.count("NVIDIA GPU") == 1
    assert extra.startswith(DIST_NAME + "[")
    # a named engine is the user's choice: no note; nor on a box without an NVIDIA GPU
    assert E.load_engine(tiny, engine="onnxruntime").choice == ""
    _fake_nvidia_smi(monkeypatch, tmp_path / "none", None)
    assert G.nvidia_gpu() is None
    assert "NVIDIA" not in E.load_engine(tiny).choice


def test_no_note_when_a_gpu_engine_runs_and_a_failing_smi_is_no_gpu(monkeypatch, tmp_path, tiny, fresh_gpu_probe):
    _fake_nvidia_smi(monkeypatch, tmp_path, "13.0")
    monkeypatch.setattr(type(E.backend("onnxruntime")), "gpu_providers", lambda self: ["CUDAExecutionProvider"])
    _, text = E.choose(tiny)
    assert text.startswith("auto picked ONNX Runtime") and "no GPU engine" not in text
    # nvidia-smi present but failing (no driver loaded): not a GPU box
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver'\n"
                   "exit 9\n")
    G.nvidia_gpu.cache_clear()
    assert G.nvidia_gpu() is None
    # the driver's /proc entry alone is enough; the CUDA version then comes from nvidia-smi or stays unknown
    (tmp_path / "no-proc" / "0000:17:00.0").mkdir(parents=True)
    G.nvidia_gpu.cache_clear()
    assert G.nvidia_gpu() == {"name": "an NVIDIA GPU", "cuda_version": None, "cuda_major": None}
    assert G.no_gpu_engine_note(G.nvidia_gpu(), ["pip install x"]).startswith(
        "this machine has an NVIDIA GPU (an NVIDIA GPU, driver CUDA version unknown)")
