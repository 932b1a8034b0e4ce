"""OpenVINO: the fastest engine for ami's ONNX artefacts on an x86 CPU (``pip install 'ami-mitosis[openvino]'``).

It reads the same self-describing ONNX files as ONNX Runtime and checks the same contract (the
``ami`` metadata comes through as the model's ``framework/ami`` runtime info). Precision is
explicit, never OpenVINO's silent default (bf16 on CPUs that have it):

* ``fp32`` (the default for an fp32 artefact): ``INFERENCE_PRECISION_HINT=f32``; labels match
  ONNX Runtime's;
* ``bf16`` (opt-in, fp32 artefacts, CPUs with bf16 only: AVX-512 BF16 or AMX): about twice as
  fast, within the fp16/bf16 parity tolerances;
* ``int8``: an int8 (QDQ) artefact; its quantised layers run on u8*s8 integer kernels (VNNI / AMX
  where the CPU has them), the layers the exporter left in float run in f32.

Compiled models are cached on disk (OpenVINO's ``CACHE_DIR``; default ``~/.cache/ami/openvino``,
under ``$XDG_CACHE_HOME`` when set; ``cache_dir=`` / ``--cache-dir`` to move it), so a second
start skips the compilation. Each compiled model has its own entry there, keyed by the weights
digest, OpenVINO's version, the precision, the device and the threads, and sealed by a manifest of
its files' digests (:mod:`.cache`): a blob changed on disk is found at load, deleted and compiled
again. ``threads`` sets ``INFERENCE_NUM_THREADS`` (0 = OpenVINO's default, one per physical core);
the latency hint keeps one stream that uses them all. One engine may be used from several threads:
each call takes an idle infer request (waiting for one when all are busy) and gives it back.
"""

from __future__ import annotations

import os
import queue
from pathlib import Path

import numpy as np

from .. import DIST_NAME
from ..artifact import ArtifactError, ArtifactMeta, check_weights_digest, onnx_weights_digest
from ..errors import first_line
from . import cache
from .base import (
    Backend,
    Engine,
    EngineError,
    LoadOptions,
    TensorInfo,
    cache_root,
    check_io,
    cpu_int8_features,
    meta_from_props,
    missing_library,
    not_loadable,
    require_library,
)

DEVICE = "CPU"
# OpenVINO element types in ONNX's spelling (the contract's error messages use it, whatever the engine).
_TYPES = {"u8": "uint8", "i8": "int8", "u16": "uint16", "i16": "int16", "i32": "int32", "i64": "int64",
          "u32": "uint32", "u64": "uint64", "f16": "float16", "bf16": "bfloat16", "f32": "float", "f64": "double",
          "boolean": "bool", "string": "string"}
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def _ov():
    return require_library("openvino", "OpenVINO", f"pip install '{DIST_NAME}[openvino]'")


_CORE = None


def core():
    """One OpenVINO Core per process (creating one loads its plugins)."""
    global _CORE
    if _CORE is None:
        _CORE = _ov().Core()
    return _CORE


