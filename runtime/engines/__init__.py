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
Naming a ``provider`` other than auto implies the engine that declares it (ONNX Runtime's).

Every backend declares what it is as data (name, title, file suffixes, providers, precisions,
options, install hint): the CLI's choices (:func:`engine_choices`, :func:`provider_choices`,
:func:`precision_choices`), auto-selection and its messages, and the rows parity and latency
tables run (:func:`engine_rows`) all come from the backends; no engine is named in this module.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from .. import gpu
from ..artifact import ArtifactError
from ..models import resolve_model, shipped_model
from .base import (
    PRECISIONS,
    TRT_EP_MAX_BATCH,
    Backend,
    Engine,
    EngineError,
    EngineFault,
    LoadOptions,
    Row,
    normalize_precision,
)

ASSETS = Path(__file__).parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "edge.onnx"

# The registry: engine name -> module defining BACKEND. One line per engine.
REGISTRY = {
    "onnxruntime": "ami.runtime.engines.onnxruntime",
    "openvino": "ami.runtime.engines.openvino",
    "tensorrt": "ami.runtime.engines.tensorrt",
}
ENGINE_CHOICES = ("auto", *REGISTRY)  # the registry as it ships; engine_choices() follows additions

__all__ = ["ASSETS", "DEFAULT_MODEL", "ENGINE_CHOICES", "PRECISIONS", "REGISTRY", "TRT_EP_MAX_BATCH", "ArtifactError",
           "Backend", "Engine", "EngineError", "EngineFault", "LoadOptions", "Row", "backend", "backends", "candidates",
           "choose", "default_model_path", "engine_choices", "engine_rows", "engine_table", "gpu_rows", "load_engine",
           "precision_choices", "provider_choices", "provider_owner", "resolve_model_path"]


def backend(name: str) -> Backend:
    """The plug-in registered as ``name`` (its module is imported on first use; the engine's own
    library only when it is asked to load or to say whether it is installed)."""
    if name not in REGISTRY:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(engine_choices())}")
    return importlib.import_module(REGISTRY[name]).BACKEND


def backends() -> list[Backend]:
    return [backend(n) for n in REGISTRY]


def engine_choices() -> tuple[str, ...]:
    """``--engine`` values: auto, then every registered engine."""
    return ("auto", *REGISTRY)


def provider_choices() -> tuple[str, ...]:
    """``--provider`` values: auto, then every provider a registered engine declares (in registry order)."""
    return ("auto", *dict.fromkeys(p for b in backends() for p in b.providers))


def precision_choices() -> tuple[str, ...]:
    """``--precision`` values: auto (the artefact's own), then every precision some engine runs at."""
    known = {q for b in backends() for q in b.precisions_known}
    return ("auto", *(q for q in PRECISIONS if q in known))


def provider_owner(provider: str, path: str | os.PathLike) -> Backend | None:
    """The engine that loads ``path`` and declares ``provider`` (naming one selects it); None for auto
    or when no engine that loads the file declares it."""
    if provider == "auto":
        return None
    return next((b for b in _acceptors(Path(path)) if provider in b.providers), None)


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


def gpu_note(path: str | os.PathLike, picked: Backend) -> str:
    """'' unless ``picked`` runs ``path`` on the CPU of a machine with an NVIDIA GPU while an engine
    that loads the file could run it on that GPU: then which GPU, and what to install (once per
    load: :func:`choose` says it)."""
    acc = _acceptors(Path(path))
    if picked.uses_gpu() or any(b.uses_gpu() for b in acc if b.unavailable() is None):
        return ""
    capable = [b for b in acc if b.gpu_install(None)]
    if not capable:
        return ""
    found = gpu.nvidia_gpu()
    if found is None:
        return ""
    return gpu.no_gpu_engine_note(found, [b.gpu_install(found["cuda_major"]) for b in capable])


def choose(path: str | os.PathLike) -> tuple[Backend, str]:
    """The engine ``--engine auto`` picks for ``path`` on this machine, and why (one sentence)."""
    ranked = candidates(path)
    acc = _acceptors(Path(path))
    if not ranked:
        why = "; ".join(f"{b.name}: {b.unavailable()}" for b in acc)
        raise EngineError(f"no installed engine can run {Path(path).name} ({why})")
    b, score, reason = ranked[0]
    others = [f"{o.title}" for o, _, _ in ranked[1:]]
    # engines that load the file and would beat the pick where installed
    missing = [f"{o.title} ({o.install})" for o in acc if o.unavailable() is not None and o.nominal_rank > score]
    text = f"auto picked {b.title}: {reason}"
    if others:
        text += f"; also installed: {', '.join(others)} (force one with --engine NAME)"
    if missing:
        text += f"; not installed: {', '.join(missing)}"
    note = gpu_note(path, b)
    return b, text + (f"; {note}" if note else "")


