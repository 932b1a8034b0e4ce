"""TensorRT plans (the ``tensorrt`` engine plug-in): the side file that describes them, and a runner.

A serialised TensorRT engine (``X.plan``) cannot carry ONNX metadata, so the artefact contract puts
it beside the plan in ``X.plan.json``: the same JSON document as the ONNX ``ami`` metadata
(:class:`~ami.runtime.artifact.ArtifactMeta`) plus the build facts a plan is tied to::

    {... ArtifactMeta fields ...,
     "tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100", "compute_capability": "9.0",
     "profile": {"min": 1, "opt": 64, "max": 256}}

A plan only runs on the exact TensorRT version and GPU architecture it was built for; the runner
checks both *before* deserialising and refuses a mismatch with that reason (instead of a crash).

Everything GPU-side is imported lazily: ``tensorrt`` and ``cuda-python`` (``cuda.bindings``) are the
``ami-mitosis[trt-cu12]`` / ``ami-mitosis[trt-cu13]`` extras (one per CUDA major), never needed on a CPU box. The API used is TensorRT 10/11's name-based one
(``num_io_tensors``, ``get_tensor_name``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). ``ami.export`` reuses :func:`write_plan_sidecar` and :func:`gpu_info`.
(This module was ``ami.runtime.trt`` before engines became plug-ins.)
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path

import numpy as np

from .. import DIST_NAME
from ..artifact import INPUT_NAME, OUTPUT_NAME, PLAN_SUFFIXES, ArtifactError, ArtifactMeta, check_weights_digest
from ..atomic import atomic_write_text
from ..gpu import TRT_MAJORS, tensorrt_major, trt_extra
from .base import Backend, Engine, EngineError, EngineFault, LoadOptions

SIDECAR_SUFFIX = ".json"
BUILD_KEYS = ("tensorrt_version", "gpu_name", "compute_capability")


def sidecar_path(plan: str | os.PathLike) -> Path:
    p = Path(plan)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def plan_sidecar_json(meta: ArtifactMeta, *, tensorrt_version: str, gpu_name: str, compute_capability: str,
                      profile: dict | None = None, **extra) -> str:
    d = json.loads(meta.to_json())
    d.update(tensorrt_version=str(tensorrt_version), gpu_name=str(gpu_name),
             compute_capability=str(compute_capability), profile=dict(profile or {}), **extra)
    return json.dumps(d, sort_keys=True, indent=1)


def write_plan_sidecar(plan: str | os.PathLike, meta: ArtifactMeta, **build) -> Path:
    """Write ``X.plan.json`` (atomically: temporary name, then rename). ``build`` must hold
    tensorrt_version, gpu_name and compute_capability; profile (min/opt/max batch) is optional."""
    missing = [k for k in BUILD_KEYS if k not in build]
    if missing:
        raise ValueError(f"plan side file needs {', '.join(missing)}")
    out = sidecar_path(plan)
    atomic_write_text(out, plan_sidecar_json(meta, **build))
    return out


def read_plan_sidecar(plan: str | os.PathLike) -> tuple[ArtifactMeta, dict]:
    """(metadata, build facts) of a plan. Raises ArtifactError when the side file is missing or bad."""
    side = sidecar_path(plan)
    if not side.is_file():
        raise ArtifactError(f"{Path(plan).name} has no side file {side.name}: a TensorRT plan needs it for its "
                            "preprocessing, classes, threshold and build facts (ami-export writes both)")
    text = side.read_text(encoding="utf-8", errors="replace")
    meta = ArtifactMeta.from_json(text)
    d = json.loads(text)
    missing = [k for k in BUILD_KEYS if not d.get(k)]
    if missing:
        raise ArtifactError(f"{side.name} lacks {', '.join(missing)}: cannot tell whether the plan fits this machine")
    build = {k: d[k] for k in (*BUILD_KEYS, "profile") if k in d}
    return meta, build


# -- lazy GPU libraries --------------------------------------------------------------------------

def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        from ..gpu import trt_install_hint

        raise EngineError(f"TensorRT is not installed ({e}); TensorRT plans need an NVIDIA GPU and "
                          f"`{trt_install_hint()}` (or use the ONNX model with --provider cpu/cuda)") from None
    if tensorrt_major(trt.__version__) not in TRT_MAJORS:
        raise EngineError(f"TensorRT {trt.__version__} is not supported (supported majors: "
                          f"{', '.join(map(str, TRT_MAJORS))})")
    return trt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            from ..gpu import trt_install_hint

            raise EngineError(f"cuda-python is not installed ({e}); TensorRT plans need it: "
                              f"`{trt_install_hint()}`") from None
    return cudart


def _ck(cudart, result):
    """cuda-python calls return (error, *values)."""
    err, *vals = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        hint = ""
        if "Driver" in name or "Stub" in name:  # cudaErrorInsufficientDriver / cudaErrorStubLibrary: wrong build
            from ..gpu import cuda_python_mismatch

            hint = cuda_python_mismatch()
        raise EngineError(f"CUDA call failed: {name}" + (f"; {hint}" if hint else ""))
    return vals[0] if len(vals) == 1 else tuple(vals)


def native_handle(obj) -> int:
    """The address behind a cuda-python object (e.g. a stream) as an int: cuda-bindings >= 12.9
    deprecates ``int(obj)`` for ``cuda.bindings.utils.get_cuda_native_handle``."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def gpu_info(device_id: int = 0) -> dict:
    """{'gpu_name', 'compute_capability'} of a CUDA device. Raises EngineError without a GPU."""
    cudart = _cudart()
    n = _ck(cudart, cudart.cudaGetDeviceCount())
    if n <= device_id:
        raise EngineError(f"no CUDA device {device_id} (found {n})")
    prop = _ck(cudart, cudart.cudaGetDeviceProperties(device_id))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu_name": name.rstrip("\x00").strip(), "compute_capability": f"{prop.major}.{prop.minor}"}


