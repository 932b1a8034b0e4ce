"""ami-bench evaluate: how does a model do on a labelled crop set of your own?

Model: any artefact (ONNX, int8 ONNX, TensorRT plan: through :func:`ami.runtime.engines.load_engine`,
torch-free) or a run directory (its fold ensemble, or one fold: PyTorch, imported only then).
Crops: a folder in the release layout (``Atypical/``, ``Normal/``), a CSV of ``path,label`` with an
optional ``group`` column, or a dataset name under the data root (AMi-Br-test, AtNorM-Br, AtNorM-MD).

Order of work: the data check first (byte-identical crops, conflicting labels, unreadable files,
crop sizes against the training crops'), then the scores, then the metrics (each with a stratified
bootstrap interval, :func:`ami.runtime.metrics.stratified_bootstrap`) on all crops and on the
de-duplicated set, per group, and the model's own recorded numbers beside them. The report
(Markdown, JSON, per-crop CSV, ROC and reliability SVGs) is rendered by :mod:`ami.bench.evaluate_report`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import typer

from ami.runtime import DIST_NAME
from ami.runtime.artifact import AMIBR_CROP, ArtifactError
from ami.runtime.datasets import (
    TEST_SETS,
    CropSetError,
    DatasetMissing,
    Sample,
    crop_key,
    deduplicate,
    labelled_csv,
    labelled_folder,
    load_eval_set,
    resolve_data_root,
)
from ami.runtime.engines import EngineError
from ami.runtime.errors import AmiError, BadInput, Fault, Unavailable, first_line
from ami.runtime.hashing import file_sha256
from ami.runtime.imageio import ImageError, decode_rgb
from ami.runtime.metrics import BOOTSTRAP_METHOD, mean_std
from ami.runtime.models import resolve_model, shipped_model

N_BOOT = 2000
SEED = 0


class EvaluateError(BadInput, ValueError):
    """The model or the crop set cannot be evaluated as asked (exit 2)."""


@dataclass
class CropSet:
    """A labelled crop set: its crops, an optional group per crop, and where it came from."""

    name: str
    kind: str  # folder | csv | dataset
    samples: list[Sample]
    groups: dict[Path, str] | None = None


@dataclass
class Scorer:
    """A model that turns crop files into atypical probabilities."""

    name: str
    kind: str  # artefact | run
    description: str
    threshold: float
    input_size: int
    training_crop: dict
    reference: dict  # the model's own recorded numbers (model card / run records)
    predict: Callable[[np.ndarray], np.ndarray]  # uint8 NHWC -> probabilities
    preprocess: object = None
    notes: list[str] = field(default_factory=list)


# -- the crops ------------------------------------------------------------------------------------

def load_crop_set(spec: str, data_root: str | Path | None = None) -> CropSet:
    """A folder, a CSV or a dataset name (see the module docstring). Raises EvaluateError."""
    p = Path(spec)
    try:
        if p.is_dir():
            return CropSet(p.name or str(p), "folder", labelled_folder(p))
        if p.is_file():
            if p.suffix.lower() != ".csv":
                raise EvaluateError(f"{p}: a crop set is a folder (Atypical/, Normal/), a .csv of path,label[,group] "
                                    "or a dataset name")
            samples, groups = labelled_csv(p)
            return CropSet(p.name, "csv", samples, groups)
        if spec in TEST_SETS:
            return CropSet(spec, "dataset", load_eval_set(resolve_data_root(data_root), spec))
    except DatasetMissing as e:
        raise EvaluateError(first_line(e)) from None
    except CropSetError as e:
        raise EvaluateError(str(e)) from None
    raise EvaluateError(f"{spec}: no such folder or CSV, and not a dataset name ({', '.join(TEST_SETS)})")


def data_check(crops: CropSet, training_crop: dict, mpp: float | None = None) -> dict:
    """Before any score: unreadable or missing files, byte-identical crops (and conflicting labels
    among them), the de-duplicated set, and the crops' pixel sizes against the training crops'."""
    digests, unreadable, sizes = {}, {}, Counter()
    for s in crops.samples:
        info: dict = {}
        try:
            digests[s.path] = file_sha256(s.path)
            decode_rgb(s.path, info=info)
            sizes[tuple(info["size"])] += 1
        except (OSError, ImageError) as e:
            unreadable[s.path] = first_line(e) if isinstance(e, ImageError) else f"cannot read: {e.strerror or e}"
    readable = [s for s in crops.samples if s.path not in unreadable]
    dedup = deduplicate(readable, digests)
    want = int(training_crop["size_px"])
    warnings = []
    odd = {k: v for k, v in sizes.items() if k != (want, want)}
    if odd:
        seen = ", ".join(f"{w}x{h} px ({n})" for (w, h), n in sorted(odd.items(), key=lambda kv: -kv[1]))
        warnings.append(f"{sum(odd.values())} of {len(readable)} crops are not {want}x{want} px like the training "
                        f"crops ({seen}); they are resized to {want} px, which is only right if they cover the same "
                        f"field of view ({want * training_crop['mpp']:.0f} um at {training_crop['mpp']} um/px)")
    if mpp is not None and abs(mpp / training_crop["mpp"] - 1) > 0.1:
        warnings.append(f"your crops are at {mpp} um/px, the training crops at {training_crop['mpp']} um/px: "
                        "rescale them to the training resolution first, or expect the numbers below to suffer")
    return {"n_files": len(crops.samples), "unreadable": {str(k): v for k, v in unreadable.items()},
            "sizes": {f"{w}x{h}": n for (w, h), n in sorted(sizes.items())}, "training_crop": training_crop,
            "warnings": warnings, "duplicate_groups": [
                {"sha256": g.sha256, "crops": [_key(s, crops) for s in g.samples], "conflicting": g.conflicting}
                for g in dedup.groups],
            "dropped_copies": [_key(s, crops) for s in dedup.dropped_copies],
            "dropped_conflicts": [_key(s, crops) for s in dedup.dropped_conflicts],
            "_kept": {s.path for s in dedup.kept}, "_readable": readable}


def _key(s: Sample, crops: CropSet) -> str:
    """How a crop is named in the report: Class/name for a folder or dataset, the CSV's path otherwise."""
    return crop_key(s) if crops.kind != "csv" else f"{s.path.name} ({'Atypical' if s.label else 'Normal'})"