def engine_table() -> list[dict]:
    """Every registered engine: name, title, installed?, why not, version, file types, providers,
    precisions and options (for --help and reports)."""
    rows = []
    for b in backends():
        why = b.unavailable()
        rows.append({"name": b.name, "title": b.title, "installed": why is None, "reason": why or "",
                     "version": b.version() if why is None else "", "suffixes": list(b.suffixes),
                     "providers": list(b.providers), "precisions": list(b.precisions_known),
                     "options": list(b.options), "install": b.install})
    return rows


def engine_rows(eng: Engine, *, provider: str = "auto", precisions: list[str] | None = None,
                gpu_providers: bool = False) -> tuple[list[Row], list[str]]:
    """The variants of a loaded engine's artefact that parity and latency tables run on its engine
    here (:meth:`Backend.rows`), kept to ``precisions`` when given; and notes on the precisions
    asked for that this engine does not offer for the file. Load each with
    ``load_engine(eng.path, **row.load_kwargs())`` (or reuse ``eng`` where ``row.matches(eng)``)."""
    b = backend(eng.engine)
    offered = b.rows(eng.meta.precision, provider, gpu_providers=gpu_providers)
    wanted = [str(q).lower() for q in precisions] if precisions else None
    rows = [r for r in offered if wanted is None or r.precision in wanted]
    have = {r.precision for r in offered}
    notes = [f"{eng.path.name} / {b.title}: {q} not available here (it runs this {eng.meta.precision} file at "
             f"{', '.join(sorted(have, key=_precision_order)) or 'no precision'})" for q in (wanted or []) if q not in have]
    return rows, notes


def _precision_order(q: str) -> int:
    return PRECISIONS.index(q) if q in PRECISIONS else len(PRECISIONS)


def gpu_rows(eng: Engine) -> list[Row]:
    """The variants of ``eng``'s artefact that run on an NVIDIA GPU here through its engine and
    that ``eng`` itself is not (latency times them beside the CPU rows): e.g. ONNX Runtime's CUDA
    provider where onnxruntime-gpu has it."""
    rows, _ = engine_rows(eng, provider="cpu", gpu_providers=True)
    return [r for r in rows if r.device == "cuda" and not r.matches(eng)]


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
    shipped in the package. ``engine``: auto (see the module docstring) or one of
    :func:`engine_choices`. ``precision``: None/auto = the artefact's own (fp32 or int8); bf16 =
    OpenVINO's bf16 on a CPU that has it (:func:`precision_choices`). ``provider``: an execution
    provider (:func:`provider_choices`; a value other than auto selects the engine that declares
    it). ``threads``: CPU threads (0 = the engine's default). ``cache_dir``: where compiled models
    / TensorRT EP engines are cached (default under ``~/.cache/ami``; each entry is verified at
    load). ``max_batch``: the largest batch of the TensorRT EP profile.
    """
    p = resolve_model_path(path)
    prec = normalize_precision(precision)
    if provider not in provider_choices():
        raise EngineError(f"unknown provider {provider!r}; choose one of {', '.join(provider_choices())}")
    opts = LoadOptions(threads=threads, provider=provider, cache_dir=Path(cache_dir) if cache_dir else None,
                       max_batch=max_batch, device_id=device_id, spin=spin)
    owner = provider_owner(provider, p)
    if engine == "auto" and owner is not None:
        engine = owner.name  # an explicit provider names its engine
    if engine != "auto":
        return _load_named(backend(engine), p, prec, opts)

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
            note = gpu_note(p, b)
            text = f"auto picked {b.title}, the next installed engine: " + "; ".join(failures) + (f"; {note}" if note else "")
        eng.choice = text
        return eng
    raise EngineError("; ".join(failures))  # pragma: no cover - the loop returns or raises


def _load_named(b: Backend, p: Path, prec: str | None, opts: LoadOptions) -> Engine:
    """``--engine NAME``: refuse a file of another engine's kind, or an engine not installed, saying why."""
    acc = _acceptors(p)
    if b not in acc:
        kind = acc[0].artefact
        runs_on = ", ".join(o.title for o in acc)
        raise EngineError(f"{p.name} is {kind}; {b.title} loads {', '.join(b.suffixes)} files "
                          f"({kind} runs on {runs_on} only)")
    why = b.unavailable()
    if why is not None and not b.late_check:  # a late-checking engine says itself what is missing, after the file
        raise EngineError(why)
    return b.load(p, prec, opts)