def check_plan_compatible(build: dict, tensorrt_version: str, device: dict, plan_name: str = "plan") -> list[str]:
    """Refuse a plan built for another TensorRT version or GPU architecture, saying which. Returns
    warnings: a plan is tuned for the GPU *model* it was built on, so another model of the same
    architecture runs it, possibly slower or refused by TensorRT itself."""
    if str(build["tensorrt_version"]) != str(tensorrt_version):
        raise EngineError(f"{plan_name} was built with TensorRT {build['tensorrt_version']} but TensorRT "
                          f"{tensorrt_version} is installed; a plan only runs on the version that built it: "
                          "rebuild it (`ami-export MODEL.onnx --engine trt`) or install that version")
    if str(build["compute_capability"]) != str(device["compute_capability"]):
        raise EngineError(f"{plan_name} was built for compute capability {build['compute_capability']} "
                          f"({build.get('gpu_name', '?')}) but this GPU is {device['gpu_name']} "
                          f"(compute capability {device['compute_capability']}); rebuild it on this machine")
    built_on = str(build.get("gpu_name") or "").strip()
    if built_on and built_on != str(device.get("gpu_name", "")).strip():
        return [f"{plan_name} was built on {built_on} and runs on {device['gpu_name']} (same compute capability "
                f"{device['compute_capability']}): TensorRT plans are tuned for one GPU model, so it may run slower or "
                "be refused; rebuild it on this GPU for its own timings"]
    return []


