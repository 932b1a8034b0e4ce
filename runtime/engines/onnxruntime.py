"""ONNX Runtime: the engine of the base install (CPU), and of GPU boxes with onnxruntime-gpu
(CUDA / TensorRT execution providers).

``provider`` picks the execution provider: auto = TensorRT EP > CUDA EP > CPU, whichever this
onnxruntime build has (a GPU provider that fails at session creation falls back to the CPU and
says why); cpu / cuda / tensorrt force one and fail with the reason when it cannot run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import DIST_NAME
from ..artifact import INPUT_NAME, OUTPUT_NAME, ArtifactMeta, check_weights_digest, onnx_weights_digest
from ..errors import first_line
from . import cache
from .base import (
    TRT_EP_MAX_BATCH,
    Backend,
    Engine,
    EngineError,
    LoadOptions,
    Row,
    TensorInfo,
    cache_root,
    check_io,
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


# -- ONNX Runtime --------------------------------------------------------------------------------

def _ort():
    return require_library("onnxruntime", "onnxruntime", "pip install onnxruntime")


def trt_ep_cache(root: Path | None, path: Path, meta: ArtifactMeta, ort_version: str, max_batch: int,
                 device_id: int) -> cache.CacheEntry:
    """The verified cache entry for the TensorRT EP's engines of this artefact: ORT's own cache
    names do not change when only the weights change, so the entry is keyed by the weights digest,
    the ONNX Runtime and TensorRT versions, the precision, the profile and the device, and sealed
    by a manifest of its files (a changed engine file is found at load and rebuilt)."""
    from ..gpu import package_version

    return cache.CacheEntry.open(root or cache_root() / "trt-ep", engine="onnxruntime-tensorrt",
                                 weights=meta.weights_digest or onnx_weights_digest(path), version=ort_version,
                                 tensorrt=package_version("tensorrt") or "", precision=meta.precision,
                                 device=f"cuda:{device_id}", max_batch=max_batch, input_size=meta.preprocess.input_size)


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


def cuda_options(ort_version: str, device_id: int) -> dict:
    """The CUDA provider's options. TF32 off: ONNX Runtime turns it on by default for float
    convolutions and GEMMs (``use_tf32``, from 1.18 on), which moves an "fp32" result by up to 5e-4,
    beyond the fp32 parity tolerance. (The TensorRT provider has no such option: only the process-wide
    ``NVIDIA_TF32_OVERRIDE=0`` turns TF32 off there.)"""
    opts: dict = {"device_id": device_id}
    try:
        newer = tuple(int(v) for v in ort_version.split(".")[:2]) >= (1, 18)
    except ValueError:
        newer = True
    if newer:
        opts["use_tf32"] = 0
    return opts


def _provider_list(ort, provider: str, input_size: int, cache_dir: Path | None, max_batch: int,
                   device_id: int) -> list:
    """ONNX Runtime's provider list for ``provider``; ``cache_dir``: the TensorRT EP's (verified) cache entry."""
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
                    + (f" and TensorRT (`pip install '{DIST_NAME}[trt-cu12]'` or `'{DIST_NAME}[trt-cu13]'`, by the "
                       "CUDA Version nvidia-smi prints)" if provider == "tensorrt" else ""))
            raise EngineError(f"{name} is not available in this onnxruntime "
                              f"{ort.__version__} (available: {', '.join(available)}); "
                              + (f"{trt_note}; " if trt_note and provider == "tensorrt" else "") + hint)
        wanted = [name]
        if provider == "tensorrt" and PROVIDER_NAMES["cuda"] in available:
            wanted.append(PROVIDER_NAMES["cuda"])  # for any node TensorRT cannot take
    out: list = []
    for name in wanted:
        if name == PROVIDER_NAMES["tensorrt"]:
            cache = Path(cache_dir) if cache_dir else cache_root() / "trt-ep"

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
            out.append((name, cuda_options(ort.__version__, device_id)))
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
        self._cache = None  # the TensorRT EP's engine cache entry, sealed once its engines are built
        verified = None
        if provider in ("tensorrt", "auto") and PROVIDER_NAMES["tensorrt"] in available:
            meta = check_loadable(path)
            verified = check_weights_digest(path, meta)  # before anything is compiled into the cache
            self._cache = trt_ep_cache(cache_dir, path, meta, ort.__version__, max_batch, device_id)
            self.cache_note = self._cache.note
            providers = _provider_list(ort, provider, meta.preprocess.input_size, self._cache.dir, max_batch, device_id)
        else:
            providers = _provider_list(ort, provider, 0, None, max_batch, device_id)
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
        self.weights_verified = check_weights_digest(path, self.meta) if verified is None else verified
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
        if self._cache is not None and self.provider != PROVIDER_NAMES["tensorrt"]:
            self._cache = None  # the TensorRT EP did not run: nothing of it to seal
        self._seal()

    def _seal(self) -> None:
        """Seal the TensorRT EP's cache entry (after session creation, and again after the first
        batch: the EP may build its engines lazily)."""
        if self._cache is not None:
            self._cache.seal()

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Thread-safe: ONNX Runtime's ``InferenceSession.run`` may be called from several threads."""
        x = self.check_batch(pixels)
        if len(x) == 0:
            return np.zeros((0,), np.float32)
        (p,) = self.session.run(self._out, {INPUT_NAME: x})
        if self._cache is not None:
            self._seal()
            self._cache = None
        return np.asarray(p, dtype=np.float32).reshape(len(x))


