"""The one small interface every inference engine implements, and what they share.

An engine plug-in is one module in :mod:`ami.runtime.engines` that defines ``BACKEND``, an
instance of a :class:`Backend` subclass, and is named by one line of the registry
(:data:`ami.runtime.engines.REGISTRY`). A backend says

* which artefact files it loads (``suffixes``) and whether it can run on this machine
  (:meth:`Backend.unavailable`: None, or the reason and the install hint);
* at which precisions it runs an artefact here (:meth:`Backend.precisions`: the first one is its
  default, e.g. an fp32 ONNX file on OpenVINO: ``("fp32", "bf16")`` on a CPU with bf16);
* how it ranks for ``--engine auto`` (:meth:`Backend.auto_rank`: a score and the reason, from
  measurements in the README's engine tables);
* how to load an artefact (:meth:`Backend.load`), returning an :class:`Engine`.

An :class:`Engine` takes uint8 NHWC RGB pixels and returns float32 probabilities of the Atypical
class. Every engine checks the same artefact contract (:func:`check_io`, :func:`meta_from_props`),
so a bad file gets the same message whichever engine reads it. Heavy libraries (onnxruntime,
openvino, tensorrt) are imported inside the plug-ins' functions, never at module import.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import INPUT_NAME, META_KEY, OUTPUT_NAME, ArtifactError, ArtifactMeta, check_batch_axis
from ..errors import EXIT_FAULT, Fault, Unavailable

# Precision names, as artefact metadata and engines report them. "f32" is accepted for "fp32".
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# Batch range of the TensorRT execution provider's optimisation profile (explicit, so ORT does not
# rebuild its engine whenever a new batch size shows up).
TRT_EP_MAX_BATCH = 256
PRECISION_ALIASES = {"f32": "fp32", "float32": "fp32", "bfloat16": "bf16", "f16": "fp16", "float16": "fp16"}


class EngineError(Unavailable, RuntimeError):
    """The machine cannot run an artefact: an engine or library is missing, or a plan does not fit
    (exit 3). RuntimeError stays a base, so existing ``except RuntimeError`` clauses still catch it."""


class EngineFault(EngineError, Fault):
    """A loaded engine failed or returned nonsense while running (exit 4)."""

    exit_code = EXIT_FAULT


def normalize_precision(p: str | None) -> str | None:
    if p is None or p == "auto":
        return None
    q = PRECISION_ALIASES.get(str(p).lower(), str(p).lower())
    if q not in PRECISIONS:
        raise EngineError(f"unknown precision {p!r}; choose one of {', '.join(PRECISIONS)} (or auto: the artefact's own)")
    return q


@dataclass
class LoadOptions:
    """Knobs :func:`~ami.runtime.engines.load_engine` passes to every backend; each uses what applies."""

    threads: int = 0  # CPU threads (0 = the engine's default: all physical cores)
    provider: str = "auto"  # ONNX Runtime execution provider: auto | cpu | cuda | tensorrt
    cache_dir: Path | None = None  # compiled-model cache (OpenVINO) / TensorRT EP engine cache
    max_batch: int = TRT_EP_MAX_BATCH  # largest batch of a TensorRT EP optimisation profile
    device_id: int = 0  # CUDA device
    spin: bool = False  # ONNX Runtime intra-op spinning


class Engine:
    """A loaded artefact. ``predict`` takes uint8 NHWC RGB pixels at ``input_size`` and returns
    float32 probabilities of the Atypical class, shape ``[N]``. ``predict`` may be called from
    several threads at once (each engine makes that safe its own way)."""

    meta: ArtifactMeta
    provider: str  # what actually runs it, e.g. "CPUExecutionProvider", "OpenVINO 2026.4.1 CPU"
    path: Path
    engine: str = ""  # registry name of the backend: onnxruntime | openvino | tensorrt
    title: str = ""  # its display name: ONNX Runtime | OpenVINO | TensorRT
    device: str = "cpu"  # cpu | cuda
    fallback: str = ""  # why a faster choice was given up (auto only)
    weights_verified: bool = False  # True: the weights digest in the metadata was recomputed and matched
    choice: str = ""  # how --engine auto chose this engine ("" when the engine was named)
    provider_choice: str = "auto"  # the --provider it was loaded with
    run_precision: str = ""  # the precision it computes in ("" = the artefact's)
    cache_note: str = ""  # why a compiled-model cache entry was discarded and rebuilt at this load ("" = it was not)

    @property
    def input_size(self) -> int:
        return self.meta.preprocess.input_size

    @property
    def threshold(self) -> float:
        return float(self.meta.threshold)

    @property
    def precision(self) -> str:
        """The precision this engine computes in: the artefact's, unless the engine was asked for
        another one (OpenVINO bf16 on an fp32 artefact). Parity tolerances follow this."""
        return self.run_precision or self.meta.precision

    def check_batch(self, pixels: np.ndarray) -> np.ndarray:
        s = self.input_size
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
            raise ValueError(f"pixels must be a uint8 numpy array, got {getattr(pixels, 'dtype', type(pixels))}")
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"pixels must have shape [N, {s}, {s}, 3] (NHWC RGB), got {list(pixels.shape)}")
        return np.ascontiguousarray(pixels)

    def predict(self, pixels: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        m = self.meta
        prec = m.precision if self.precision == m.precision else f"{m.precision} artefact run in {self.precision}"
        text = (f"{self.path.name}: model {m.model} ({m.method}, {prec}), input {self.input_size}px, "
                f"threshold {m.threshold:g}, engine {self.title or self.engine}, provider {self.provider}")
        return text + (f" [{self.fallback}]" if self.fallback else "")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


@dataclass(frozen=True)
class Row:
    """One variant of an artefact on an engine, as parity and latency tables list them:
    ``load_engine(path, **row.load_kwargs())`` loads it."""

    engine: str  # registry name
    title: str  # the engine's display name
    precision: str  # the precision it computes in
    provider: str = "auto"  # the --provider it runs on (auto: the engine's own choice)
    device: str = "cpu"  # cpu | cuda: where it computes

    def load_kwargs(self) -> dict:
        return {"engine": self.engine, "precision": self.precision, "provider": self.provider}

    def matches(self, eng: Engine) -> bool:
        """True when ``eng`` (an already loaded engine) is this variant."""
        return eng.engine == self.engine and eng.precision == self.precision and (
            self.provider == "auto" or eng.provider_choice == self.provider)


class Backend:
    """One inference engine as a plug-in; see the module docstring. Subclasses set the class
    attributes and implement :meth:`load`; the rest has sensible defaults."""

    name: str = ""  # registry key, e.g. "openvino"
    title: str = ""  # for people, e.g. "OpenVINO"
    suffixes: tuple[str, ...] = (".onnx",)  # artefact files it loads
    artefact: str = "an ONNX model"  # what those files are, for people
    install: str = ""  # how to get it, e.g. "pip install 'ami-mitosis[openvino]'"
    providers: tuple[str, ...] = ()  # --provider values it honours; naming one (not auto) selects this engine
    precisions_known: tuple[str, ...] = ()  # every precision it can run some artefact at (--precision choices)
    options: tuple[str, ...] = ("threads",)  # the LoadOptions fields it uses
    nominal_rank: float = 0.0  # its auto rank where installed: a missing engine above the pick is hinted
    late_check: bool = False  # load() says itself what is missing, after checking the file (a plan's side file)
    gpu_only: bool = False  # runs on an NVIDIA GPU only (its absence is no news on a CPU box)

    def accepts(self, path: str | os.PathLike) -> bool:
        return Path(path).suffix.lower() in self.suffixes

    def unavailable(self) -> str | None:
        """None when the engine can run here, else why not (with the install hint)."""
        return None

    def version(self) -> str:
        return ""

    def precisions(self, artefact_precision: str) -> tuple[str, ...]:
        """Precisions it runs an artefact of ``artefact_precision`` at on this machine; first = default."""
        return (artefact_precision,)

    def auto_rank(self, path: Path) -> tuple[float, str] | None:
        """(score, reason) for ``--engine auto`` (higher wins), or None when it should not be picked."""
        return None

    def uses_gpu(self) -> bool:
        """True when this engine, installed here, runs on an NVIDIA GPU."""
        return False

    def gpu_install(self, cuda_major: int | None) -> str:
        """What to install for this engine to run on an NVIDIA GPU of a driver of that CUDA major ('' = never)."""
        return ""

    def rows(self, artefact_precision: str, provider: str = "auto", *, gpu_providers: bool = False) -> list[Row]:
        """The (precision, provider) variants of one artefact that parity and latency tables run on
        this engine here: every precision it offers, on ``provider`` when it honours it. With
        ``gpu_providers``, also its GPU providers usable here (latency times those)."""
        prov = provider if provider in self.providers else "auto"
        device = "cuda" if self.gpu_only else "cpu"
        return [Row(self.name, self.title, q, prov, device) for q in self.precisions(artefact_precision)]

    def load(self, path: Path, precision: str | None, opts: LoadOptions) -> Engine:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<engine {self.name}>"


# -- the artefact contract, shared by every engine ------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output as an engine sees it; ``type`` in ONNX's spelling
    (``tensor(uint8)``), ``shape`` with None (or a name) for a dynamic dimension."""

    name: str
    type: str
    shape: tuple
    names: frozenset = frozenset()  # every name of the tensor (OpenVINO may carry several)

    def called(self, name: str) -> bool:
        return name == self.name or name in self.names


