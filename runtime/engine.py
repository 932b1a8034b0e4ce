"""Load an exported ami artefact and run it, without torch.

:func:`load_engine` is the one door: it takes an ONNX file (ONNX Runtime, CPU / CUDA / TensorRT
execution providers) or a TensorRT plan (``.plan`` / ``.engine``, run by TensorRT directly, see
:mod:`ami.runtime.trt`), checks that it honours the artefact contract of
:mod:`ami.runtime.artifact`, and returns an :class:`Engine`::

    eng = load_engine("edge.onnx")             # provider="auto": TensorRT EP > CUDA EP > CPU
    probs = eng.predict(batch_uint8_nhwc)       # float32 [N], P(Atypical)

Problems with the file itself (missing, truncated, not ONNX, no or bad ``ami`` metadata, an input
that is not ``pixels`` uint8 NHWC at the metadata's size) raise :class:`ArtifactError`; problems
with the machine (a provider that is not installed, a plan built for another GPU) raise
:class:`EngineError`. Both carry a message meant for a person, not a stack trace.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .artifact import (INPUT_NAME, META_KEY, OUTPUT_NAME, ArtifactError, ArtifactMeta, check_batch_axis,
                       check_weights_digest)

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "edge.onnx"
PLAN_SUFFIXES = (".plan", ".engine", ".trt")
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PROVIDER_CHOICES = ("auto", *PROVIDER_NAMES)
# Batch range of the TensorRT execution provider's optimisation profile (explicit, so ORT does not
# rebuild its engine whenever a new batch size shows up).
TRT_EP_MAX_BATCH = 256


class EngineError(RuntimeError):
    """The machine cannot run an artefact: a provider or library is missing, or a plan does not fit."""


class Engine:
    """A loaded artefact. ``predict`` takes uint8 NHWC RGB pixels at ``input_size`` and returns
    float32 probabilities of the Atypical class, shape ``[N]``."""

    meta: ArtifactMeta
    provider: str
    path: Path

    @property
    def input_size(self) -> int:
        return self.meta.preprocess.input_size

    @property
    def threshold(self) -> float:
        return float(self.meta.threshold)

    def check_batch(self, pixels: np.ndarray) -> np.ndarray:
        s = self.input_size
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
            raise ValueError(f"pixels must be a uint8 numpy array, got {getattr(pixels, 'dtype', type(pixels))}")
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"pixels must have shape [N, {s}, {s}, 3] (NHWC RGB), got {list(pixels.shape)}")
        return np.ascontiguousarray(pixels)

    def predict(self, pixels: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    fallback: str = ""
    weights_verified: bool = False  # True: the weights digest in the metadata was recomputed and matched

    def describe(self) -> str:
        m = self.meta
        text = (f"{self.path.name}: model {m.model} ({m.method}, {m.precision}), input {self.input_size}px, "
                f"threshold {m.threshold:g}, provider {self.provider}")
        return text + (f" [{self.fallback}]" if self.fallback else "")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


# -- ONNX Runtime --------------------------------------------------------------------------------

def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - a base dependency
        raise EngineError(f"onnxruntime is not installed ({e}); `pip install onnxruntime`") from None
    return ort


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ami"


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
    except Exception:  # noqa: BLE001
        pass
    return h.hexdigest()[:16]


def _provider_list(ort, provider: str, path: Path, meta_json: str, input_size: int,
                   cache_dir: Path | None, max_batch: int, device_id: int) -> list:
    if provider not in PROVIDER_CHOICES:
        raise EngineError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    available = ort.get_available_providers()
    cpu = "CPUExecutionProvider"
    if provider == "auto":
        wanted = [PROVIDER_NAMES[p] for p in ("tensorrt", "cuda") if PROVIDER_NAMES[p] in available]
    elif provider == "cpu":
        wanted = []
    else:
        name = PROVIDER_NAMES[provider]
        if name not in available:
            hint = ("install onnxruntime-gpu (instead of onnxruntime) on a machine with an NVIDIA GPU"
                    + (" and TensorRT (`pip install 'ami[trt]'`)" if provider == "tensorrt" else ""))
            raise EngineError(f"{name} is not available in this onnxruntime "
                              f"{ort.__version__} (available: {', '.join(available)}); {hint}")
        wanted = [name]
        if provider == "tensorrt" and PROVIDER_NAMES["cuda"] in available:
            wanted.append(PROVIDER_NAMES["cuda"])  # for any node TensorRT cannot take
    out: list = []
    for name in wanted:
        if name == PROVIDER_NAMES["tensorrt"]:
            cache = Path(cache_dir) if cache_dir else _cache_root() / "trt-ep" / _model_key(path, meta_json, ort.__version__)
            cache.mkdir(parents=True, exist_ok=True)
            s = input_size
            shape = lambda n: f"{INPUT_NAME}:{n}x{s}x{s}x3"  # noqa: E731
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class OrtEngine(Engine):
    """An ONNX artefact run by ONNX Runtime."""

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
        available = ort.get_available_providers()
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
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for bad files
            if providers == ["CPUExecutionProvider"]:
                raise ArtifactError(f"{path} is not a loadable ONNX model (corrupted or truncated?): {_first_line(e)}") from None
            # A GPU provider may fail where the file is fine (libraries, driver, an op it cannot take).
            gpu_error = _first_line(e)
            try:
                self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
            except Exception as e2:  # noqa: BLE001
                raise ArtifactError(f"{path} is not a loadable ONNX model (corrupted or truncated?): {_first_line(e2)}") from None
            names = [p if isinstance(p, str) else p[0] for p in providers[:-1]]
            if provider != "auto":
                raise EngineError(f"{', '.join(names)} could not run {path.name}: {gpu_error}") from None
            self.fallback = f"{', '.join(names)} failed ({gpu_error}); running on the CPU"
        self.meta = _meta_from_session(self.session, path)
        self.weights_verified = check_weights_digest(path, self.meta)
        used = self.session.get_providers()
        self.provider = used[0] if used else "CPUExecutionProvider"
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
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path} is not a loadable ONNX model (corrupted or truncated?): {_first_line(e)}") from None
    meta = _meta_from_session(s, path)
    return meta, meta.to_json()


def _meta_from_session(session, path: Path) -> ArtifactMeta:
    props = session.get_modelmeta().custom_metadata_map or {}
    if META_KEY not in props:
        raise ArtifactError(f"{path} has no '{META_KEY}' metadata: it is not an ami artefact "
                            "(export it with `ami-export`, which records preprocessing, classes and threshold)")
    try:
        return ArtifactMeta.from_json(props[META_KEY])
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ArtifactError(f"{path}: artefact metadata is malformed ({type(e).__name__}: {e})") from None


def _check_io(session, meta: ArtifactMeta, path: Path) -> None:
    s = meta.preprocess.input_size
    ins, outs = session.get_inputs(), session.get_outputs()
    names = [i.name for i in ins]
    if names != [INPUT_NAME]:
        raise ArtifactError(f"{path}: inputs are {names}, expected exactly one named '{INPUT_NAME}'")
    i = ins[0]
    if i.type != "tensor(uint8)":
        raise ArtifactError(f"{path}: input '{INPUT_NAME}' is {i.type}, expected tensor(uint8) "
                            "(the ami contract: the graph takes raw uint8 NHWC pixels and normalises itself)")
    shape = list(i.shape)
    check_batch_axis(shape, path)
    want = [None, s, s, 3]
    if len(shape) != 4 or any(isinstance(d, int) and w is not None and d != w for d, w in zip(shape[1:], want[1:], strict=False)):
        raise ArtifactError(f"{path}: input '{INPUT_NAME}' has shape {shape}, expected [N, {s}, {s}, 3] "
                            f"(NHWC at the metadata's input_size {s})")
    onames = [o.name for o in outs]
    if OUTPUT_NAME not in onames:
        raise ArtifactError(f"{path}: outputs are {onames}, expected one named '{OUTPUT_NAME}'")
    o = outs[onames.index(OUTPUT_NAME)]
    if o.type != "tensor(float)":
        raise ArtifactError(f"{path}: output '{OUTPUT_NAME}' is {o.type}, expected tensor(float)")
    if len(o.shape) != 1:
        raise ArtifactError(f"{path}: output '{OUTPUT_NAME}' has shape {list(o.shape)}, expected [N]")


# -- the door ------------------------------------------------------------------------------------

def default_model_path() -> Path:
    return DEFAULT_MODEL


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        p = default_model_path()
        if not p.is_file():
            raise ArtifactError(f"no shipped model found at {p} (the package was installed without its edge "
                                "model); pass --model FILE with an exported ami ONNX model or TensorRT plan")
        return p
    p = Path(path).expanduser()
    if not p.exists():
        raise ArtifactError(f"model file not found: {p}")
    if p.is_dir():
        raise ArtifactError(f"model path is a directory, not a file: {p}")
    if p.stat().st_size == 0:
        raise ArtifactError(f"model file is empty: {p}")
    if not os.access(p, os.R_OK):
        raise ArtifactError(f"model file is not readable (permission denied): {p}")
    return p


def load_engine(path: str | os.PathLike | None = None, provider: str = "auto", threads: int = 0, *,
                cache_dir: str | os.PathLike | None = None, max_batch: int = TRT_EP_MAX_BATCH,
                device_id: int = 0, spin: bool = False) -> Engine:
    """Load an ami artefact.

    ``path``: an ONNX file or a TensorRT plan (``.plan``/``.engine``/``.trt``); None = the model
    shipped in the package. ``provider``: auto | cpu | cuda | tensorrt (ONNX only; a plan always runs
    on TensorRT). ``threads``: ONNX Runtime intra-op threads (0 = its default). ``cache_dir``: where
    the TensorRT execution provider keeps its engines (default ``~/.cache/ami/trt-ep/<model key>``).
    ``max_batch``: the largest batch of the TensorRT EP's optimisation profile.
    """
    p = resolve_model_path(path)
    if p.suffix.lower() in PLAN_SUFFIXES:
        if provider not in ("auto", "tensorrt"):
            raise EngineError(f"{p.name} is a TensorRT plan; it runs on TensorRT only (got --provider {provider})")
        from .trt import TrtPlanEngine  # lazy: tensorrt and cuda-python are GPU-box extras

        return TrtPlanEngine(p, device_id=device_id)
    return OrtEngine(p, provider, threads, cache_dir=Path(cache_dir) if cache_dir else None,
                     max_batch=max_batch, device_id=device_id, spin=spin)
