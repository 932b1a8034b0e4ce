"""ONNX Runtime: the engine of the base install (CPU), and of GPU boxes with onnxruntime-gpu
(CUDA / TensorRT execution providers).

``provider`` picks the execution provider: auto = TensorRT EP > CUDA EP > CPU, whichever this
onnxruntime build has (a GPU provider that fails at session creation falls back to the CPU and
says why); cpu / cuda / tensorrt force one and fail with the reason when it cannot run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .. import DIST_NAME
from ..artifact import INPUT_NAME, OUTPUT_NAME, ArtifactMeta, check_weights_digest
from .base import (
    Backend,
    Engine,
    EngineError,
    LoadOptions,
    TensorInfo,
    cache_root,
    check_io,
    first_line,
    meta_from_props,
    missing_library,
    not_loadable,
    require_library,
)

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PROVIDER_CHOICES = ("auto", *PROVIDER_NAMES)
# Batch range of the TensorRT execution provider's optimisation profile (explicit, so ORT does not
# rebuild its engine whenever a new batch size shows up).
TRT_EP_MAX_BATCH = 256


# -- ONNX Runtime --------------------------------------------------------------------------------

def _ort():
    return require_library("onnxruntime", "onnxruntime", "pip install onnxruntime")


def _model_key(path: Path, meta_json: str, ort_version: str) -> str:
    """A cache key for TensorRT EP engines: ORT's own cache names do not change when only the
    weights change, so the key covers the file's size, head and tail bytes, metadata and ORT version."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{size}\n{ort_version}\n{meta_json}\n".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    try:  # the TensorRT version matters too; a missing package just gives another key
        from importlib.metadata import version
        h.update(version("tensorrt").encode())
    except Exception:  # BLE001
        pass
    return h.hexdigest()[:16]


def usable_providers(ort) -> tuple[list[str], str]:
    """ONNX Runtime's available providers, less the TensorRT provider when TensorRT's library does
    not load (onnxruntime-gpu lists it regardless, then silently runs on CUDA); and why it was dropped."""
    available = list(ort.get_available_providers())
    trt = PROVIDER_NAMES["tensorrt"]
    if trt in available:
        from ..gpu import tensorrt_libraries

        ok, why = tensorrt_libraries()
        if not ok:
            return [p for p in available if p != trt], f"{trt} is listed by onnxruntime but TensorRT does not load ({why})"
    return available, ""


def _auto_note(asked: list, used: str, trt_note: str) -> str:
    """What provider="auto" gave up, in words ('' when it got its first choice)."""
    names = [p if isinstance(p, str) else p[0] for p in asked]
    if trt_note:
        return f"{trt_note}; running on {used}"
    if names and names[0] != used:
        return f"{names[0]} did not load (ONNX Runtime gave no error); running on {used}"
    return ""


def _provider_list(ort, provider: str, path: Path, meta_json: str, input_size: int,
                   cache_dir: Path | None, max_batch: int, device_id: int) -> list:
    if provider not in PROVIDER_CHOICES:
        raise EngineError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    available, trt_note = usable_providers(ort)
    cpu = "CPUExecutionProvider"
    if provider == "auto":
        wanted = [PROVIDER_NAMES[p] for p in ("tensorrt", "cuda") if PROVIDER_NAMES[p] in available]
    elif provider == "cpu":
        wanted = []
    else:
        name = PROVIDER_NAMES[provider]
        if name not in available:
            hint = ("install onnxruntime-gpu (instead of onnxruntime) on a machine with an NVIDIA GPU"
                    + (f" and TensorRT (`pip install '{DIST_NAME}[trt-cu12]'` or `'{DIST_NAME}[trt-cu13]'`, by the CUDA Version "
                       "nvidia-smi prints)" if provider == "tensorrt" else ""))
            raise EngineError(f"{name} is not available in this onnxruntime "
                              f"{ort.__version__} (available: {', '.join(available)}); "
                              + (f"{trt_note}; " if trt_note and provider == "tensorrt" else "") + hint)
        wanted = [name]
        if provider == "tensorrt" and PROVIDER_NAMES["cuda"] in available:
            wanted.append(PROVIDER_NAMES["cuda"])  # for any node TensorRT cannot take
    out: list = []
    for name in wanted:
        if name == PROVIDER_NAMES["tensorrt"]:
            cache = Path(cache_dir) if cache_dir else cache_root() / "trt-ep" / _model_key(path, meta_json, ort.__version__)
            cache.mkdir(parents=True, exist_ok=True)

            def shape(n: int, s: int = input_size) -> str:
                return f"{INPUT_NAME}:{n}x{s}x{s}x3"

            out.append((name, {
                "device_id": device_id,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
                "trt_profile_min_shapes": shape(1),
                "trt_profile_opt_shapes": shape(min(64, max_batch)),
                "trt_profile_max_shapes": shape(max_batch),
            }))
        elif name == PROVIDER_NAMES["cuda"]:
            out.append((name, {"device_id": device_id}))
    out.append(cpu)
    return out