# -- the models -----------------------------------------------------------------------------------

def artefact_scorer(path: Path, engine: str = "auto", precision: str | None = None, provider: str = "auto",
                    threads: int = 0, batch: int = 64) -> Scorer:
    """An exported artefact on one of the runtime's engines (no torch)."""
    from ami.runtime.engines import load_engine

    if not path.is_file():
        raise EvaluateError(f"{path}: no such model file (an .onnx artefact, a TensorRT .plan, or a run directory)")
    eng = load_engine(path, provider=provider, threads=threads, engine=engine, precision=precision)
    meta = eng.meta

    def predict(pixels: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(eng.predict(pixels[i:i + batch]), dtype=np.float64).ravel()
                               for i in range(0, len(pixels), batch)]) if len(pixels) else np.zeros(0)

    desc = (f"{meta.model}/{meta.method}, {getattr(eng, 'precision', meta.precision)}, folds "
            f"{','.join(map(str, meta.folds)) or '?'}, on {type(eng).__name__} ({getattr(eng, 'provider', '')})")
    return Scorer(path.name, "artefact", desc, float(meta.threshold), int(meta.preprocess.input_size),
                  meta.training_crop(), card_reference(path), predict, meta.preprocess)


def run_scorer(run: Path, fold: str | None = None, batch: int = 64) -> Scorer:
    """A run directory's fold ensemble (mean probability) or one fold, in PyTorch on the CPU, as
    ``ami-bench parity --run`` builds it; threshold 0.5 (the training protocol)."""
    try:
        from ami.export import ExportError
        from ami.export.ensemble import reference_probs
        from ami.export.source import resolve_source
        from ami.train.foldmodel import FoldModelError, load_fold_model
    except ImportError as e:
        raise Unavailable(f"a run directory needs PyTorch and the training extras (pip install '{DIST_NAME}[train]'): {e}") from None
    try:
        src = resolve_source(run, fold if fold is not None else "all")
        models = [load_fold_model(src.run, f) for f in src.folds]
    except (ExportError, FoldModelError) as e:
        raise EvaluateError(first_line(e)) from None
    cfg = src.cfg
    pre = cfg.preprocess

    def predict(pixels: np.ndarray) -> np.ndarray:
        return reference_probs(models, pre, pixels, batch)

    folds = [str(f) for f in src.folds]
    what = "fold " + folds[0] if len(folds) == 1 else f"{len(folds)}-fold ensemble (mean probability)"
    return Scorer(f"{src.run.path.name} ({what})", "run", f"{cfg.name}/{src.config['method']}, {what}, PyTorch CPU "
                  "float32", 0.5, int(pre.input_size), dict(AMIBR_CROP, assumed=True), run_reference(src.run.path, folds),
                  predict, pre)