def _read_onnx_meta(ort, path: Path) -> ArtifactMeta:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        s = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # BLE001
        raise not_loadable(path, first_line(e)) from None
    return _meta_from_session(s, path)


def check_loadable(path: Path) -> ArtifactMeta:
    """The artefact's metadata if ONNX Runtime can read ``path`` as an ami ONNX model; else the
    ArtifactError ONNX Runtime's engine would raise. Other engines use it to tell a bad file
    (refused by every engine) from one they cannot read themselves (auto then falls back)."""
    return _read_onnx_meta(_ort(), path)


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
    providers = tuple(PROVIDER_NAMES)
    precisions_known = ("fp32", "fp16", "int8")  # an artefact's own precision, whichever it is
    options = ("threads", "provider", "cache_dir", "max_batch", "device_id", "spin")
    nominal_rank = 10.0  # on the CPU; 80 with a GPU provider

    def unavailable(self) -> str | None:
        return missing_library("onnxruntime", "onnxruntime", self.install)

    def version(self) -> str:
        return _ort().__version__

    def gpu_providers(self) -> list[str]:
        avail, _ = usable_providers(_ort())
        return [PROVIDER_NAMES[p] for p in ("tensorrt", "cuda") if PROVIDER_NAMES[p] in avail]

    def uses_gpu(self) -> bool:
        return self.unavailable() is None and bool(self.gpu_providers())

    def gpu_install(self, cuda_major: int | None) -> str:
        from ..gpu import trt_extra

        return f"pip uninstall onnxruntime && pip install onnxruntime-gpu '{trt_extra(cuda_major)}'"

    def auto_rank(self, path: Path) -> tuple[float, str] | None:
        gpu = self.gpu_providers()
        if gpu:
            return 80.0, (f"ONNX Runtime {self.version()} with {', '.join(gpu)} (onnxruntime-gpu): an NVIDIA GPU "
                          "runs the model far faster than any CPU engine")
        return self.nominal_rank, f"ONNX Runtime {self.version()} on the CPU (the base install's engine)"

    def rows(self, artefact_precision: str, provider: str = "auto", *, gpu_providers: bool = False) -> list[Row]:
        """The artefact at its own precision on ``provider``; with ``gpu_providers``, also on CUDA
        when this onnxruntime has it (and ``provider`` does not already run on the GPU)."""
        prov = provider if provider in self.providers else "auto"
        gpu = self.gpu_providers()
        on_gpu = prov in ("cuda", "tensorrt") or (prov == "auto" and bool(gpu))
        out = [Row(self.name, self.title, artefact_precision, prov, "cuda" if on_gpu else "cpu")]
        if gpu_providers and not on_gpu and PROVIDER_NAMES["cuda"] in gpu:
            out.append(Row(self.name, f"{self.title} CUDA", artefact_precision, "cuda", "cuda"))
        return out

    def load(self, path: Path, precision: str | None, opts: LoadOptions) -> Engine:
        eng = OrtEngine(path, opts.provider, opts.threads, cache_dir=Path(opts.cache_dir) if opts.cache_dir else None,
                        max_batch=opts.max_batch, device_id=opts.device_id, spin=opts.spin)
        eng.provider_choice = opts.provider
        if precision is not None and precision != eng.meta.precision:
            raise EngineError(f"ONNX Runtime runs {path.name} at its own precision ({eng.meta.precision}) only, not "
                              f"{precision}; use --engine openvino for bf16 on the CPU, or export an artefact of "
                              "that precision (ami-export)")
        return eng


BACKEND = OrtBackend()
