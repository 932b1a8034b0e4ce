"""What the bench's commands share: the shipped model's files, the machine description, progress,
crop decoding, the PyTorch models an engine is compared with, every engine variant of a file, and
the one place generic bench code names an engine (:data:`BASE_ENGINE`, :func:`takes_provider`,
:func:`quiet_when_missing`).

``ami-bench parity`` and ``ami-bench latency`` (and ``gpu-check``) import these; none of them
imports another command's module. Errors a user should read are raised as the ``error`` class
the caller passes (``ParityError``, ``LatencyError``), :class:`BenchError` by default.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ami.runtime import __version__
from ami.runtime.artifact import ArtifactError
from ami.runtime.engines import ASSETS, REGISTRY, EngineError, backend, load_engine
from ami.runtime.errors import BadInput
from ami.runtime.imageio import ImageError
from ami.runtime.pixels import decode_pixels
from ami.runtime.preprocess import Preprocess

SHIPPED_WEIGHTS = ASSETS / "edge.safetensors"
SHIPPED_ENGINES = (ASSETS / "edge.onnx", ASSETS / "edge-int8.onnx")


class BenchError(BadInput, RuntimeError):
    """A benchmark cannot be set up (no model, weights that do not fit, unreadable crops); the message says why."""


# -- engine names: the only place generic bench code names a backend -------------------------------
# (when ami.runtime.engines lists these properties itself, these three read them from there)

BASE_ENGINE = "onnxruntime"  # the base install's engine: the one that takes an ONNX Runtime execution provider
_QUIET_WHEN_MISSING = ("tensorrt",)  # engines whose absence is the normal case: no note in the reports


def takes_provider(engine_name: str) -> bool:
    """Whether ``engine_name`` is run with an ONNX Runtime execution provider (others get ``auto``)."""
    return engine_name == BASE_ENGINE


def quiet_when_missing(engine_name: str) -> bool:
    """Whether a report leaves out the note that ``engine_name`` is not installed (TensorRT on a CPU box)."""
    return engine_name in _QUIET_WHEN_MISSING


def engine_choices() -> str:
    """The registry's engine names as a command's help lists them: ``onnxruntime | openvino | tensorrt``."""
    return " | ".join(REGISTRY)


def is_base_engine(eng) -> bool:
    """Whether a loaded engine runs on the base install's engine (ONNX Runtime)."""
    return eng.engine == BASE_ENGINE


# -- the machine, progress and crops ---------------------------------------------------------------

def log_to_stderr(text: str) -> None:
    """The default progress log of the benchmarks: one line on standard error."""
    print(text, file=sys.stderr)


def machine_info() -> dict:
    """CPU model, core count and library versions (no torch import here)."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(),
           "ami": __version__, "numpy": np.__version__}
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
        out["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:  # pragma: no cover - a base dependency
        pass
    if "torch" in sys.modules:
        import torch

        out["torch"] = torch.__version__
        try:
            out["torch_threads"] = torch.get_num_threads()
        except Exception:  # BLE001
            pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        out["tensorrt"] = version("tensorrt")
    except (ImportError, PackageNotFoundError):
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        out["openvino"] = version("openvino")
    except (ImportError, PackageNotFoundError):
        pass
    try:
        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return out


def progress(iterable, total: int | None = None, desc: str = "", enabled: bool = True):
    """tqdm on stderr when it is installed and enabled (it hides itself when stderr is not a terminal)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the training extras
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None, mininterval=0.5)


def decode_crops(paths: Sequence[str | Path], pre: Preprocess, desc: str = "decoding", show: bool = True,
                 error: type[Exception] = BenchError) -> np.ndarray:
    """uint8 NHWC at the model's input size, decoded exactly as ``ami-infer`` does it
    (:func:`ami.runtime.pixels.decode_pixels`), with a progress bar; ``error`` for a bad crop."""
    try:
        return decode_pixels(paths, pre, progress=lambda it: progress(it, len(it), desc, show))
    except ImageError as e:
        raise error(str(e)) from None


# -- the PyTorch side ----------------------------------------------------------------------------

# -- the PyTorch side: the models an engine is compared with ---------------------------------------

def build_single_model(weights: Path, model_name: str, method: str = "full", error: type[Exception] = BenchError):
    """(network, registry entry) of a bare checkpoint of registry entry ``model_name`` (e.g. the shipped
    edge.safetensors, every tensor), rebuilt by :func:`ami.train.foldmodel.load_model` as the exporter does."""
    from ami.train.foldmodel import FoldModelError, load_model
    from ami.train.registry import get

    try:
        cfg = get(model_name)
    except KeyError as e:
        raise error(f"{weights}: {e.args[0]}") from None
    try:
        return load_model(cfg, method, Path(weights)), cfg
    except FoldModelError as e:
        raise error(str(e)) from None


