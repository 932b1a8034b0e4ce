"""ami-bench parity: does an exported engine keep the quality of the PyTorch model it came from?

For every evaluation set on disk (AMi-Br test split, AtNorM-Br, AtNorM-MD; absent ones are
reported as absent, never faked) and every engine - each artefact file run by every installed
engine of the plug-in registry (:mod:`ami.runtime.engines`: ONNX Runtime, OpenVINO, TensorRT)
that loads it, at every precision that engine runs it at here (OpenVINO: fp32 and, on a CPU with
bf16, bf16 for an fp32 file) - the PyTorch model and the engine classify the *same pixels*: each crop is decoded once with the runtime's own decoder and geometry
(:func:`~ami.runtime.imageio.decode_rgb` + :meth:`Preprocess.to_uint8`, exactly what ``ami-infer``
does); the engine gets those uint8 pixels, PyTorch gets them through the training evaluation path
(:func:`ami.train.data.eval_batch`). Per (dataset, engine) the suite reports balanced accuracy and
AUROC of both sides, their differences (engine - PyTorch), max and mean |delta probability| and
the label agreement rate, and checks them against :data:`TOLERANCES`:

* fp32 engines: labels identical, |delta AUROC| <= 1e-4, max |delta p| <= 1e-4;
* int8, fp16 and bf16 engines: |delta balanced accuracy| <= 0.01, |delta AUROC| <= 0.005.

The precision checked is the one the engine computes in (an fp32 file on OpenVINO bf16 is held to
the bf16 limits).

Balanced accuracy uses the engine's own threshold (from its metadata) on both sides.

The PyTorch side:

* no model named: the shipped edge model, ``runtime/assets/edge.safetensors``, against
  ``edge.onnx`` (fp32) and ``edge-int8.onnx`` (those present);
* ``run=RUN`` + ``engines=[...]``: each engine's folds (from its metadata) rebuilt from
  ``RUN/fold{k}/best.safetensors`` (or ``RUN/all``) exactly as the exporter builds them; a fold
  ensemble is the mean of the fold probabilities;
* ``weights=FILE`` + ``engines=[...]``: one network (registry entry and method from the engine's
  metadata) with a full state dict.

:func:`parity` returns a :class:`Report` (Markdown / CSV / JSON); the command exits 1 when any
check fails and names the engine, dataset and metric.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import typer

from ami.runtime import __version__
from ami.runtime.artifact import ArtifactError, ArtifactMeta
from ami.runtime.datasets import TEST_SETS, available_eval_sets, resolve_data_root
from ami.runtime.engines import ASSETS, REGISTRY, EngineError, backend, load_engine
from ami.runtime.hashing import file_sha256
from ami.runtime.imageio import ImageError
from ami.runtime.metrics import MetricError, auroc, balanced_accuracy
from ami.runtime.pixels import decode_pixels
from ami.runtime.preprocess import Preprocess
from ami.runtime.sampling import stratified_subset
from ami.runtime.tolerances import FP32_PROB_TOL, REDUCED_AUROC_TOL, REDUCED_BA_TOL

SHIPPED_WEIGHTS = ASSETS / "edge.safetensors"
SHIPPED_ENGINES = (ASSETS / "edge.onnx", ASSETS / "edge-int8.onnx")
FORMATS = ("md", "csv", "json")
SCHEMA = "ami-bench-parity/1"

RUNTIME_HELP = ("Inference engine(s) from the registry (" + " | ".join(REGISTRY)
                + "); repeat for several. Default: every installed engine that loads the file.")


class ParityError(RuntimeError):
    """The comparison cannot be set up (no model, weights that do not fit, no data); not a failed check."""


# -- tolerances ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    """Limits one engine must meet on every dataset. ``None`` = not checked."""

    labels_identical: bool = False
    max_abs_dp: float | None = None
    d_auroc: float | None = None
    d_ba: float | None = None

    def describe(self) -> str:
        parts = []
        if self.labels_identical:
            parts.append("labels identical")
        if self.d_ba is not None:
            parts.append(f"|ΔBA| <= {self.d_ba:g}")
        if self.d_auroc is not None:
            parts.append(f"|ΔAUROC| <= {self.d_auroc:g}")
        if self.max_abs_dp is not None:
            parts.append(f"max |Δp| <= {self.max_abs_dp:g}")
        return ", ".join(parts)


FP32_TOLERANCE = Tolerance(labels_identical=True, max_abs_dp=FP32_PROB_TOL, d_auroc=1e-4)
REDUCED_TOLERANCE = Tolerance(d_ba=REDUCED_BA_TOL, d_auroc=REDUCED_AUROC_TOL)
TOLERANCES = {"fp32": FP32_TOLERANCE, "int8": REDUCED_TOLERANCE, "fp16": REDUCED_TOLERANCE, "bf16": REDUCED_TOLERANCE}


def tolerance_for(precision: str) -> Tolerance:
    """fp32 -> the strict limits; int8 / fp16 / bf16 (and any other reduced precision) -> the task-metric limits."""
    return TOLERANCES.get(precision, REDUCED_TOLERANCE)


@dataclass
class Check:
    metric: str  # "labels" | "BA" | "AUROC" | "max |Δp|" | "preprocess"
    value: float | None
    limit: float | None
    ok: bool | None  # None: could not be evaluated (e.g. AUROC with one class in the sample)
    text: str


def evaluate_checks(tol: Tolerance, *, d_ba: float | None, d_auroc: float | None, max_dp: float,
                    flips: int, n: int) -> list[Check]:
    """The checks of ``tol`` on one (dataset, engine) comparison."""
    out: list[Check] = []
    if tol.labels_identical:
        ok = flips == 0
        out.append(Check("labels", float(flips), 0.0, ok,
                         f"labels: {flips} of {n} differ" + ("" if ok else " (must be identical)")))

    def bound(metric: str, value: float | None, limit: float | None, fmt: str):
        if limit is None:
            return
        if value is None or not math.isfinite(value):
            out.append(Check(metric, None, limit, None, f"{metric}: n/a (undefined on this sample), limit {limit:g}"))
            return
        ok = abs(value) <= limit
        shown = f"|Δ{metric}| = {abs(value):{fmt}}" if metric in ("BA", "AUROC") else f"{metric} = {abs(value):{fmt}}"
        out.append(Check(metric, float(value), float(limit), ok, f"{shown} {'<=' if ok else '>'} {limit:g}"))

    bound("BA", d_ba, tol.d_ba, ".4f")
    bound("AUROC", d_auroc, tol.d_auroc, ".2e")
    bound("max |Δp|", max_dp, tol.max_abs_dp, ".2e")
    return out


# -- report --------------------------------------------------------------------------------------

@dataclass
class SetResult:
    dataset: str
    engine: str  # file name of the engine
    precision: str
    n: int
    n_atypical: int
    threshold: float
    torch_ba: float | None
    engine_ba: float | None
    torch_auroc: float | None
    engine_auroc: float | None
    max_abs_dp: float
    mean_abs_dp: float
    agreement: float  # fraction of crops with the same label at the threshold
    n_flips: int
    checks: list[Check] = field(default_factory=list)
    note: str = ""
    predictions: dict | None = None  # with keep_predictions: names, labels, torch, engine (per crop)

    @property
    def d_ba(self) -> float | None:
        return None if self.torch_ba is None or self.engine_ba is None else self.engine_ba - self.torch_ba

    @property
    def d_auroc(self) -> float | None:
        return None if self.torch_auroc is None or self.engine_auroc is None else self.engine_auroc - self.torch_auroc

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["predictions"] is None:
            del d["predictions"]
        d.update(d_ba=self.d_ba, d_auroc=self.d_auroc, status="pass" if self.ok else "fail")
        return d


@dataclass
class EngineInfo:
    name: str  # "<file> / <engine title>", e.g. "edge.onnx / OpenVINO"
    path: str
    precision: str  # the precision the engine computes in
    provider: str
    model: str
    method: str
    folds: list
    threshold: float
    tolerance: str
    reference: str  # what the PyTorch side is for this engine
    provenance: str  # do the PyTorch weights match the ones the engine records?
    runtime: str = ""  # registry name of the engine: onnxruntime | openvino | tensorrt
    artefact_precision: str = ""  # the file's own precision (metadata)


@dataclass
class Report:
    data_root: str
    engines: list[EngineInfo] = field(default_factory=list)
    results: list[SetResult] = field(default_factory=list)
    absent: dict = field(default_factory=dict)  # dataset -> why
    max_crops: int = 0
    notes: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every check of every present dataset passed, and at least one dataset was checked."""
        return bool(self.results) and all(r.ok for r in self.results)

    def failures(self) -> list[str]:
        """One line per failed check: '<engine> on <dataset>: <metric> ...'."""
        out = []
        for r in self.results:
            for c in r.failed:
                out.append(f"{r.engine} ({r.precision}) on {r.dataset}: {c.text}")
        return out

    def verdict_lines(self) -> list[str]:
        lines = []
        for e in self.engines:
            rs = [r for r in self.results if r.engine == e.name and r.precision == e.precision]
            if not rs:
                lines.append(f"{e.name} ({e.precision}): NOT CHECKED (no evaluation set present)")
                continue
            bad = [r for r in rs if not r.ok]
            sets = ", ".join(r.dataset for r in rs)
            if bad:
                lines.append(f"{e.name} ({e.precision}): FAIL on {', '.join(r.dataset for r in bad)} "
                             f"[tolerance: {e.tolerance}]")
                for r in bad:
                    for c in r.failed:
                        lines.append(f"  - {r.dataset}: {c.text}")
            else:
                undefined = [f"{r.dataset} {c.metric}" for r in rs for c in r.checks if c.ok is None]
                lines.append(f"{e.name} ({e.precision}): PASS on {sets} [tolerance: {e.tolerance}]"
                             + (f" (not evaluable: {', '.join(undefined)})" if undefined else ""))
        for ds, why in self.absent.items():
            lines.append(f"{ds}: absent - {why}")
        if not self.results:
            lines.append(f"NOTHING CHECKED: no evaluation set is present under {self.data_root}")
        return lines

    # -- renderings --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "verdict": "pass" if self.ok else "fail", "data_root": self.data_root,
            "max_crops_per_set": self.max_crops or None,
            "tolerances": {k: asdict(v) for k, v in TOLERANCES.items()},
            "engines": [asdict(e) for e in self.engines],
            "results": [r.to_dict() for r in self.results],
            "absent": self.absent, "failures": self.failures(), "notes": self.notes,
            "machine": self.machine, "seconds": round(self.seconds, 1),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        lines = ["# Engine parity: PyTorch vs exported engines", ""]
        sample = (f"a class-stratified sample of at most {self.max_crops} crops per set (seed 0)"
                  if self.max_crops else "every crop of each set")
        lines.append(f"Data: {sample}; each crop decoded once, the same uint8 pixels fed to both sides. "
                     "Δ = engine - PyTorch; BA at the engine's threshold.")
        lines.append("")
        for e in self.engines:
            lines.append(f"- **{e.name}**: {e.model}/{e.method}, {e.precision}, folds {_folds(e.folds)}, threshold "
                         f"{e.threshold:g}, provider {e.provider}; PyTorch side: {e.reference}; {e.provenance}")
        lines.append("")
        head = ["dataset", "engine", "prec.", "n (atyp.)", "BA torch", "BA engine", "ΔBA", "AUROC torch",
                "AUROC engine", "ΔAUROC", "max \\|Δp\\|", "mean \\|Δp\\|", "label agreement", "verdict"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for ds in TEST_SETS:
            rs = [r for r in self.results if r.dataset == ds]
            if ds in self.absent:
                lines.append("| " + " | ".join([ds, "-", "-", "absent"] + ["-"] * (len(head) - 4)) + " |")
            for r in rs:
                verdict = "pass" if r.ok else "**FAIL** (" + ", ".join(c.metric for c in r.failed) + ")"
                lines.append("| " + " | ".join([
                    r.dataset, r.engine, r.precision, f"{r.n} ({r.n_atypical})", _f(r.torch_ba, ".4f"),
                    _f(r.engine_ba, ".4f"), _f(r.d_ba, "+.4f"), _f(r.torch_auroc, ".4f"), _f(r.engine_auroc, ".4f"),
                    _f(r.d_auroc, "+.2e"), f"{r.max_abs_dp:.2e}", f"{r.mean_abs_dp:.2e}",
                    f"{100 * r.agreement:.2f}% ({r.n_flips} differ)", verdict]) + " |")
        lines += ["", "Tolerances: " + "; ".join(f"{k}: {v.describe()}" for k, v in TOLERANCES.items()) + ".", ""]
        lines += ["Verdict:", ""] + [f"    {v}" for v in self.verdict_lines()]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        m = self.machine
        if m:
            lines += ["", f"Run on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), onnxruntime "
                          f"{m.get('onnxruntime', '?')}" + (f", openvino {m['openvino']}" if m.get("openvino") else "")
                          + f", torch {m.get('torch', '?')}, in {self.seconds:.0f} s."]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = ["dataset", "engine", "precision", "status", "n", "n_atypical", "threshold", "torch_ba", "engine_ba",
                "d_ba", "torch_auroc", "engine_auroc", "d_auroc", "max_abs_dp", "mean_abs_dp", "agreement", "n_flips",
                "failed_metrics", "tolerance"]
        w.writerow(cols)
        tol = {(e.name, e.precision): e.tolerance for e in self.engines}
        for ds in TEST_SETS:
            if ds in self.absent:
                w.writerow([ds, "", "", "absent"] + [""] * (len(cols) - 4))
            for r in (r for r in self.results if r.dataset == ds):
                d = r.to_dict()
                w.writerow([r.dataset, r.engine, r.precision, d["status"], r.n, r.n_atypical, r.threshold]
                           + [_raw(d[k]) for k in ("torch_ba", "engine_ba", "d_ba", "torch_auroc", "engine_auroc",
                                                   "d_auroc", "max_abs_dp", "mean_abs_dp", "agreement")]
                           + [r.n_flips, ";".join(c.metric for c in r.failed), tol.get((r.engine, r.precision), "")])
        return buf.getvalue()

    def render(self, fmt: str) -> str:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return {"md": self.to_markdown, "csv": self.to_csv, "json": self.to_json}[fmt]()


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _raw(v) -> str:
    return "" if v is None else repr(float(v))


def _folds(folds) -> str:
    return ",".join(str(f) for f in folds) if folds else "?"


# -- helpers shared with the latency benchmark -----------------------------------------------------

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


def decode_crops(paths: Sequence[str | Path], pre: Preprocess, desc: str = "decoding", show: bool = True) -> np.ndarray:
    """uint8 NHWC at the model's input size, decoded exactly as ``ami-infer`` does it
    (:func:`ami.runtime.pixels.decode_pixels`), with a progress bar; ParityError for a bad crop."""
    try:
        return decode_pixels(paths, pre, progress=lambda it: progress(it, len(it), desc, show))
    except ImageError as e:
        raise ParityError(str(e)) from None


# -- the PyTorch side ----------------------------------------------------------------------------

class TorchReference:
    """One PyTorch model (a fold ensemble = mean of fold probabilities) on the training eval path."""

    def __init__(self, models: list, pre: Preprocess, description: str, device: str = "cpu"):
        import torch

        self.device = torch.device(device)
        if self.device.type == "cuda":  # a float32 reference, not TF32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.models = [m.float().eval().to(self.device) for m in models]
        self.pre = pre
        self.description = description
        self.src = None  # the RunSource, when built from a run

    def predict(self, pixels: np.ndarray, batch: int = 64, desc: str = "", show: bool = True) -> np.ndarray:
        from ami.export.ensemble import reference_probs

        return reference_probs(self.models, self.pre, pixels, batch, device=self.device,
                               progress=lambda steps: progress(steps, len(steps), desc, show))


def build_single_model(weights: Path, model_name: str, method: str = "full"):
    """(network, registry entry) of a bare checkpoint of registry entry ``model_name`` (e.g. the shipped
    edge.safetensors, every tensor), rebuilt by :func:`ami.train.foldmodel.load_model` as the exporter does."""
    from ami.train.foldmodel import FoldModelError, load_model
    from ami.train.registry import get

    try:
        cfg = get(model_name)
    except KeyError as e:
        raise ParityError(f"{weights}: {e.args[0]}") from None
    try:
        return load_model(cfg, method, Path(weights)), cfg
    except FoldModelError as e:
        raise ParityError(str(e)) from None


def build_run_models(run: Path, folds: list) -> tuple[list, object, object]:
    """(fold networks, registry entry, RunSource) of ``folds`` of a run, built as the exporter builds them
    (:func:`ami.train.foldmodel.load_fold_model`)."""
    from ami.train.foldmodel import FoldModelError, load_fold_model

    try:
        from ami.export import ExportError
        from ami.export.source import resolve_source
    except ImportError as e:  # pragma: no cover - the export layer ships with this package
        raise ParityError(f"--run needs ami.export ({e})") from None
    try:
        src = resolve_source(Path(run), list(folds))
        return [load_fold_model(src.run, f) for f in src.folds], src.cfg, src
    except (ExportError, FoldModelError) as e:
        raise ParityError(str(e)) from None


def _provenance_run(src, meta: ArtifactMeta) -> str:
    recorded = (meta.source or {}).get("weights_sha256") or {}
    if not recorded:
        return "the engine records no weights digest (provenance not checked)"
    bad = []
    for f in src.folds:
        want = recorded.get(str(f))
        if want and want != file_sha256(src.weights(f)):
            bad.append(str(f))
    if bad:
        return (f"WARNING: the run's weights of fold(s) {','.join(bad)} differ from those the engine was exported from "
                "(sha256 in its metadata)")
    return "weights sha256 match the engine's metadata"


def _provenance_file(weights: Path, meta: ArtifactMeta) -> str:
    recorded = (meta.source or {}).get("weights_sha256") or {}
    if not recorded:
        return "the engine records no weights digest (provenance not checked)"
    if file_sha256(Path(weights)) in set(recorded.values()):
        return "weights sha256 match the engine's metadata"
    return "note: these weights' sha256 is not among those the engine records (re-saved or different weights)"


# -- engines: every file on every installed engine, at every precision -----------------------------

def engine_label(eng) -> str:
    """How reports name one (artefact, engine) pair: ``edge.onnx / OpenVINO``."""
    return f"{eng.path.name} / {eng.title or eng.engine}"


def load_variants(paths: Sequence[Path], *, runtimes: Sequence[str] | None = None,
                  precisions: Sequence[str] | None = None, provider: str = "cpu", threads: int = 0,
                  error: type[Exception] = RuntimeError) -> tuple[list, list[str]]:
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
            b = backend(n)
            if not b.accepts(path):
                continue
            why = b.unavailable()
            if why is not None:
                if runtimes:
                    raise error(f"{b.title} cannot run {Path(path).name} here: {why}")
                if n != "tensorrt":
                    notes.append(f"{b.title} is not installed here ({why}): {Path(path).name} not checked on it")
                continue
            prov = provider if n == "onnxruntime" else "auto"
            try:
                first = load_engine(path, engine=n, provider=prov, threads=threads)
            except (ArtifactError, EngineError) as e:
                if isinstance(e, ArtifactError) or runtimes:
                    raise error(str(e)) from None
                notes.append(f"{b.title} could not load {Path(path).name}: {e}")
                continue
            took = True
            offered = b.precisions(first.meta.precision)
            chosen = [q for q in offered if wanted is None or q in wanted]
            for q in (wanted or []):
                if q not in offered:
                    notes.append(f"{Path(path).name} / {b.title}: {q} not available here "
                                 f"(it runs this {first.meta.precision} file at {', '.join(offered) or 'no precision'})")
            for q in chosen:
                engines.append(first if q == first.precision else
                               load_engine(path, engine=n, provider=prov, threads=threads, precision=q))
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


# -- the suite -----------------------------------------------------------------------------------

def resolve_engines(engines: Sequence[str | Path] | None) -> tuple[list[Path], list[str]]:
    """The engine files to check and notes on shipped ones that are missing."""
    notes = []
    if engines:
        return [Path(e) for e in engines], notes
    present = [p for p in SHIPPED_ENGINES if p.is_file()]
    for p in SHIPPED_ENGINES:
        if not p.is_file():
            notes.append(f"shipped engine {p.name} is not in {ASSETS}: not checked")
    if not present:
        raise ParityError(f"no shipped engine found: {', '.join(p.name for p in SHIPPED_ENGINES)} are missing from "
                          f"{ASSETS} (the shipped edge model is not built yet?); check any artefact with "
                          "--run DIR --engine FILE")
    return present, notes


def _compare(ds: str, engine_name: str, meta: ArtifactMeta, y: np.ndarray, p_torch: np.ndarray,
             p_engine: np.ndarray, extra: list[Check], precision: str | None = None) -> SetResult:
    thr = float(meta.threshold)
    precision = precision or meta.precision

    def metric(fn, *a):
        try:
            return float(fn(y, *a))
        except MetricError:
            return None

    diff = np.abs(p_engine.astype(np.float64) - p_torch.astype(np.float64))
    flips = int(np.sum((p_engine >= thr) != (p_torch >= thr)))
    r = SetResult(
        dataset=ds, engine=engine_name, precision=precision, n=int(y.size), n_atypical=int(y.sum()), threshold=thr,
        torch_ba=metric(balanced_accuracy, p_torch, thr), engine_ba=metric(balanced_accuracy, p_engine, thr),
        torch_auroc=metric(auroc, p_torch), engine_auroc=metric(auroc, p_engine),
        max_abs_dp=float(diff.max()) if diff.size else 0.0, mean_abs_dp=float(diff.mean()) if diff.size else 0.0,
        agreement=1.0 - flips / max(1, y.size), n_flips=flips)
    if not np.isfinite(p_engine).all():
        r.checks.append(Check("finite", None, None, False, "the engine returned NaN or infinite probabilities"))
    r.checks += extra + evaluate_checks(tolerance_for(precision), d_ba=r.d_ba, d_auroc=r.d_auroc,
                                        max_dp=r.max_abs_dp, flips=flips, n=r.n)
    return r


@dataclass(frozen=True)
class ParityOptions:
    """What :func:`parity` compares and how; each field is one of its keyword arguments.

    ``engines``: ONNX files / TensorRT plans (None: the shipped edge engines). ``run``: the run
    directory they were exported from; ``weights``: alternatively a full state dict of one network
    (None with no ``run`` and no ``engines``: the shipped ``edge.safetensors``). ``max_crops``: a
    class-stratified sample of at most this many crops per set (0 = all). ``provider``: ONNX Runtime
    provider for ONNX files (cpu by default: the reference runtime). ``device``: PyTorch device.
    ``keep_predictions``: keep every crop's two probabilities in the results (and the JSON).
    ``runtimes`` / ``precisions``: only these engines / precisions (None: every one that applies)."""

    run: str | Path | None = None
    engines: Sequence[str | Path] | None = None
    weights: str | Path | None = None
    max_crops: int = 0
    batch: int = 64
    threads: int = 0
    provider: str = "cpu"
    device: str = "cpu"
    datasets: Sequence[str] = TEST_SETS
    show_progress: bool = True
    keep_predictions: bool = False
    runtimes: Sequence[str] | None = None
    precisions: Sequence[str] | None = None
    log: Callable[[str], None] = log_to_stderr


def parity(data_root: str | Path | None = None, options: ParityOptions | None = None, **settings) -> Report:
    """Compare PyTorch and each engine on every present evaluation set; see the module docstring.

    ``options``: a :class:`ParityOptions`; keyword ``settings`` (its field names, e.g.
    ``engines=[...]``, ``max_crops=200``) override its fields.

    The steps: the two sides named (:func:`_pytorch_side_named`), the engines loaded, one PyTorch
    reference per distinct model (:func:`_references`), then every present set compared
    (:func:`_compare_set`).
    """
    t0 = time.perf_counter()
    opts = replace(options or ParityOptions(), **settings)
    root = resolve_data_root(data_root)
    if opts.batch < 1:
        raise ParityError(f"batch must be >= 1, got {opts.batch}")
    paths, notes = resolve_engines(opts.engines)
    opts = replace(opts, weights=_pytorch_side_named(opts))

    import torch  # the PyTorch side; imported here so --help and errors above stay fast

    if opts.threads > 0:
        torch.set_num_threads(opts.threads)

    # load the engines: every file on every installed engine that takes it, at every precision
    loaded, more = load_variants(paths, runtimes=opts.runtimes, precisions=opts.precisions, provider=opts.provider,
                                 threads=opts.threads, error=ParityError)
    notes += more
    refs, ref_of, infos = _references(loaded, opts, notes)
    report = Report(data_root=str(root), engines=infos, max_crops=max(0, int(opts.max_crops)), notes=notes)
    sets = available_eval_sets(root)
    for ds in opts.datasets:
        found = sets.get(ds)
        if found is None:
            raise ParityError(f"unknown evaluation set {ds!r}; known: {', '.join(TEST_SETS)}")
        if isinstance(found, str):
            report.absent[ds] = found
            opts.log(f"parity: {ds}: absent")
            continue
        report.results += _compare_set(ds, stratified_subset(found, opts.max_crops), loaded, infos, ref_of, refs, opts)
    if opts.max_crops and any(i.precision != "fp32" for i in infos):
        small = [r for r in report.results if r.precision != "fp32" and r.n_atypical and 1 / (2 * r.n_atypical) > 0.01]
        if small:
            report.notes.append("on a sample this small one flipped atypical label moves BA by more than the int8/fp16 "
                                "tolerance (0.01); the full sets are the verdict that counts (run without --max-crops)")
    report.machine = machine_info()
    report.seconds = time.perf_counter() - t0
    return report


def _pytorch_side_named(opts: ParityOptions) -> str | Path | None:
    """The weights of the PyTorch side: ``opts.weights``; the shipped edge.safetensors when neither
    a run nor engines are named. Refused: engines without a PyTorch side, or both a run and weights."""
    run, weights = opts.run, opts.weights
    if run is None and weights is None:
        if opts.engines:
            raise ParityError("the PyTorch side is missing: pass --run DIR (the run the engine was exported from) or "
                              "--weights FILE (a full state dict of the network)")
        weights = SHIPPED_WEIGHTS
        if not Path(weights).is_file():
            raise ParityError(f"the shipped model's PyTorch weights {weights.name} are missing from {ASSETS}: the "
                              "shipped engines cannot be compared with their PyTorch model")
    if run is not None and weights is not None:
        raise ParityError("pass either --run or --weights, not both")
    return weights


def _references(loaded: list, opts: ParityOptions, notes: list[str]) -> tuple[dict, list[tuple], list[EngineInfo]]:
    """One PyTorch reference per distinct model of the engines (their folds of ``opts.run``, or
    ``opts.weights`` as their network): (references by key, each engine's key, each engine's
    :class:`EngineInfo`). A provenance warning becomes a note."""
    refs: dict[tuple, TorchReference] = {}
    infos: list[EngineInfo] = []
    ref_of: list[tuple] = []
    for eng in loaded:
        meta = eng.meta
        key, provenance = _reference_for(eng, opts, refs)
        if provenance.startswith("WARNING"):
            notes.append(f"{eng.path.name}: {provenance}")
        ref_of.append(key)
        infos.append(EngineInfo(name=engine_label(eng), path=str(eng.path), precision=eng.precision,
                                provider=eng.provider, model=meta.model, method=meta.method, folds=list(meta.folds),
                                threshold=float(meta.threshold), tolerance=tolerance_for(eng.precision).describe(),
                                reference=refs[key].description, provenance=provenance, runtime=eng.engine,
                                artefact_precision=meta.precision))
    return refs, ref_of, infos


def _reference_for(eng, opts: ParityOptions, refs: dict) -> tuple[tuple, str]:
    """(key of the PyTorch reference of ``eng`` in ``refs``, built there when new; whether its weights
    are those the engine records)."""
    meta, run, weights, log = eng.meta, opts.run, opts.weights, opts.log
    if run is not None:
        key = ("run", tuple(str(f) for f in meta.folds))
        if not meta.folds:
            raise ParityError(f"{eng.path.name}: its metadata names no folds; cannot rebuild its PyTorch model")
        if key not in refs:
            log(f"parity: building PyTorch fold model(s) {_folds(meta.folds)} of {Path(run).name}")
            models, cfg, src = build_run_models(Path(run), list(meta.folds))
            desc = (f"{cfg.name}/{src.method} from {Path(run).name}, folds {_folds(src.folds)}"
                    + (" (mean of fold probabilities)" if len(models) > 1 else ""))
            refs[key] = TorchReference(models, cfg.preprocess, desc, opts.device)
            refs[key].src = src
        return key, _provenance_run(refs[key].src, meta)
    key = ("weights", str(weights), meta.model, meta.method)
    if key not in refs:
        log(f"parity: building PyTorch {meta.model}/{meta.method} from {Path(weights).name}")
        model, cfg = build_single_model(Path(weights), meta.model, meta.method)
        refs[key] = TorchReference([model], cfg.preprocess, f"{meta.model}/{meta.method} from {Path(weights).name}",
                                   opts.device)
    return key, _provenance_file(Path(weights), meta)


def _compare_set(ds: str, samples: list, loaded: list, infos: list[EngineInfo], ref_of: list[tuple],
                 refs: dict, opts: ParityOptions) -> list[SetResult]:
    """Every engine against its PyTorch reference on the crops of one set: each crop decoded once
    per preprocessing, each reference run once per preprocessing, the same pixels to both sides."""
    y = np.array([s.label for s in samples], dtype=np.int64)
    pixels_by_pre: dict[Preprocess, np.ndarray] = {}
    torch_cache: dict[tuple, np.ndarray] = {}
    show, out = opts.show_progress, []
    for eng, info, key in zip(loaded, infos, ref_of):
        pre, ref = eng.meta.preprocess, refs[key]
        if pre not in pixels_by_pre:
            pixels_by_pre[pre] = decode_crops([s.path for s in samples], pre, f"{ds}: decoding", show)
        pixels = pixels_by_pre[pre]
        extra: list[Check] = []
        if ref.pre != pre:
            extra.append(Check("preprocess", None, None, False,
                               f"preprocess: the engine's metadata ({pre}) differs from the PyTorch model's "
                               f"({ref.pre}); the same pixels were given to both"))
        tkey = (key, pre)
        if tkey not in torch_cache:
            torch_cache[tkey] = ref.predict(pixels, opts.batch, f"{ds}: PyTorch", show)
        p_engine = _predict_engine(eng, pixels, opts.batch, f"{ds}: {info.name}", show)
        r = _compare(ds, info.name, eng.meta, y, torch_cache[tkey], p_engine, extra, eng.precision)
        if opts.keep_predictions:
            r.predictions = {"names": [s.name for s in samples], "labels": y.tolist(),
                             "torch": torch_cache[tkey].tolist(), "engine": p_engine.tolist()}
        out.append(r)
        opts.log(f"parity: {ds} / {info.name}: {'pass' if r.ok else 'FAIL'} (max |Δp| {r.max_abs_dp:.2e}, "
                 f"ΔBA {_f(r.d_ba, '+.4f')}, ΔAUROC {_f(r.d_auroc, '+.2e')}, {r.n_flips} label(s) differ, n={r.n})")
    return out


def _predict_engine(eng, pixels: np.ndarray, batch: int, desc: str, show: bool) -> np.ndarray:
    out = []
    steps = range(0, len(pixels), batch)
    for i in progress(steps, len(steps), desc, show):
        out.append(np.asarray(eng.predict(np.ascontiguousarray(pixels[i:i + batch])), np.float64))
    return np.concatenate(out) if out else np.zeros(0)


# -- command line --------------------------------------------------------------------------------

EPILOG = """Examples:

\b
  ami-bench parity --data-root D       # shipped edge model: edge.safetensors vs edge.onnx + edge-int8.onnx
  ami-bench parity --max-crops 200     # quick: a class-stratified sample of 200 crops per set
  ami-bench parity --run runs/edge --engine edge.onnx --engine edge-int8.onnx
  ami-bench parity --run runs/uni-lora --engine uni.onnx --format json -o parity.json
  ami-bench parity --weights edge.safetensors --engine my-edge.onnx
  ami-bench parity --runtime openvino --precision bf16    # one engine, one precision

\b
Every file runs on every installed engine that loads it (ONNX Runtime, OpenVINO, TensorRT), at
every precision that engine offers here; each (file, engine, precision) is one row.
Tolerances: fp32: labels identical, |ΔAUROC| <= 1e-4, max |Δp| <= 1e-4
            int8/fp16/bf16: |ΔBA| <= 0.01, |ΔAUROC| <= 0.005
Exit status: 0 all pass; 1 a check failed (the verdict names engine, dataset and metric);
2 the comparison could not be set up. Absent datasets are reported as absent."""


def register(app: typer.Typer) -> None:
    @app.command("parity", epilog=EPILOG)
    def parity_cmd(
        data_root: Path | None = typer.Option(None, "--data-root", help="Folder holding AMi-Br/, AtNorM-Br/, AtNorM-MD/ "
                                                 "(default: $AMI_DATA_ROOT, else ~/.local/share/ami/ami-br-benchmark)."),
        run: Path | None = typer.Option(None, "--run", help="Training run the engines were exported from (its "
                                           "config.json + fold*/best.safetensors; folds from each engine's metadata)."),
        engine: list[Path] | None = typer.Option(None, "--engine", help="Engine file (ONNX or TensorRT plan); repeat "
                                                    "for several. Default: the shipped edge.onnx and edge-int8.onnx."),
        weights: Path | None = typer.Option(None, "--weights", help="Instead of --run: a full PyTorch state dict "
                                               "(.safetensors) of the engines' network."),
        max_crops: int = typer.Option(0, "--max-crops", help="At most N crops per set (class-stratified, seed 0); 0 = all."),
        fmt: str = typer.Option("md", "--format", "-f", help="md | csv | json."),
        output: Path | None = typer.Option(None, "--output", "-o", help="Write the report here (the verdict still "
                                              "goes to stdout)."),
        batch: int = typer.Option(64, "--batch", help="Batch size for both sides."),
        threads: int = typer.Option(0, "--threads", help="CPU threads for PyTorch and ONNX Runtime (0 = their default)."),
        provider: str = typer.Option("cpu", "--provider", help="ONNX Runtime provider for ONNX engines: cpu | cuda | "
                                     "tensorrt | auto (plans always run on TensorRT)."),
        device: str = typer.Option("cpu", "--device", help="PyTorch device: cpu | cuda (float32, TF32 off)."),
        runtime: list[str] | None = typer.Option(None, "--runtime", help=RUNTIME_HELP),
        precision: list[str] | None = typer.Option(None, "--precision", help="Only these precisions (fp32 | bf16 | "
                                                      "int8); repeat. Default: every precision each engine runs the "
                                                      "file at here (OpenVINO: fp32 and bf16 where the CPU has it)."),
    ):
        """Check exported engines against their PyTorch model on every present test set."""
        if fmt not in FORMATS:
            raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
        try:
            opts = ParityOptions(run=run, engines=engine, weights=weights, max_crops=max_crops, batch=batch,
                                 threads=threads, provider=provider, device=device, runtimes=runtime,
                                 precisions=precision, log=lambda s: typer.echo(s, err=True))
            rep = parity(data_root, opts)
        except ParityError as e:
            typer.echo(f"ami-bench parity: {e}", err=True)
            raise typer.Exit(2) from None
        text = rep.render(fmt)
        if output:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text)
            typer.echo(f"wrote {output}", err=True)
            typer.echo("\n".join(rep.verdict_lines() + rep.notes))
        else:
            typer.echo(text, nl=False)
        if not rep.results:
            raise typer.Exit(2)
        if not rep.ok:
            typer.echo("PARITY FAILED: " + "; ".join(rep.failures()), err=True)
            raise typer.Exit(1)
