"""What is being exported: a training run, some of its folds, and what the run says about them.

Torch-free. Reads a run directory (``config.json``, ``split.json``, ``fold{k}/best.safetensors``,
``fold{k}/metrics.json``, ``all/...``) through :mod:`ami.runtime.rundir`, which owns that layout,
and answers the export's questions from *validation* records only: which run is best
(:func:`pick_best`), which decision threshold to ship (:func:`choose_threshold`), and which
validation metrics the artefact was exported from (:func:`validation_summary`). Test-set entries
of ``metrics.json`` are never read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ami.runtime.datasets import file_sha256
from ami.runtime.metrics import (
    MetricError,
    auroc,
    balanced_accuracy,
    best_threshold,
    cross_validated_threshold,
    mean_std,
)
from ami.runtime.rundir import ALL, CONFIG, METRICS, WEIGHTS, FoldId, RunDir, RunDirError
from ami.runtime.splits import FOLDS_FILE, N_FOLDS, folds_sha256
from ami.runtime.splits import parse_folds as parse_fold_list

from .errors import ExportError


@dataclass
class RunSource:
    """A run directory and the folds of it that go into one artefact."""

    run_dir: Path
    config: dict
    split: dict
    folds: list[FoldId]  # fold indices (ints), or [ALL] for RUN/all (trained on all training crops)
    metrics: dict = field(default_factory=dict)  # fold key ("0".."4", "all") -> metrics.json

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def model(self) -> str:
        return self.config["model"]

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def tiny(self) -> bool:
        return bool(self.config.get("tiny_stand_in", False))

    def fold_dir(self, fold) -> Path:
        return self.run.fold(fold).path

    def weights(self, fold) -> Path:
        return self.run.fold(fold).weights

    @property
    def cfg(self):
        """The registry entry the run was trained with (its recorded copy; see ``run_entry``)."""
        from ami.train.foldmodel import FoldModelError, run_model_entry  # torch-free

        try:
            return run_model_entry(self.config, self.run_dir)
        except FoldModelError as e:
            raise ExportError(str(e)) from None


def parse_folds(text: str | list | tuple | int | None, run_dir: Path) -> list[FoldId]:
    """The folds of one artefact, as ``ami-export --folds`` names them: 'all' -> every completed fold
    0..4 (an ensemble); 'full' -> [ALL] (the all-crops model); '0,2' -> [0, 2]. A list/int is taken
    as given."""
    if text is None:
        text = "all"
    if isinstance(text, int):
        return [text]
    if isinstance(text, (list, tuple)):
        return list(text)
    text = str(text).strip()
    if text == "all":
        done = RunDir(run_dir).completed_folds()
        if not done:
            raise ExportError(f"{run_dir} has no completed fold (fold*/{WEIGHTS} + fold*/{METRICS}); "
                              "train it first (ami-train) or pass --folds full for RUN/all")
        return done
    if text == "full":
        return [ALL]
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ExportError(f"--folds {text!r} names no fold")
    wrong = f"--folds takes 'all', 'full' or fold indices 0..{N_FOLDS - 1} like '0,2'; got {text!r}"
    if any(part in ("all", "full") for part in parts):  # one artefact: an ensemble of CV folds or RUN/all
        raise ExportError(wrong)
    try:
        return sorted(parse_fold_list(text))
    except ValueError:
        raise ExportError(wrong) from None


def _locate(p: Path) -> tuple[RunDir, list[FoldId] | None]:
    """The run of a run directory or of one fold directory (then that fold), else ExportError."""
    try:
        run, fold = RunDir.locate(p)
    except RunDirError as e:
        hint = "; an ONNX file is exported with --engine onnx-int8 or trt" if p.is_file() else ""
        raise ExportError(f"{e}{hint}") from None
    return run, None if fold is None else [fold]


def _read_source_metrics(run: RunDir, chosen: list[FoldId]) -> dict:
    """metrics.json of each chosen fold (the all-crops model may lack one) and of every completed fold."""
    metrics = {}
    for f in chosen:
        fd = run.fold(f)
        fd.require_weights()
        if fd.is_finished():
            metrics[fd.key] = fd.metrics(required=("fold",))  # an emptied metrics.json is refused
            if not fd.is_all and not metrics[fd.key].get("validation"):
                raise ExportError(f"{fd.metrics_path}: field 'validation' is empty: fold {f} of {run.name} has no "
                                  "validation record (not evaluated, or the file was emptied); nothing was exported")
        elif not fd.is_all:
            raise ExportError(f"{fd.metrics_path} is missing: fold {f} of {run.name} did not finish")
    # out-of-fold validation records of every completed fold (used for the all-crops model)
    for k in run.completed_folds():
        if str(k) not in metrics:
            metrics[str(k)] = run.fold(k).metrics()
    return metrics


def resolve_source(source: str | Path, folds="all") -> RunSource:
    """A run directory (with ``folds``) or one fold directory of it -> :class:`RunSource`."""
    p = Path(source)
    run, chosen = _locate(p)
    try:
        if chosen is None:
            chosen = parse_folds(folds, run.path)
        elif folds not in (None, "all") and parse_folds(folds, run.path) != chosen:
            raise ExportError(f"{p} is one fold; --folds {folds} contradicts it (pass the run directory instead)")
        config = run.config()
        for key in ("model", "method"):
            if key not in config:
                raise ExportError(f"{run.config_path} lacks {key!r}: not a run written by ami-train")
        split = run.split()
        metrics = _read_source_metrics(run, chosen)
    except RunDirError as e:
        raise ExportError(str(e)) from None
    return RunSource(run_dir=run.path, config=config, split=split, folds=chosen, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# validation-only decisions


def _validation_folds(src: RunSource) -> list[int]:
    """The folds whose validation records describe this artefact (all completed folds for RUN/all)."""
    if src.folds == [ALL]:
        return sorted(int(k) for k in src.metrics if k.isdigit())
    return [f for f in src.folds if isinstance(f, int)]


def oof_predictions(src: RunSource) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Out-of-fold validation predictions (labels, probabilities) of the artefact's folds."""
    ys, ps, used = [], [], []
    for k in _validation_folds(src):
        where = f"{src.fold_dir(k) / METRICS}"
        m = src.metrics.get(str(k)) or {}
        preds = m.get("predictions", {}) if isinstance(m, dict) else None
        rows = preds.get("validation") if isinstance(preds, dict) else None
        if not isinstance(preds, dict) or not isinstance(rows, (list, type(None))):
            got = rows if isinstance(preds, dict) else preds
            raise ExportError(f"{where}: 'predictions' must hold a 'validation' list of [name, label, probability] "
                              f"rows, got {type(got).__name__} {str(got)[:40]!r}")
        rows = rows or []
        try:
            y = [int(r[1]) for r in rows]
            p = [float(r[2]) for r in rows]
        except (TypeError, ValueError, IndexError, KeyError):
            raise ExportError(f"{where}: a validation prediction is not a [name, label, probability] row") from None
        if any(v not in (0, 1) for v in y) or not all(0.0 <= v <= 1.0 for v in p):  # NaN fails too
            raise ExportError(f"{where}: validation predictions need labels 0/1 and probabilities in [0, 1]")
        if rows:
            used.append(k)
            ys += y
            ps += p
    return np.asarray(ys, dtype=np.int64), np.asarray(ps, dtype=np.float64), used