def build_run_models(run: Path, folds: list, error: type[Exception] = BenchError) -> tuple[list, object, object]:
    """(fold networks, registry entry, RunSource) of ``folds`` of a run, built as the exporter builds them
    (:func:`ami.train.foldmodel.load_fold_model`)."""
    from ami.train.foldmodel import FoldModelError, load_fold_model

    try:
        from ami.export import ExportError
        from ami.export.source import resolve_source
    except ImportError as e:  # pragma: no cover - the export layer ships with this package
        raise error(f"--run needs ami.export ({e})") from None
    try:
        src = resolve_source(Path(run), list(folds))
        return [load_fold_model(src.run, f) for f in src.folds], src.cfg, src
    except (ExportError, FoldModelError) as e:
        raise error(str(e)) from None


# -- engines: every file on every installed engine, at every precision -----------------------------

def engine_label(eng) -> str:
    """How reports name one (artefact, engine) pair: ``edge.onnx / OpenVINO``."""
    return f"{eng.path.name} / {eng.title or eng.engine}"


def load_variants(paths: Sequence[Path], *, runtimes: Sequence[str] | None = None,
                  precisions: Sequence[str] | None = None, provider: str = "cpu", threads: int = 0,
                  error: type[Exception] = BenchError) -> tuple[list, list[str]]:
    """Load each artefact with every engine of the registry that takes it and is installed here (or
    the named ``runtimes``), at every precision that engine runs it at on this machine (or those
    of ``precisions`` it can). ``provider``: ONNX Runtime's execution provider. Returns (engines,
    notes on engines not installed / precisions not available). A bad file or a named engine that
    cannot run raises ``error`` with the reason."""
    names = list(runtimes) if runtimes else list(REGISTRY)
    for n in names:
        if n not in REGISTRY:
            raise error(f"unknown engine {n!r}; registered engines: {', '.join(REGISTRY)}")
    wanted = [str(p).lower() for p in precisions] if precisions else None
    engines, notes = [], []
    for path in paths:
        took = False
        for n in names:
            if backend(n).accepts(path):
                found = _engine_variants(path, n, wanted, named=bool(runtimes), provider=provider, threads=threads,
                                         notes=notes, error=error)
                took = took or found is not None
                engines += found or []
        if not took and not any(backend(n).accepts(path) for n in names):
            raise error(f"none of the engines {', '.join(names)} loads {Path(path).name}")
        if not took:
            # nothing installed takes it: let the default door say why (e.g. TensorRT missing, no side file)
            try:
                engines.append(load_engine(path, provider=provider if Path(path).suffix.lower() == ".onnx" else "auto",
                                           threads=threads))
            except (ArtifactError, EngineError) as e:
                raise error(str(e)) from None
    if not engines:
        raise error("no engine could be loaded: " + "; ".join(notes))
    return engines, notes


def _engine_variants(path: Path, name: str, wanted: list[str] | None, *, named: bool, provider: str, threads: int,
                     notes: list[str], error: type[Exception]) -> list | None:
    """The engines of one artefact on engine ``name`` at each precision wanted and offered here;
    None when that engine is not installed or cannot load the file (a note says why, or, for an
    engine the user ``named``, ``error`` is raised)."""
    b = backend(name)
    why = b.unavailable()
    if why is not None:
        if named:
            raise error(f"{b.title} cannot run {Path(path).name} here: {why}")
        if not quiet_when_missing(name):
            notes.append(f"{b.title} is not installed here ({why}): {Path(path).name} not checked on it")
        return None
    prov = provider if takes_provider(name) else "auto"
    try:
        first = load_engine(path, engine=name, provider=prov, threads=threads)
    except (ArtifactError, EngineError) as e:
        if isinstance(e, ArtifactError) or named:
            raise error(str(e)) from None
        notes.append(f"{b.title} could not load {Path(path).name}: {e}")
        return None
    offered = b.precisions(first.meta.precision)
    for q in (wanted or []):
        if q not in offered:
            notes.append(f"{Path(path).name} / {b.title}: {q} not available here "
                         f"(it runs this {first.meta.precision} file at {', '.join(offered) or 'no precision'})")
    return [first if q == first.precision else load_engine(path, engine=name, provider=prov, threads=threads, precision=q)
            for q in offered if wanted is None or q in wanted]