def card_reference(path: Path) -> dict:
    """The model card's numbers for an artefact: a ``*-card.json`` beside it that names the file."""
    for card in sorted(path.parent.glob("*-card.json")):
        try:
            c = json.loads(card.read_text())
        except (OSError, ValueError):
            continue
        for key in ("shipped", "shipped_int8"):
            if (c.get(key) or {}).get("file") == path.name:
                fs = c.get("fold_summary", {}).get("validation", {})
                return {"source": card.name, "validation_folds": {m: fs[m]["mean"] for m in ("balanced_accuracy", "auroc")
                                                                   if m in fs},
                        "tests": {n: t for n, t in c[key].get("tests", {}).items()}}
    return {}


def run_reference(run: Path, folds: list[str]) -> dict:
    """A run's own records for the chosen folds: each test set's mean over folds (as ``ami-bench
    table``) or, for one fold, that fold's value."""
    from ami.runtime.rundir import RunDir

    recs = [RunDir(run).fold(int(k)).metrics() for k in folds if k.isdigit()]
    tests: dict = {}
    for name in sorted({n for m in recs for n in m.get("tests", {})}):
        vals = [m["tests"][name] for m in recs if "auroc" in m["tests"].get(name, {})]
        if len(vals) == len(recs) and vals:
            tests[name] = {k: mean_std([v[k] for v in vals], ddof=0)[0] for k in ("balanced_accuracy", "auroc")}
            tests[name]["n"] = vals[0]["n"]
        else:
            tests[name] = {"absent": next((m["tests"][name].get("absent") for m in recs if name in m["tests"]
                                           and "absent" in m["tests"][name]), "not recorded for every fold")}
    val = [m["validation"] for m in recs if m.get("validation")]
    return {"source": f"{run.name}/fold*/metrics.json (mean over folds {','.join(folds)}, as ami-bench table)",
            "validation_folds": {k: mean_std([v[k] for v in val], ddof=0)[0] for k in ("balanced_accuracy", "auroc")}
            if val else {}, "tests": tests}


# -- scoring --------------------------------------------------------------------------------------