def _folds_text(folds: list[int]) -> str:
    return "fold " + str(folds[0]) if len(folds) == 1 else "folds " + ",".join(map(str, folds))


def choose_threshold(src: RunSource, override: float | None = None) -> tuple[float, str, dict]:
    """(threshold, rule, details). 0.5 unless a threshold tuned on validation folds beats 0.5 on
    the held-out validation fold (cross-validated over the folds); ``override`` wins and is
    recorded as the user's."""
    if override is not None:
        t = float(override)
        if not 0.0 < t < 1.0:
            raise ExportError(f"--threshold must be in (0, 1), got {t}")
        return t, f"user-specified ({t:g}); not chosen by ami-export", {"source": "user"}
    y, p, used = oof_predictions(src)
    if y.size == 0:
        return 0.5, "default 0.5 (the run holds no validation predictions)", {"source": "default"}
    try:
        t, ba_t = best_threshold(y, p)
        ba_05 = balanced_accuracy(y, p, 0.5)
    except MetricError as e:
        return 0.5, f"default 0.5 (validation predictions unusable: {e})", {"source": "default"}
    where = (f"out-of-fold validation predictions of {_folds_text(used)} (n={y.size}, "
             f"{int(y.sum())} atypical)")
    if src.folds == [ALL]:
        where += "; the all-crops model has no validation of its own, its run's fold models stand in"
    elif len(src.folds) > 1:
        where += "; each crop scored by the one fold model that did not train on it, not by the ensemble"
    details = {"source": "validation", "folds": used, "n": int(y.size), "best_threshold": t,
               "ba_at_best": ba_t, "ba_at_0.5": ba_05}
    # A threshold tuned and judged on the same predictions always "beats" 0.5; it is adopted only
    # when tuning it on the other folds beats 0.5 on the held-out fold, on average over folds.
    per_fold = []
    for k in used:
        rows = src.metrics[str(k)]["predictions"]["validation"]
        per_fold.append((np.array([int(r[1]) for r in rows]), np.array([float(r[2]) for r in rows])))
    try:
        cv = cross_validated_threshold(per_fold)
    except MetricError as e:
        return 0.5, f"default 0.5 (no cross-validated threshold check possible: {e})", details
    details["cross_validated"] = {k: cv[k] for k in ("mean_ba_tuned", "mean_ba_0.5", "tuned_beats_0.5")}
    if cv["tuned_beats_0.5"] and t != 0.5:
        return float(t), (f"validation: threshold {t:.6g} maximises balanced accuracy on {where}; tuning it on the other folds "
                          f"beats 0.5 on each held-out fold on average (mean BA {cv['mean_ba_tuned']:.4f} vs {cv['mean_ba_0.5']:.4f})"), details
    return 0.5, (f"default 0.5: a threshold tuned on the other folds does not beat 0.5 on the held-out fold "
                 f"(mean BA {cv['mean_ba_tuned']:.4f} vs {cv['mean_ba_0.5']:.4f}) on {where}"), details