def parse_batch_sizes(batches: str | Sequence[int]) -> list[int]:
    """'1,32,128' or [1, 32, 128] -> the distinct batch sizes, ascending (``ami-export --batch``,
    ``ami-bench latency --batch``). Raises ValueError saying what is wrong (callers prefix the option)."""
    if isinstance(batches, str):
        try:
            vals = [int(b) for b in batches.split(",") if b.strip()]
        except ValueError:
            raise ValueError(f"takes batch sizes like 1,32,128; got {batches!r}") from None
    else:
        try:
            vals = [int(b) for b in batches]
        except (TypeError, ValueError):
            raise ValueError(f"takes batch sizes like 1,32,128; got {batches!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"needs positive batch sizes, got {batches!r}")
    return sorted(set(vals))


def missing_library(module: str, label: str, install: str) -> str | None:
    """None when ``module`` imports, else why not and how to get it: the answer of a plug-in's
    :meth:`Backend.unavailable` for its library."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{label} is not installed ({e}); `{install}`"
    return None


def require_library(module: str, label: str, install: str):
    """``module``, imported when an engine first needs it; EngineError (why, and how to get it) without it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineError(f"{label} is not installed ({e}); `{install}`") from None


def not_loadable(path: Path, why: str) -> ArtifactError:
    """The error for a file that is not a readable ONNX model, in the same words whichever engine found it."""
    return ArtifactError(f"{path} is not a loadable ONNX model (corrupted or truncated?): {why}")


def meta_from_props(props: dict | None, path: Path) -> ArtifactMeta:
    """The artefact metadata from the model's metadata properties (``metadata_props`` of ONNX)."""
    props = props or {}
    if META_KEY not in props:
        raise ArtifactError(f"{path} has no '{META_KEY}' metadata: it is not an ami artefact "
                            "(export it with `ami-export`, which records preprocessing, classes and threshold)")
    try:
        return ArtifactMeta.from_json(props[META_KEY])
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ArtifactError(f"{path}: artefact metadata is malformed ({type(e).__name__}: {e})") from None


def check_io(inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo], meta: ArtifactMeta, path: Path) -> None:
    """Refuse a graph whose inputs/outputs break the ami contract, saying how."""
    s = meta.preprocess.input_size
    names = [i.name for i in inputs]
    if len(inputs) != 1 or not inputs[0].called(INPUT_NAME):
        raise ArtifactError(f"{path}: inputs are {names}, expected exactly one named '{INPUT_NAME}'")
    i = inputs[0]
    if i.type != "tensor(uint8)":
        raise ArtifactError(f"{path}: input '{INPUT_NAME}' is {i.type}, expected tensor(uint8) "
                            "(the ami contract: the graph takes raw uint8 NHWC pixels and normalises itself)")
    shape = list(i.shape)
    check_batch_axis(shape, path)
    want = [None, s, s, 3]
    if len(shape) != 4 or any(isinstance(d, int) and w is not None and d != w for d, w in zip(shape[1:], want[1:], strict=False)):
        raise ArtifactError(f"{path}: input '{INPUT_NAME}' has shape {shape}, expected [N, {s}, {s}, 3] "
                            f"(NHWC at the metadata's input_size {s})")
    onames = [o.name for o in outputs]
    found = [o for o in outputs if o.called(OUTPUT_NAME)]
    if not found:
        raise ArtifactError(f"{path}: outputs are {onames}, expected one named '{OUTPUT_NAME}'")
    o = found[0]
    if o.type != "tensor(float)":
        raise ArtifactError(f"{path}: output '{OUTPUT_NAME}' is {o.type}, expected tensor(float)")
    if len(o.shape) != 1:
        raise ArtifactError(f"{path}: output '{OUTPUT_NAME}' has shape {list(o.shape)}, expected [N]")


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/ami`` (default ``~/.cache/ami``): compiled models and engine caches."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ami"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_int8_features(flags: set[str] | None = None) -> str:
    """What the CPU offers for u8*s8 dot products, for people: 'AVX-512 VNNI', 'AVX-VNNI', 'AMX', or 'no VNNI'."""
    f = cpu_flags() if flags is None else flags
    have = [name for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"),
                                    ("avx_vnni", "AVX-VNNI"), ("asimddp", "Arm dot product")) if flag in f]
    return ", ".join(have) if have else "no VNNI (int8 runs on AVX2/AVX-512 without dot-product instructions)"