def score(scorer: Scorer, samples: list[Sample], batch: int = 64, show: bool = True) -> np.ndarray:
    """Atypical probability of every crop (decoded as ami-infer decodes them), with a progress bar."""
    from ami.runtime.pixels import decode_pixels

    from .parity import progress

    out = []
    steps = range(0, len(samples), batch)
    for i in progress(steps, len(steps), "scoring", show):
        pixels = decode_pixels([s.path for s in samples[i:i + batch]], scorer.preprocess)
        out.append(scorer.predict(pixels))
    p = np.concatenate(out) if out else np.zeros(0)
    if p.shape != (len(samples),) or not np.isfinite(p).all():
        raise Fault(f"{scorer.name} returned {p.shape} scores, or scores that are not finite, for {len(samples)} crops")
    return p


def evaluate_set(scorer: Scorer, crops: CropSet, *, n_boot: int = N_BOOT, seed: int = SEED, batch: int = 64,
                 mpp: float | None = None, show: bool = True, log=lambda s: None) -> dict:
    """The whole evaluation as one JSON-able dict (see :mod:`ami.bench.evaluate_report`)."""
    from .evaluate_report import metrics_block

    log(f"data check: {len(crops.samples)} crops")
    check = data_check(crops, scorer.training_crop, mpp)
    readable, kept = check.pop("_readable"), check.pop("_kept")
    if not readable:
        raise EvaluateError(f"{crops.name}: none of the {len(crops.samples)} crops can be read")
    log(f"scoring {len(readable)} crops with {scorer.name}")
    p = score(scorer, readable, batch, show)
    y = np.array([s.label for s in readable])
    log(f"metrics with {n_boot} bootstrap resamples")
    rep = {"model": {"name": scorer.name, "kind": scorer.kind, "description": scorer.description,
                     "threshold": scorer.threshold, "input_size": scorer.input_size},
           "crops": {"name": crops.name, "kind": crops.kind, "n": len(readable),
                     "atypical": int(y.sum()), "normal": int((1 - y).sum())},
           "data_check": check,
           "bootstrap": {"method": BOOTSTRAP_METHOD, "resamples": n_boot, "seed": seed, "level": 0.95},
           "all": metrics_block(y, p, scorer.threshold, n_boot, seed)}
    if check["duplicate_groups"]:
        m = np.array([s.path in kept for s in readable])
        rep["deduplicated"] = metrics_block(y[m], p[m], scorer.threshold, n_boot, seed)
    if crops.groups is not None:
        g = np.array([crops.groups[s.path] for s in readable])
        rep["groups"] = {k: metrics_block(y[g == k], p[g == k], scorer.threshold, n_boot, seed, curves=False)
                         for k in sorted(set(g))}
    rep["reference"] = scorer.reference
    rep["same_data_as_reference"] = crops.name if crops.kind == "dataset" else None
    rep["predictions"] = [{"crop": _key(s, crops), "path": str(s.path), "label": int(s.label),
                           "group": crops.groups[s.path] if crops.groups is not None else None,
                           "probability": float(q), "kept_in_deduplicated": s.path in kept}
                          for s, q in zip(readable, p)]
    return rep


RECORDED_AFTER = ("scored after training by `ami-bench evaluate RUN {name} --record` from this fold's committed "
                  "checkpoint (the set was not on disk when the fold was trained)")


def record_folds(run: Path, name: str, data_root: str | Path | None = None, batch: int = 64, overwrite: bool = False,
                 show: bool = True, log=lambda s: None) -> list[str]:
    """Score each finished fold of ``run`` (its model alone) on the test set ``name`` and write the
    metrics and per-crop predictions into the fold's metrics.json, as training would have, where
    the set is recorded absent (every fold with ``overwrite``). Returns the folds written."""
    from ami.runtime.metrics import evaluate
    from ami.runtime.rundir import RunDir

    if name not in TEST_SETS:
        raise EvaluateError(f"--record takes a test set name ({', '.join(TEST_SETS)}), not {name!r}")
    samples = load_crop_set(name, data_root).samples
    y = np.array([s.label for s in samples])
    written = []
    for fd in RunDir(run).cv_folds():
        if not fd.is_finished():
            continue
        m = fd.metrics()
        if "auroc" in m.get("tests", {}).get(name, {}) and not overwrite:
            log(f"fold {fd.fold}: {name} already recorded (pass --overwrite to score it again)")
            continue
        p = score(run_scorer(run, str(fd.fold), batch), samples, batch, show)
        m.setdefault("tests", {})[name] = {**evaluate(y, p, 0.5).to_dict(), "data_fingerprint": None,
                                           "recorded_after_training": RECORDED_AFTER.format(name=name)}
        m.setdefault("predictions", {})[name] = [[s.name, int(s.label), round(float(q), 6)] for s, q in zip(samples, p)]
        m.pop("_dir", None)
        fd.write_metrics(m)
        log(f"fold {fd.fold}: {name} BA {m['tests'][name]['balanced_accuracy']:.4f} AUROC {m['tests'][name]['auroc']:.4f} "
            f"(n={len(samples)}) written to {fd.metrics_path}")
        written.append(str(fd.fold))
    return written