class OrtEngine(Engine):
    """An ONNX artefact run by ONNX Runtime."""

    engine, title = "onnxruntime", "ONNX Runtime"

    def __init__(self, path: Path, provider: str = "auto", threads: int = 0, *, cache_dir: Path | None = None,
                 max_batch: int = TRT_EP_MAX_BATCH, device_id: int = 0, spin: bool = False):
        ort = _ort()
        self.path = path
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one branch: no inter-op parallelism
        so.intra_op_num_threads = max(0, int(threads))  # 0 = ONNX Runtime's choice (physical cores)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # errors only: no warning spam on the terminal
        # Spinning intra-op threads burn the cores that decode crops in the pipeline; off by default.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")

        # The TensorRT EP needs the input size (from the metadata) for its profile shapes before the
        # real session exists: only then is the metadata read first, through an unoptimised CPU session.
        available, trt_note = usable_providers(ort)
        needs_trt = provider in ("tensorrt", "auto") and PROVIDER_NAMES["tensorrt"] in available
        if needs_trt:
            meta, meta_json = _read_onnx_meta(ort, path)
            providers = _provider_list(ort, provider, path, meta_json, meta.preprocess.input_size,
                                       cache_dir, max_batch, device_id)
        else:
            providers = _provider_list(ort, provider, path, "", 0, cache_dir, max_batch, device_id)
        self.fallback = ""  # why a GPU provider was given up for the CPU (auto only)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own exception types for bad files
            if providers == ["CPUExecutionProvider"]:
                raise not_loadable(path, first_line(e)) from None
            # A GPU provider may fail where the file is fine (libraries, driver, an op it cannot take).
            gpu_error = first_line(e)
            try:
                self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
            except Exception as e2:  # BLE001
                raise not_loadable(path, first_line(e2)) from None
            names = [p if isinstance(p, str) else p[0] for p in providers[:-1]]
            if provider != "auto":
                raise EngineError(f"{', '.join(names)} could not run {path.name}: {gpu_error}") from None
            self.fallback = f"{', '.join(names)} failed ({gpu_error}); running on the CPU"
        self.meta = _meta_from_session(self.session, path)
        self.weights_verified = check_weights_digest(path, self.meta)
        used = self.session.get_providers()
        self.provider = used[0] if used else "CPUExecutionProvider"
        self.device = "cpu" if self.provider == "CPUExecutionProvider" else "cuda"
        if provider == "auto" and not self.fallback:
            self.fallback = _auto_note(providers, self.provider, trt_note)
        if provider != "auto" and self.provider != PROVIDER_NAMES[provider]:
            raise EngineError(f"asked for {PROVIDER_NAMES[provider]} but ONNX Runtime fell back to {self.provider} "
                              "(its libraries failed to load; run with ORT logging to see why)")
        _check_io(self.session, self.meta, path)
        self._out = [OUTPUT_NAME]

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        x = self.check_batch(pixels)
        if len(x) == 0:
            return np.zeros((0,), np.float32)
        (p,) = self.session.run(self._out, {INPUT_NAME: x})
        return np.asarray(p, dtype=np.float32).reshape(len(x))


def _read_onnx_meta(ort, path: Path) -> tuple[ArtifactMeta, str]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        s = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # BLE001
        raise not_loadable(path, first_line(e)) from None
    meta = _meta_from_session(s, path)
    return meta, meta.to_json()


def check_loadable(path: Path) -> ArtifactMeta:
    """The artefact's metadata if ONNX Runtime can read ``path`` as an ami ONNX model; else the
    ArtifactError ONNX Runtime's engine would raise. Other engines use it to tell a bad file
    (refused by every engine) from one they cannot read themselves (auto then falls back)."""
    return _read_onnx_meta(_ort(), path)[0]


def _meta_from_session(session, path: Path) -> ArtifactMeta:
    return meta_from_props(session.get_modelmeta().custom_metadata_map, path)


def _tensors(args) -> list[TensorInfo]:
    return [TensorInfo(a.name, a.type, tuple(a.shape)) for a in args]


def _check_io(session, meta: ArtifactMeta, path: Path) -> None:
    check_io(_tensors(session.get_inputs()), _tensors(session.get_outputs()), meta, path)


# -- the plug-in ---------------------------------------------------------------------------------

class OrtBackend(Backend):
    name = "onnxruntime"
    title = "ONNX Runtime"
    install = "pip install onnxruntime (a base dependency; onnxruntime-gpu on a GPU box)"

    def unavailable(self) -> str | None:
        return missing_library("onnxruntime", "onnxruntime", self.install)

    def version(self) -> str:
        return _ort().__version__

    def gpu_providers(self) -> list[str]:
        avail, _ = usable_providers(_ort())
        return [PROVIDER_NAMES[p] for p in ("tensorrt", "cuda") if PROVIDER_NAMES[p] in avail]

    def auto_rank(self, path: Path) -> tuple[float, str] | None:
        gpu = self.gpu_providers()
        if gpu:
            return 80.0, (f"ONNX Runtime {self.version()} with {', '.join(gpu)} (onnxruntime-gpu): an NVIDIA GPU "
                          "runs the model far faster than any CPU engine")
        return 10.0, f"ONNX Runtime {self.version()} on the CPU (the base install's engine)"

    def load(self, path: Path, precision: str | None, opts: LoadOptions) -> Engine:
        eng = OrtEngine(path, opts.provider, opts.threads, cache_dir=Path(opts.cache_dir) if opts.cache_dir else None,
                        max_batch=opts.max_batch, device_id=opts.device_id, spin=opts.spin)
        if precision is not None and precision != eng.meta.precision:
            raise EngineError(f"ONNX Runtime runs {path.name} at its own precision ({eng.meta.precision}) only, not "
                              f"{precision}; use --engine openvino for bf16 on the CPU, or export an artefact of "
                              "that precision (ami-export)")
        return eng


BACKEND = OrtBackend()