class TrtPlanEngine(Engine):
    """Runs a serialised TensorRT engine with the ami I/O contract (``pixels`` uint8 NHWC in,
    ``prob_atypical`` float32 [N] out). Batches above the plan's profile maximum are split;
    batches below its minimum are padded. One execution context, stream and buffer pair: calls
    from several threads take turns (a lock)."""

    engine, title, device = "tensorrt", "TensorRT", "cuda"

    def __init__(self, path: str | os.PathLike, device_id: int = 0):
        self.path = Path(path)
        self.meta, self.build = read_plan_sidecar(self.path)
        self.weights_verified = check_weights_digest(self.path, self.meta)
        trt = _tensorrt()
        cudart = _cudart()
        self._cudart = cudart
        self._lock = threading.Lock()
        self._bufs: list = []
        self._stream = None
        _ck(cudart, cudart.cudaSetDevice(device_id))
        device = gpu_info(device_id)
        self.warnings = check_plan_compatible(self.build, trt.__version__, device, self.path.name)
        for w in self.warnings:
            warnings.warn(w, RuntimeWarning, stacklevel=2)

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise ArtifactError(f"{self.path} could not be deserialised by TensorRT {trt.__version__} "
                                "(corrupted or truncated plan?)")
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise ArtifactError(f"{self.path}: I/O tensors are inputs {inputs}, outputs {outputs}; expected "
                                f"input '{INPUT_NAME}' and output '{OUTPUT_NAME}'")
        if engine.get_tensor_dtype(INPUT_NAME) != trt.DataType.UINT8:
            raise ArtifactError(f"{self.path}: input '{INPUT_NAME}' is {engine.get_tensor_dtype(INPUT_NAME)}, expected UINT8")
        if engine.get_tensor_dtype(OUTPUT_NAME) != trt.DataType.FLOAT:
            raise ArtifactError(f"{self.path}: output '{OUTPUT_NAME}' is {engine.get_tensor_dtype(OUTPUT_NAME)}, expected FLOAT")
        s = self.input_size
        shape = tuple(engine.get_tensor_shape(INPUT_NAME))
        if len(shape) != 4 or tuple(shape[1:]) != (s, s, 3):
            raise ArtifactError(f"{self.path}: input shape {list(shape)}, expected [N, {s}, {s}, 3]")
        if shape[0] == -1:
            lo, _opt, hi = engine.get_tensor_profile_shape(INPUT_NAME, 0)
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        else:
            self.min_batch = self.max_batch = int(shape[0])
        self._extra_outputs = [n for n in outputs if n != OUTPUT_NAME]
        if self._extra_outputs:
            raise ArtifactError(f"{self.path}: unexpected extra outputs {self._extra_outputs}")

        self._ctx = engine.create_execution_context()
        self._stream = _ck(cudart, cudart.cudaStreamCreate())
        self._d_in = _ck(cudart, cudart.cudaMalloc(self.max_batch * s * s * 3))
        self._bufs.append(self._d_in)
        self._d_out = _ck(cudart, cudart.cudaMalloc(self.max_batch * 4))
        self._bufs.append(self._d_out)
        self.provider = f"TensorRT {trt.__version__} ({device['gpu_name']})"

    def _run_chunk(self, x: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        n = len(x)
        if n < self.min_batch:
            x = np.concatenate([x, np.zeros((self.min_batch - n, *x.shape[1:]), np.uint8)])
        x = np.ascontiguousarray(x)
        out = np.empty(len(x), np.float32)
        if not self._ctx.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise EngineFault(f"TensorRT refused input shape {list(x.shape)} (profile batch "
                              f"{self.min_batch}..{self.max_batch})")
        self._ctx.set_tensor_address(INPUT_NAME, int(self._d_in))
        self._ctx.set_tensor_address(OUTPUT_NAME, int(self._d_out))
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _ck(cudart, cudart.cudaMemcpyAsync(self._d_in, x.ctypes.data, x.nbytes, h2d, self._stream))
        if not self._ctx.execute_async_v3(native_handle(self._stream)):
            raise EngineFault("TensorRT execution failed (execute_async_v3 returned False)")
        _ck(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, self._d_out, out.nbytes, d2h, self._stream))
        _ck(cudart, cudart.cudaStreamSynchronize(self._stream))
        return out[:n]

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        x = self.check_batch(pixels)
        if len(x) == 0:
            return np.zeros((0,), np.float32)
        with self._lock:
            parts = [self._run_chunk(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return np.concatenate(parts)

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for b in self._bufs:
            cudart.cudaFree(b)
        self._bufs = []
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):  # pragma: no cover - GPU only
        try:
            self.close()
        except Exception:
            pass


# -- the plug-in ---------------------------------------------------------------------------------

class TrtBackend(Backend):
    name = "tensorrt"
    title = "TensorRT"
    suffixes = PLAN_SUFFIXES
    artefact = "a TensorRT plan"
    install = (f"pip install '{DIST_NAME}[trt-cu12]' or '{DIST_NAME}[trt-cu13]' (the CUDA major nvidia-smi prints) "
               "on a box with an NVIDIA GPU")
    precisions_known = ("fp32", "fp16", "int8")  # the precision a plan was built with
    options = ("provider", "device_id")
    nominal_rank = 100.0
    late_check = True  # a plan's side file is checked before TensorRT's libraries
    gpu_only = True

    def unavailable(self) -> str | None:
        import importlib.util

        for mod, what in (("tensorrt", "TensorRT"), ("cuda", "cuda-python")):
            if importlib.util.find_spec(mod) is None:
                return f"{what} is not installed; TensorRT plans need an NVIDIA GPU and `{self.install.split(' on ')[0]}`"
        return None

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("tensorrt")
        except PackageNotFoundError:
            return ""

    def auto_rank(self, path: Path) -> tuple[float, str] | None:
        return self.nominal_rank, f"{path.name} is a TensorRT plan: only TensorRT runs it"

    def uses_gpu(self) -> bool:
        return self.unavailable() is None

    def gpu_install(self, cuda_major: int | None) -> str:
        return f"pip install '{trt_extra(cuda_major)}'"

    def load(self, path: Path, precision: str | None, opts: LoadOptions) -> Engine:
        if opts.provider not in ("auto", "tensorrt"):
            raise EngineError(f"{path.name} is a TensorRT plan; it runs on TensorRT only (got --provider {opts.provider})")
        eng = TrtPlanEngine(path, device_id=opts.device_id)
        if precision is not None and precision != eng.meta.precision:
            raise EngineError(f"{path.name} is a {eng.meta.precision} plan; a plan runs at the precision it was built "
                              f"with, not {precision} (build another one with ami-export --engine trt)")
        return eng


BACKEND = TrtBackend()