def check_block(rep: dict) -> None:
    """Fail loudly when no metric could be computed (one class only)."""
    if "undefined" in rep["all"]:
        raise EvaluateError(f"{rep['crops']['name']}: {rep['all']['undefined']}")


def scorer_for(model: Path, *, fold: str | None, engine: str, precision: str | None, provider: str, threads: int,
               batch: int) -> Scorer:
    """A run directory (with ``fold``) or an artefact file."""
    from ami.runtime.rundir import RunDir

    if model.is_dir():
        if not (RunDir(model).is_run() or RunDir(model.parent).is_run()):
            raise EvaluateError(f"{model}: a folder, but not a run directory (no config.json) nor one of its folds")
        return run_scorer(model, fold, batch)
    if fold is not None:
        raise EvaluateError("--fold applies to a run directory, not to an artefact file")
    return artefact_scorer(model, engine, precision, provider, threads, batch)


EPILOG = """\b
Examples:
  ami-bench evaluate edge our_crops/ -o eval-ours                           # the shipped model; Atypical/ and Normal/ inside
  ami-bench evaluate edge-int8.onnx crops.csv -o eval-sites                  # path,label[,group] per line
  ami-bench evaluate edge.onnx AtNorM-Br --data-root DATA -o eval-br         # a dataset under the data root
  ami-bench evaluate runs/lite0-lora AtNorM-Br -o eval-run                   # a run's fold ensemble (PyTorch)
  ami-bench evaluate runs/lite0-lora --fold 2 my_crops/ -o eval-fold2        # one fold of it

Writes OUT/report.md, report.json, predictions.csv, roc.svg, reliability.svg. Exit codes: 0 done,
2 bad input (model, crops, flags; nothing written), 3 missing engine / library, 4 fault."""


