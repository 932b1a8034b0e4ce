"""Classification metrics of the benchmark, in numpy (no scikit-learn needed on an edge box).

Atypical is the positive class (label 1). Balanced accuracy is computed at a threshold on the
atypical probability (0.5 by default, as in the paper); AUROC is threshold-free. Both are
undefined when the labels hold one class only, and say so with an error instead of a NaN.
Tests check every function against scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .errors import BadInput


class MetricError(BadInput, ValueError):
    """A metric is undefined for these inputs (for example only one class is present)."""


def _check(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise MetricError(f"labels ({y.shape[0]}) and scores ({p.shape[0]}) differ in length")
    if y.size == 0:
        raise MetricError("no samples")
    if not np.isin(y, (0, 1)).all():
        raise MetricError("labels must be 0 (Normal) or 1 (Atypical)")
    if not np.isfinite(p).all():
        raise MetricError("scores contain NaN or infinity")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise MetricError(f"only one class present ({'Atypical' if n_pos else 'Normal'}): "
                          "balanced accuracy and AUROC need both classes")
    return y, p


def confusion(y_true, y_score, threshold: float = 0.5) -> dict[str, int]:
    y, p = _check(y_true, y_score)
    pred = p >= threshold
    return {
        "tp": int(np.sum(pred & (y == 1))),
        "fn": int(np.sum(~pred & (y == 1))),
        "tn": int(np.sum(~pred & (y == 0))),
        "fp": int(np.sum(pred & (y == 0))),
    }


def balanced_accuracy(y_true, y_score, threshold: float = 0.5) -> float:
    c = confusion(y_true, y_score, threshold)
    return 0.5 * (c["tp"] / (c["tp"] + c["fn"]) + c["tn"] / (c["tn"] + c["fp"]))


def auroc(y_true, y_score) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    y, p = _check(y_true, y_score)
    order = np.argsort(p, kind="mergesort")
    sp = p[order]
    ranks = np.empty(p.size, dtype=np.float64)
    # average ranks over tied groups
    _, first, counts = np.unique(sp, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    n_pos = y.sum()
    n_neg = y.size - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending, starting at (0, 0)."""
    y, p = _check(y_true, y_score)
    order = np.argsort(-p, kind="mergesort")
    sp, sy = p[order], y[order]
    distinct = np.r_[np.where(np.diff(sp))[0], sp.size - 1]
    tps = np.cumsum(sy)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / sy.sum()]
    fpr = np.r_[0.0, fps / (sy.size - sy.sum())]
    thr = np.r_[np.inf, sp[distinct]]
    return fpr, tpr, thr


@dataclass
class BinaryMetrics:
    n: int
    n_atypical: int
    threshold: float
    balanced_accuracy: float
    auroc: float
    sensitivity: float
    specificity: float
    tp: int
    fn: int
    tn: int
    fp: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(y_true, y_score, threshold: float = 0.5) -> BinaryMetrics:
    c = confusion(y_true, y_score, threshold)
    sens = c["tp"] / (c["tp"] + c["fn"])
    spec = c["tn"] / (c["tn"] + c["fp"])
    y = np.asarray(y_true)
    return BinaryMetrics(n=int(y.size), n_atypical=int(y.sum()), threshold=float(threshold),
                         balanced_accuracy=0.5 * (sens + spec), auroc=auroc(y_true, y_score),
                         sensitivity=sens, specificity=spec, **c)


def best_threshold(y_true, y_score) -> tuple[float, float]:
    """The threshold maximising balanced accuracy (ties: the one closest to 0.5), and that BA.

    Only ever called on validation predictions.
    """
    y, p = _check(y_true, y_score)
    cands = np.unique(np.r_[p, 0.5])
    best = (-1.0, 0.0)
    for t in cands:
        ba = balanced_accuracy(y, p, t)
        if ba > best[0] + 1e-12 or (abs(ba - best[0]) <= 1e-12 and abs(t - 0.5) < abs(best[1] - 0.5)):
            best = (ba, float(t))
    return best[1], best[0]


def mean_std(values, ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation over folds (sample std, ddof=1, by default)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=ddof)) if v.size > ddof else 0.0


def rates(y_true, y_score, threshold: float = 0.5) -> dict[str, float]:
    """The metrics at a threshold plus AUROC: balanced accuracy, AUROC, sensitivity, specificity,
    PPV (precision) and NPV. PPV / NPV are NaN when nothing is predicted atypical / normal."""
    c = confusion(y_true, y_score, threshold)
    sens = c["tp"] / (c["tp"] + c["fn"])
    spec = c["tn"] / (c["tn"] + c["fp"])
    return {"balanced_accuracy": 0.5 * (sens + spec), "auroc": auroc(y_true, y_score), "sensitivity": sens,
            "specificity": spec, "ppv": c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else math.nan,
            "npv": c["tn"] / (c["tn"] + c["fn"]) if c["tn"] + c["fn"] else math.nan}


