"""The numpy metrics agree with scikit-learn, and refuse undefined cases loudly."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc

from ami.runtime import metrics as M


@pytest.mark.parametrize("seed", range(8))
def test_against_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    # ties on purpose: rounded scores
    p = np.round(rng.random(n) * (0.3 + 0.7 * y), int(rng.integers(1, 4)))
    for thr in (0.5, 0.3, float(p[2])):
        assert M.balanced_accuracy(y, p, thr) == pytest.approx(balanced_accuracy_score(y, p >= thr), abs=1e-12)
        tn, fp, fn, tp = confusion_matrix(y, p >= thr, labels=[0, 1]).ravel()
        assert M.confusion(y, p, thr) == {"tp": tp, "fn": fn, "tn": tn, "fp": fp}
    assert M.auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    fpr, tpr, _ = M.roc_curve(y, p)
    sfpr, stpr, _ = sk_roc(y, p, drop_intermediate=False)
    assert np.allclose(fpr, sfpr) and np.allclose(tpr, stpr)


def test_edge_cases():
    # perfect, inverted and constant scores
    y = np.array([0, 0, 1, 1])
    assert M.auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert M.auroc(y, [0.5] * 4) == 0.5
    assert M.balanced_accuracy(y, [0.5] * 4) == 0.5  # all predicted atypical at >= 0.5
    m = M.evaluate(y, [0.1, 0.6, 0.8, 0.4])
    assert (m.tp, m.fn, m.tn, m.fp) == (1, 1, 1, 1) and m.sensitivity == 0.5 and m.specificity == 0.5


@pytest.mark.parametrize("y", [[0, 0, 0], [1, 1]])
def test_one_class_is_an_error_not_nan(y):
    with pytest.raises(M.MetricError, match="only one class"):
        M.auroc(y, np.linspace(0, 1, len(y)))
    with pytest.raises(M.MetricError, match="only one class"):
        M.balanced_accuracy(y, np.linspace(0, 1, len(y)))


def test_bad_inputs():
    with pytest.raises(M.MetricError, match="differ in length"):
        M.auroc([0, 1], [0.1])
    with pytest.raises(M.MetricError, match="NaN"):
        M.auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(M.MetricError, match="labels must be"):
        M.auroc([0, 2], [0.1, 0.2])
    with pytest.raises(M.MetricError, match="no samples"):
        M.auroc([], [])


def test_mean_std_and_bootstrap():
    assert M.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert M.mean_std([1.0, 2.0, 3.0], ddof=0)[1] == pytest.approx(np.std([1, 2, 3]))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    lo, hi = M.bootstrap_ci(y, p, "auroc", n_boot=200)
    assert lo < M.auroc(y, p) < hi and hi - lo < 0.2


def test_best_threshold_maximises_validation_ba():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.9])
    t, ba = M.best_threshold(y, p)
    assert ba == 1.0 and 0.3 < t <= 0.35
    assert M.balanced_accuracy(y, p, t) == ba


def test_stratified_bootstrap_of_perfectly_separated_scores_is_one():
    y = np.r_[np.ones(20, int), np.zeros(50, int)]
    p = np.r_[np.linspace(0.6, 0.99, 20), np.linspace(0.01, 0.4, 50)]
    ci = M.stratified_bootstrap(y, p, 0.5, n_boot=300)
    assert ci == {k: (1.0, 1.0) for k in ("balanced_accuracy", "auroc", "sensitivity", "specificity", "ppv", "npv")}


def test_stratified_bootstrap_width_matches_the_binomial_normal_approximation():
    """Large classes: the 95 % interval of a proportion is about 2 * 1.96 * sqrt(s (1 - s) / n), and
    balanced accuracy's is half the root of the two variances' sum (the classes are resampled apart)."""
    rng = np.random.default_rng(1)
    n_pos, n_neg = 3000, 5000
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    p = rng.random(n_pos + n_neg)
    r = M.rates(y, p, 0.3)  # sensitivity about 0.7, specificity about 0.3
    ci = M.stratified_bootstrap(y, p, 0.3, n_boot=2000, seed=3)
    var_s = r["sensitivity"] * (1 - r["sensitivity"]) / n_pos
    var_c = r["specificity"] * (1 - r["specificity"]) / n_neg
    for key, var in (("sensitivity", var_s), ("specificity", var_c), ("balanced_accuracy", (var_s + var_c) / 4)):
        width = ci[key][1] - ci[key][0]
        assert width == pytest.approx(2 * 1.959964 * np.sqrt(var), rel=0.1), key
        assert ci[key][0] < r[key] < ci[key][1]


def test_stratified_bootstrap_is_seeded_and_keeps_class_counts():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30, int), np.zeros(90, int)]
    p = np.clip(0.3 * y + rng.random(120) * 0.7, 0, 1)
    a = M.stratified_bootstrap(y, p, n_boot=200, seed=5)
    assert a == M.stratified_bootstrap(y, p, n_boot=200, seed=5) != M.stratified_bootstrap(y, p, n_boot=200, seed=6)
    assert M.bootstrap_ci(y, p, "auroc", n_boot=200)[0] < M.auroc(y, p)


def test_rates_operating_points_and_reliability():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.05])
    r = M.rates(y, p, 0.5)
    assert r["ppv"] == pytest.approx(2 / 3) and r["npv"] == pytest.approx(3 / 4)
    assert r["sensitivity"] == pytest.approx(2 / 3) and r["specificity"] == pytest.approx(3 / 4)
    assert np.isnan(M.rates(y, p, 0.95)["ppv"])  # nothing called atypical: PPV undefined, not 0
    (o,) = M.operating_points(y, p, [0.25])
    assert (o["tp"], o["fp"], o["sensitivity"], o["specificity"]) == (2, 2, pytest.approx(2 / 3), 0.5)
    bins = M.reliability(y, p, 10)
    assert sum(b["n"] for b in bins) == y.size
    top = next(b for b in bins if b["lo"] == pytest.approx(0.9))
    assert top["n"] == 1 and top["fraction_atypical"] == 1.0 and top["mean_probability"] == pytest.approx(0.9)
    assert M.expected_calibration_error(bins) == pytest.approx(
        sum(b["n"] * abs(b["fraction_atypical"] - b["mean_probability"]) for b in bins) / y.size)