def validation_summary(src: RunSource, threshold: float = 0.5) -> dict:
    """The validation metrics the artefact is exported from (never test metrics)."""
    per_fold = {}
    for k in _validation_folds(src):
        v = (src.metrics.get(str(k)) or {}).get("validation") or {}
        if "balanced_accuracy" in v:
            per_fold[str(k)] = {key: v[key] for key in ("balanced_accuracy", "auroc", "n", "n_atypical",
                                                       "sensitivity", "specificity") if key in v}
            per_fold[str(k)]["best_epoch"] = src.metrics[str(k)].get("best_epoch")
    out: dict = {"what": "fold validation metrics from metrics.json (threshold 0.5, best epoch chosen by "
                         "validation balanced accuracy); no test metric is used anywhere in export",
                 "folds": per_fold}
    if src.folds == [ALL]:
        out["note"] = "model trained on all training crops: these are its run's fold models' validation metrics"
    if per_fold:
        ba = [v["balanced_accuracy"] for v in per_fold.values()]
        au = [v["auroc"] for v in per_fold.values() if "auroc" in v]
        out["mean_balanced_accuracy"], out["std_balanced_accuracy"] = mean_std(ba)
        if au:
            out["mean_auroc"], out["std_auroc"] = mean_std(au)
    y, p, used = oof_predictions(src)
    if y.size:
        try:
            out["out_of_fold"] = {"folds": used, "n": int(y.size), "threshold": threshold,
                                  "balanced_accuracy": balanced_accuracy(y, p, threshold), "auroc": auroc(y, p)}
        except MetricError as e:
            out["out_of_fold"] = {"error": str(e)}
    return out