def cpu_capabilities() -> set[str]:
    """OpenVINO's view of the CPU: a subset of FP32, BF16, FP16, INT8, ..."""
    try:
        return set(core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # BLE001
        return set()


def cpu_name() -> str:
    try:
        return str(core().get_property(DEVICE, "FULL_DEVICE_NAME"))
    except Exception:  # BLE001
        return "this CPU"


def default_cache_dir() -> Path:
    return cache_root() / "openvino"


def _tensor(port) -> TensorInfo:
    et = port.get_element_type().get_type_name()
    ps = port.get_partial_shape()
    shape: tuple = ()
    if ps.rank.is_static:
        shape = tuple(int(d.get_length()) if d.is_static else None for d in ps)
    names = frozenset(port.get_names())
    name = port.get_any_name() if names else ""
    return TensorInfo(name, f"tensor({_TYPES.get(et, et)})", shape, names)


def _meta_from_model(model, path: Path) -> ArtifactMeta:
    props = {}
    if model.has_rt_info(["framework", "ami"]):
        props["ami"] = model.get_rt_info(["framework", "ami"]).astype(str)
    return meta_from_props(props, path)


class OpenVinoEngine(Engine):
    """An ONNX artefact compiled by OpenVINO for the CPU."""

    engine, title, device = "openvino", "OpenVINO", "cpu"

    def __init__(self, path: Path, precision: str | None = None, threads: int = 0, *, cache_dir: Path | None = None):
        ov = _ov()
        self.path = Path(path)
        c = core()
        try:
            model = c.read_model(str(self.path))
        except Exception as e:  # OpenVINO raises RuntimeError for files it cannot parse
            why = first_line(e)
            try:  # a bad file for every engine, or only one OpenVINO cannot read (an op it lacks)?
                from .onnxruntime import check_loadable

                check_loadable(self.path)
            except (ArtifactError, EngineError):  # EngineError: no ONNX Runtime to ask; say what OpenVINO said
                raise not_loadable(self.path, why) from None
            raise EngineError(f"OpenVINO {ov.__version__.split('-')[0]} cannot read {self.path.name} (ONNX Runtime can): "
                              f"{why}") from None
        self.meta = _meta_from_model(model, self.path)
        self.weights_verified = check_weights_digest(self.path, self.meta)
        check_io([_tensor(p) for p in model.inputs], [_tensor(p) for p in model.outputs], self.meta, self.path)

        art = self.meta.precision
        supported = OvBackend().precisions(art)
        want = precision or supported[0]
        if want not in supported:
            raise EngineError(_precision_refusal(self.path.name, art, want))
        self.run_precision = want
        hint = "f32" if want == "int8" else _HINTS[want]  # int8: the layers left in float run in f32
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
        if threads and threads > 0:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        entry = self._cache_entry(cache_dir, ov.__version__, want, config)
        if entry is not None:
            config["CACHE_DIR"] = str(entry.dir)
        try:
            self.compiled = c.compile_model(model, DEVICE, config)
        except Exception as e:  # BLE001
            raise EngineError(f"OpenVINO {ov.__version__} could not compile {self.path.name} for the CPU: "
                              f"{first_line(e)}") from None
        if entry is not None:
            entry.seal()
        # Infer requests no thread is using: as many as OpenVINO finds optimal (1 with the latency hint,
        # whose one stream already uses every thread), made here: creating one while another runs can hang.
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))):
            self._idle.put(self.compiled.create_infer_request())
        self._out = self.compiled.output("prob_atypical")
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self.provider = f"OpenVINO {ov.__version__.split('-')[0]} {DEVICE} ({want}, {self.threads} threads)"

    def _cache_entry(self, cache_dir: Path | None, version: str, precision: str, config: dict) -> cache.CacheEntry | None:
        """The verified cache entry of this compiled model (None: no writable cache folder; it then
        compiles every time). ``cache_note`` says when a changed entry was discarded."""
        self.cache_dir = None
        self.cache_note = ""
        digest = self.meta.weights_digest or onnx_weights_digest(self.path)
        try:
            entry = cache.CacheEntry.open(Path(cache_dir) if cache_dir else default_cache_dir(), engine="openvino",
                                          weights=digest, version=version, precision=precision, device=DEVICE,
                                          config=sorted(config.items()))
        except OSError:
            return None  # a read-only home: run, just without the cache
        self.cache_dir, self.cache_note = entry.dir, entry.note
        return entry

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        x = self.check_batch(pixels)
        if len(x) == 0:
            return np.zeros((0,), np.float32)
        request = self._idle.get()  # an infer request runs one call at a time: callers take turns
        try:
            res = request.infer({0: x}, share_inputs=True, share_outputs=False)
            return np.asarray(res[self._out], dtype=np.float32).reshape(len(x))
        finally:
            self._idle.put(request)


def _precision_refusal(name: str, artefact: str, want: str) -> str:
    if want == "bf16" and artefact == "fp32":
        return (f"bf16 needs a CPU with bf16 instructions (AVX-512 BF16 or AMX); OpenVINO reports "
                f"{', '.join(sorted(cpu_capabilities())) or 'no capabilities'} for {cpu_name()}: "
                f"run {name} in fp32, or use the int8 artefact")
    if artefact == "int8":
        return (f"{name} is an int8 artefact: OpenVINO runs it as int8 (its quantised layers) only, not {want}; "
                "use the fp32 artefact for fp32 or bf16")
    return f"OpenVINO runs a {artefact} artefact at {', '.join(OvBackend().precisions(artefact))}, not {want}"


class OvBackend(Backend):
    name = "openvino"
    title = "OpenVINO"
    install = f"pip install '{DIST_NAME}[openvino]'"
    precisions_known = ("fp32", "bf16", "int8")
    options = ("threads", "cache_dir")
    nominal_rank = 50.0

    def unavailable(self) -> str | None:
        missing = missing_library("openvino", "OpenVINO", self.install)
        if missing is not None:
            return missing
        try:
            if DEVICE not in core().available_devices:
                return f"OpenVINO finds no CPU device here (devices: {', '.join(core().available_devices) or 'none'})"
        except Exception as e:  # BLE001
            return f"OpenVINO does not start here: {first_line(e)}"
        return None

    def version(self) -> str:
        return _ov().__version__.split("-")[0]

    def precisions(self, artefact_precision: str) -> tuple[str, ...]:
        if artefact_precision == "fp32":
            return ("fp32", "bf16") if "BF16" in cpu_capabilities() else ("fp32",)
        if artefact_precision == "int8":
            return ("int8",)
        return ()  # fp16 ONNX artefacts: not a CPU format

    def auto_rank(self, path: Path) -> tuple[float, str] | None:
        return self.nominal_rank, (f"OpenVINO {self.version()} is the fastest installed CPU engine (CPU: {cpu_int8_features()}; "
                      "README: Which engine on which box)")

    def load(self, path: Path, precision: str | None, opts: LoadOptions) -> Engine:
        if opts.provider not in ("auto", "cpu"):
            raise EngineError(f"--provider {opts.provider} is an ONNX Runtime execution provider; OpenVINO runs on the "
                              "CPU here (use --engine onnxruntime for CUDA/TensorRT providers)")
        return OpenVinoEngine(path, precision, opts.threads, cache_dir=opts.cache_dir)


BACKEND = OvBackend()


def clear_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete every compiled-model entry from the cache folder; returns how many."""
    return cache.clear(Path(cache_dir) if cache_dir else default_cache_dir())
