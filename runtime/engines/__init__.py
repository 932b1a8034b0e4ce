"""Inference engines as plug-ins, and the one door to them: :func:`load_engine`.

Each engine is one module here defining ``BACKEND`` (a :class:`~.base.Backend`); :data:`REGISTRY`
names them, one line each. Adding an engine is one new file plus one line below; ``ami-infer
--engine``, ``ami-bench parity`` and ``ami-bench latency`` enumerate this registry::

    eng = load_engine("edge-int8.onnx")              # engine="auto": the fastest one installed
    eng = load_engine("edge.onnx", engine="openvino", precision="bf16")
    eng = load_engine("edge.onnx", engine="onnxruntime", provider="cpu")
    probs = eng.predict(batch_uint8_nhwc)             # float32 [N], P(Atypical)
    print(eng.describe(), eng.choice)                 # what runs it, and why auto chose it

``engine="auto"`` ranks the installed engines that load the file (:meth:`Backend.auto_rank`):
a TensorRT plan runs on TensorRT; an ONNX file on ONNX Runtime's GPU providers when
onnxruntime-gpu finds them, else OpenVINO when it is installed, else ONNX Runtime on the CPU.
An engine that fails to load a good file on this machine makes auto fall back to the next one
(``eng.fallback`` says why); a bad file is refused by the first with :class:`ArtifactError`.
Naming an ONNX Runtime ``provider`` other than auto implies ``engine="onnxruntime"``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..artifact import ArtifactError
from ..models import resolve_model, shipped_model
from .base import PRECISIONS, Backend, Engine, EngineError, LoadOptions, normalize_precision

ASSETS = Path(__file__).parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "edge.onnx"
TRT_EP_MAX_BATCH = 256

# The registry: engine name -> module defining BACKEND. One line per engine.
REGISTRY = {
    "onnxruntime": "ami.runtime.engines.onnxruntime",
    "openvino": "ami.runtime.engines.openvino",
    "tensorrt": "ami.runtime.engines.tensorrt",
}
ENGINE_CHOICES = ("auto", *REGISTRY)

__all__ = ["ASSETS", "DEFAULT_MODEL", "ENGINE_CHOICES", "PRECISIONS", "REGISTRY", "ArtifactError", "Backend", "Engine",
           "EngineError", "LoadOptions", "backend", "backends", "candidates", "choose", "default_model_path",
           "engine_table", "load_engine", "resolve_model_path"]


def backend(name: str) -> Backend:
    """The plug-in registered as ``name`` (its module is imported on first use; the engine's own
    library only when it is asked to load or to say whether it is installed)."""
    if name not in REGISTRY:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    return importlib.import_module(REGISTRY[name]).BACKEND


def backends() -> list[Backend]:
    return [backend(n) for n in REGISTRY]


def _acceptors(path: Path) -> list[Backend]:
    found = [b for b in backends() if b.accepts(path)]
    # a file with an unknown suffix is read as ONNX (the ONNX engines then say whether it is one)
    return found or [b for b in backends() if ".onnx" in b.suffixes]


def candidates(path: str | os.PathLike) -> list[tuple[Backend, float, str]]:
    """Installed engines that load ``path``, best first for ``--engine auto``: (backend, score, reason)."""
    out = []
    for b in _acceptors(Path(path)):
        if b.unavailable() is not None:
            continue
        r = b.auto_rank(Path(path))
        if r is not None:
            out.append((b, float(r[0]), r[1]))
    out.sort(key=lambda t: -t[1])
    return out


def choose(path: str | os.PathLike) -> tuple[Backend, str]:
    """The engine ``--engine auto`` picks for ``path`` on this machine, and why (one sentence)."""
    ranked = candidates(path)
    if not ranked:
        acc = _acceptors(Path(path))
        why = "; ".join(f"{b.name}: {b.unavailable()}" for b in acc)
        raise EngineError(f"no installed engine can run {Path(path).name} ({why})")
    b, _, reason = ranked[0]
    others = [f"{o.title}" for o, _, _ in ranked[1:]]
    missing = [f"{o.title} ({o.install})" for o in _acceptors(Path(path))
               if o.unavailable() is not None and o.name != "tensorrt"]
    text = f"auto picked {b.title}: {reason}"
    if others:
        text += f"; also installed: {', '.join(others)} (force one with --engine NAME)"
    if missing and b.name == "onnxruntime":
        text += f"; not installed: {', '.join(missing)}"
    return b, text


def engine_table() -> list[dict]:
    """Every registered engine: name, title, installed?, why not, version, file types (for --help and reports)."""
    rows = []
    for b in backends():
        why = b.unavailable()
        rows.append({"name": b.name, "title": b.title, "installed": why is None, "reason": why or "",
                     "version": b.version() if why is None else "", "suffixes": list(b.suffixes)})
    return rows


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
    if not p.exists() and shipped_model(path) is not None:  # a shipped model by name: edge, edge-int8
        p = resolve_model(path)
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
                engine: str = "auto", precision: str | None = None, cache_dir: str | os.PathLike | None = None,
                max_batch: int = TRT_EP_MAX_BATCH, device_id: int = 0, spin: bool = False) -> Engine:
    """Load an ami artefact with one of the registered engines.

    ``path``: an ONNX file or a TensorRT plan (``.plan``/``.engine``/``.trt``); None = the model
    shipped in the package. ``engine``: auto (see the module docstring) | onnxruntime | openvino |
    tensorrt. ``precision``: None/auto = the artefact's own (fp32 or int8); bf16 = OpenVINO's bf16
    on a CPU that has it. ``provider``: ONNX Runtime's execution provider (auto | cpu | cuda |
    tensorrt; a value other than auto selects ONNX Runtime). ``threads``: CPU threads (0 = the
    engine's default). ``cache_dir``: where compiled models / TensorRT EP engines are cached
    (default under ``~/.cache/ami``). ``max_batch``: the largest batch of the TensorRT EP profile.
    """
    p = resolve_model_path(path)
    prec = normalize_precision(precision)
    opts = LoadOptions(threads=threads, provider=provider, cache_dir=Path(cache_dir) if cache_dir else None,
                       max_batch=max_batch, device_id=device_id, spin=spin)
    if engine == "auto" and provider != "auto" and not backend("tensorrt").accepts(p):
        engine = "onnxruntime"  # an explicit ONNX Runtime provider names the engine
    if engine != "auto":
        b = backend(engine)
        if not b.accepts(p) and (b.name == "tensorrt" or backend("tensorrt").accepts(p)):
            kind = "a TensorRT plan" if backend("tensorrt").accepts(p) else "not a TensorRT plan"
            raise EngineError(f"{p.name} is {kind}; {b.title} loads {', '.join(b.suffixes)} files "
                              + ("(a plan runs on TensorRT only)" if kind.startswith("a ") else ""))
        why = b.unavailable()
        if why is not None and b.name != "tensorrt":  # TensorRT says itself what is missing, after the side file
            raise EngineError(why)
        return b.load(p, prec, opts)

    ranked = candidates(p)
    if not ranked:  # nothing installed that takes this file: let the one that would say why
        acc = _acceptors(p)
        return acc[0].load(p, prec, opts)
    failures = []
    for i, (b, _, _) in enumerate(ranked):
        try:
            eng = b.load(p, prec, opts)
        except ArtifactError:
            raise  # a bad file is bad for every engine
        except EngineError as e:
            if i == len(ranked) - 1:
                raise EngineError("; ".join(failures + [str(e)])) from None
            failures.append(f"{b.title} could not run it ({e})")
            continue
        _, text = choose(p)
        if failures:
            eng.fallback = "; ".join(failures) + f"; running on {b.title}"
            text = f"auto picked {b.title}, the next installed engine: " + "; ".join(failures)
        eng.choice = text
        return eng
    raise EngineError("; ".join(failures))  # pragma: no cover - the loop returns or raises