BOOTSTRAP_METHOD = "percentile bootstrap, resampling atypical and normal crops separately (stratified by class)"


def stratified_bootstrap(y_true, y_score, threshold: float = 0.5, n_boot: int = 2000, alpha: float = 0.05,
                         seed: int = 0) -> dict[str, tuple[float, float]]:
    """95 % (``1 - alpha``) confidence intervals of every :func:`rates` metric: ``n_boot`` resamples
    drawn with replacement within each class (class counts fixed, generator seeded with ``seed``),
    the metric computed on each, and the ``alpha/2`` and ``1 - alpha/2`` quantiles of those values
    (resamples where a metric is undefined, e.g. PPV with no atypical call, are left out of its
    quantiles; a metric undefined on every resample gets (NaN, NaN))."""
    y, p = _check(y_true, y_score)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    called = p >= threshold
    ip = rng.integers(0, pos.size, (n_boot, pos.size))  # drawn up front: one generator call per class
    ineg = rng.integers(0, neg.size, (n_boot, neg.size))
    tp = called[pos][ip].sum(axis=1).astype(np.float64)
    fp = called[neg][ineg].sum(axis=1).astype(np.float64)
    fn, tn = pos.size - tp, neg.size - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        vals = {"balanced_accuracy": 0.5 * (tp / pos.size + tn / neg.size),
                "auroc": np.array([auroc(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[p[pos][a], p[neg][b]])
                                   for a, b in zip(ip, ineg)]),
                "sensitivity": tp / pos.size, "specificity": tn / neg.size,
                "ppv": tp / (tp + fp), "npv": tn / (tn + fn)}
    out = {}
    for k, a in vals.items():
        a = a[np.isfinite(a)]
        out[k] = (float(np.quantile(a, alpha / 2)), float(np.quantile(a, 1 - alpha / 2))) if a.size else (math.nan, math.nan)
    return out


def bootstrap_ci(y_true, y_score, metric: str = "balanced_accuracy", n_boot: int = 1000,
                 alpha: float = 0.05, threshold: float = 0.5, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap (stratified by class) confidence interval of one metric
    (balanced_accuracy or auroc)."""
    y, p = _check(y_true, y_score)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    fn = {"balanced_accuracy": lambda a, b: balanced_accuracy(a, b, threshold), "auroc": auroc}[metric]
    vals = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        vals[i] = fn(y[idx], p[idx])
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def operating_points(y_true, y_score, thresholds) -> list[dict]:
    """Sensitivity and specificity (and the confusion counts) at each threshold."""
    y, p = _check(y_true, y_score)
    out = []
    for t in thresholds:
        c = confusion(y, p, float(t))
        out.append({"threshold": float(t), "sensitivity": c["tp"] / (c["tp"] + c["fn"]),
                    "specificity": c["tn"] / (c["tn"] + c["fp"]), **c})
    return out


def reliability(y_true, y_score, bins: int = 10) -> list[dict]:
    """Calibration in ``bins`` equal-width probability bins: per non-empty bin its range, crop count,
    mean predicted probability and observed fraction of atypical crops."""
    y, p = _check(y_true, y_score)
    edges = np.round(np.linspace(0.0, 1.0, bins + 1), 12)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        if m.any():
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
                        "mean_probability": float(p[m].mean()), "fraction_atypical": float(y[m].mean())})
    return out


def expected_calibration_error(bins: list[dict]) -> float:
    """Crop-weighted mean |observed - predicted| over the :func:`reliability` bins."""
    n = sum(b["n"] for b in bins)
    return float(sum(b["n"] * abs(b["fraction_atypical"] - b["mean_probability"]) for b in bins) / n)


def cross_validated_threshold(folds: list[tuple]) -> dict:
    """Does tuning the threshold beat 0.5 on data it was not tuned on?

    ``folds``: one (labels, probabilities) pair of out-of-fold validation predictions per fold.
    For each fold k the BA-maximising threshold is chosen on the other folds' predictions and
    applied to fold k; the mean BA over folds is compared with 0.5's. A threshold tuned and judged
    on the same predictions always "beats" 0.5, so only this nested comparison may justify one.
    """
    if len(folds) < 2:
        raise MetricError("a cross-validated threshold needs at least two folds")
    per = []
    for k, (y, p) in enumerate(folds):
        oy = np.concatenate([np.asarray(f[0]) for j, f in enumerate(folds) if j != k])
        op = np.concatenate([np.asarray(f[1]) for j, f in enumerate(folds) if j != k])
        t, _ = best_threshold(oy, op)
        per.append({"threshold": t, "ba_tuned": balanced_accuracy(y, p, t), "ba_0.5": balanced_accuracy(y, p, 0.5)})
    tuned = float(np.mean([v["ba_tuned"] for v in per]))
    half = float(np.mean([v["ba_0.5"] for v in per]))
    return {"per_fold": per, "mean_ba_tuned": tuned, "mean_ba_0.5": half, "tuned_beats_0.5": tuned > half}
