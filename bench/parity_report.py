"""The parity report: tolerances per precision, the checks against them, one :class:`SetResult` per
(dataset, engine), and the :class:`Report` as Markdown, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field

from ami.runtime.datasets import TEST_SETS
from ami.runtime.tolerances import FP32_PROB_TOL, REDUCED_AUROC_TOL, REDUCED_BA_TOL

FORMATS = ("md", "csv", "json")
SCHEMA = "ami-bench-parity/1"


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
            lines.append(f"- **{e.name}**: {e.model}/{e.method}, {e.precision}, folds {folds_text(e.folds)}, threshold "
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
                    r.dataset, r.engine, r.precision, f"{r.n} ({r.n_atypical})", fmt_or_na(r.torch_ba, ".4f"),
                    fmt_or_na(r.engine_ba, ".4f"), fmt_or_na(r.d_ba, "+.4f"), fmt_or_na(r.torch_auroc, ".4f"), fmt_or_na(r.engine_auroc, ".4f"),
                    fmt_or_na(r.d_auroc, "+.2e"), f"{r.max_abs_dp:.2e}", f"{r.mean_abs_dp:.2e}",
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


def fmt_or_na(v, fmt: str) -> str:
    """``v`` formatted, or n/a when there is none."""
    return "n/a" if v is None else format(v, fmt)


def _raw(v) -> str:
    return "" if v is None else repr(float(v))


def folds_text(folds) -> str:
    """Folds as a report prints them: 0,1,2 (? when unknown)."""
    return ",".join(str(f) for f in folds) if folds else "?"