def source_record(src: RunSource) -> dict:
    """Provenance: run, its split and data fingerprints, weights digests, how it was trained."""
    c = src.config
    current = folds_sha256(FOLDS_FILE)
    rec = {
        "run": src.run_dir.name,
        "folds_file": src.split.get("folds_file"),
        "folds_sha256": src.split.get("folds_sha256"),
        "train_fingerprint": src.split.get("train_fingerprint"),
        "folds_match_installed_split": src.split.get("folds_sha256") == current,
        "weights_sha256": {str(f): file_sha256(src.weights(f)) for f in src.folds},
        "arch": c.get("arch"), "hub_id": c.get("hub_id"), "weights_source": c.get("weights_source"),
        "random_init": c.get("random_init"), "tiny_stand_in": c.get("tiny_stand_in", False),
        "max_train": c.get("max_train", 0), "max_eval": c.get("max_eval", 0), "recipe": c.get("recipe"), "created": c.get("created"),
        "trained_with": c.get("versions"),
    }
    return rec


# ---------------------------------------------------------------------------------------------
# --best


@dataclass
class RunScore:
    run_dir: Path
    model: str
    method: str
    folds: list[int]
    fold_ba: list[float]
    mean_ba: float | None
    reason: str = ""  # why it is not eligible ("" = eligible)


def score_run(run_dir: Path, min_folds: int = N_FOLDS) -> RunScore:
    """Mean validation balanced accuracy over a run's completed folds (metrics.json 'validation')."""
    run = RunDir(run_dir)
    try:
        cfg = run.config()
    except (OSError, RunDirError) as e:
        return RunScore(run_dir, "?", "?", [], [], None, f"unreadable {CONFIG} ({e})")
    folds, bas = [], []
    for k in run.completed_folds():
        try:
            v = run.fold(k).metrics().get("validation") or {}
        except (OSError, RunDirError):
            continue
        ba = v.get("balanced_accuracy")
        if isinstance(ba, (int, float)):
            folds.append(k)
            bas.append(float(ba))
    s = RunScore(run_dir, cfg.get("model", "?"), cfg.get("method", "?"), folds, bas,
                 float(np.mean(bas)) if bas else None)
    if len(folds) < min_folds:
        s.reason = f"{len(folds)} fold(s) with validation metrics, fewer than {min_folds}"
    return s


def find_runs(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise ExportError(f"--best {root}: not a directory")
    found = {p.parent for pat in (CONFIG, f"*/{CONFIG}", f"*/*/{CONFIG}") for p in root.glob(pat)}
    return sorted(found)


def pick_best(runs_root: Path, method: str | None = None, model: str | None = None,
              min_folds: int = N_FOLDS) -> tuple[Path, list[RunScore]]:
    """The run under ``runs_root`` with the highest mean *validation* balanced accuracy.

    Only ``metrics.json['validation']`` is read; ties go to the run whose path sorts first.
    Returns (best run, every score, best first) or raises ExportError when none is eligible.
    """
    scores = [score_run(r, min_folds) for r in find_runs(runs_root)]
    for s in scores:
        if not s.reason and method and s.method != method:
            s.reason = f"method {s.method} is not {method}"
        if not s.reason and model and s.model != model:
            s.reason = f"model {s.model} is not {model}"
    ok = sorted((s for s in scores if not s.reason), key=lambda s: (-s.mean_ba, str(s.run_dir)))
    rest = sorted((s for s in scores if s.reason), key=lambda s: str(s.run_dir))
    if not ok:
        why = "; ".join(f"{s.run_dir.name}: {s.reason}" for s in rest) or f"no run directory (*/{CONFIG}) found"
        raise ExportError(f"--best {runs_root}: no eligible run ({why})")
    return ok[0].run_dir, ok + rest