def register(app: typer.Typer) -> None:
    @app.command("evaluate", epilog=EPILOG)
    def evaluate_cmd(
        model: Path = typer.Argument(..., help="Artefact (.onnx, int8 .onnx, TensorRT .plan), a shipped model by name (edge, edge-int8) or a run directory."),
        crops: str = typer.Argument(..., help="Folder with Atypical/ and Normal/, a CSV (path,label[,group]), or a "
                                    f"dataset name under the data root ({', '.join(TEST_SETS)})."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Folder for the report (Markdown, JSON, CSV, SVG)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace the report files in an existing --out."),
        data_root: Path | None = typer.Option(None, "--data-root", help="For a dataset name: folder holding AMi-Br/, "
                                              "AtNorM-Br/, AtNorM-MD/ (default: $AMI_DATA_ROOT, else the per-user one)."),
        fold: str | None = typer.Option(None, "--fold", help="Run directory only: this fold alone (0-4) instead of "
                                        "the ensemble of every finished fold."),
        engine: str = typer.Option("auto", "--engine", help="Artefact only: auto | onnxruntime | openvino | tensorrt."),
        precision: str | None = typer.Option(None, "--precision", help="Artefact only: fp32 | bf16 | fp16 | int8 "
                                             "(default: the artefact's own)."),
        provider: str = typer.Option("auto", "--provider", help="ONNX Runtime provider: auto | cpu | cuda | tensorrt."),
        threads: int = typer.Option(0, "--threads", help="CPU threads (0 = the engine's default)."),
        batch: int = typer.Option(64, "--batch-size", min=1, help="Crops per batch."),
        n_boot: int = typer.Option(N_BOOT, "--resamples", min=100, help="Bootstrap resamples per interval."),
        seed: int = typer.Option(SEED, "--seed", help="Bootstrap seed."),
        mpp: float | None = typer.Option(None, "--mpp", help="Your crops' resolution in um/px, checked against the "
                                         "training crops'."),
        record: bool = typer.Option(False, "--record", help="Run directory + test set name: score each fold alone and "
                                    "write the set into the folds' metrics.json where it is recorded absent (what "
                                    "ami-bench table and card read); no report."),
    ):
        """Score a labelled crop set: metrics with 95 % intervals, per group, data check, ROC and calibration."""
        from .evaluate_report import write_report

        try:
            if record:
                if not model.is_dir():
                    raise EvaluateError("--record takes a run directory (its folds' checkpoints are scored)")
                done = record_folds(model, crops, data_root, batch, overwrite, log=lambda s: typer.echo(s, err=True))
                typer.echo(f"recorded {crops} for fold(s) {','.join(done) or 'none'} of {model}")
                return
            if out is None:
                raise EvaluateError("pass -o/--out DIR for the report")
            if out.exists() and any(out.iterdir()) and not overwrite:
                raise EvaluateError(f"{out} exists and is not empty: pass --overwrite to replace its report")
            if not model.exists() and shipped_model(str(model)) is not None:
                model = resolve_model(str(model))  # a shipped model by name: edge, edge-int8
            if not model.exists():
                raise EvaluateError(f"{model}: no such model file, run directory or shipped model "
                                    "(`ami-infer --list-models` lists them)")
            crop_set = load_crop_set(crops, data_root)
            scorer = scorer_for(model, fold=fold, engine=engine, precision=precision, provider=provider,
                                threads=threads, batch=batch)
            rep = evaluate_set(scorer, crop_set, n_boot=n_boot, seed=seed, batch=batch, mpp=mpp,
                               log=lambda s: typer.echo(s, err=True))
            check_block(rep)
            for path in write_report(rep, out):
                typer.echo(f"wrote {path}", err=True)
            typer.echo(rep_summary(rep))
        except AmiError as e:
            typer.echo(f"ami-bench evaluate: {first_line(e)}", err=True)
            raise typer.Exit(e.exit_code) from None
        except (ArtifactError, OSError) as e:
            typer.echo(f"ami-bench evaluate: {first_line(e)}", err=True)
            raise typer.Exit(2) from None
        except EngineError as e:  # an engine that cannot load here: its own code when it carries one
            typer.echo(f"ami-bench evaluate: {first_line(e)}", err=True)
            raise typer.Exit(getattr(e, "exit_code", 3)) from None


def rep_summary(rep: dict) -> str:
    """One line per population: n, BA and AUROC with their intervals."""
    lines = []
    for key, title in (("all", "all crops"), ("deduplicated", "de-duplicated")):
        b = rep.get(key)
        if b and "point" in b:
            ba, au = b["point"]["balanced_accuracy"], b["point"]["auroc"]
            lo, hi = b["ci"]["balanced_accuracy"]
            alo, ahi = b["ci"]["auroc"]
            lines.append(f"{rep['crops']['name']} ({title}, n={b['n']}): BA {ba:.4f} [{lo:.4f}, {hi:.4f}]  "
                         f"AUROC {au:.4f} [{alo:.4f}, {ahi:.4f}]")
    return "\n".join(lines)
