"""The report of ``ami-bench evaluate``: metric blocks, Markdown, JSON, per-crop CSV, and the ROC and
reliability diagrams as SVG drawn here with numpy alone (no matplotlib, no torch: an edge box can
validate). :mod:`ami.bench.evaluate` builds the report dict; this module only computes each block's
metrics (through :mod:`ami.runtime.metrics`) and renders."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from ami.runtime.metrics import (
    MetricError,
    confusion,
    expected_calibration_error,
    operating_points,
    rates,
    reliability,
    roc_curve,
    stratified_bootstrap,
)

METRIC_NAMES = (("balanced_accuracy", "balanced accuracy"), ("auroc", "AUROC"), ("sensitivity", "sensitivity (atypical)"),
                ("specificity", "specificity (normal)"), ("ppv", "PPV (atypical calls that are atypical)"),
                ("npv", "NPV (normal calls that are normal)"))
OPERATING_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FILES = ("report.md", "report.json", "predictions.csv", "roc.svg", "reliability.svg")


def metrics_block(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int, seed: int, curves: bool = True) -> dict:
    """Counts, point metrics at ``threshold``, their stratified bootstrap intervals, the confusion
    matrix, and (``curves``) the operating points, ROC and reliability bins. A set with one class only
    gets ``undefined`` instead of metrics."""
    out: dict = {"n": len(y), "atypical": int(np.sum(y)), "normal": int(len(y) - np.sum(y))}
    try:
        out["point"] = rates(y, p, threshold)
    except MetricError as e:
        out["undefined"] = str(e)
        return out
    out["ci"] = stratified_bootstrap(y, p, threshold, n_boot=n_boot, seed=seed)
    out["confusion"] = confusion(y, p, threshold)
    if curves:
        ts = sorted(set(OPERATING_THRESHOLDS) | {float(threshold)})
        out["operating_points"] = operating_points(y, p, ts)
        fpr, tpr, thr = roc_curve(y, p)
        out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": [None if math.isinf(t) else float(t)
                                                                             for t in thr]}
        out["reliability"] = reliability(y, p, 10)
        out["expected_calibration_error"] = expected_calibration_error(out["reliability"])
    return out


def _ci(b: dict, k: str) -> str:
    v, (lo, hi) = b["point"][k], b["ci"][k]
    if isinstance(v, float) and math.isnan(v):
        return "n/a (no such call)"
    return f"{v:.4f} [{lo:.4f}, {hi:.4f}]"


def _md_block(title: str, b: dict, threshold: float) -> list[str]:
    L = [f"### {title}", "", f"{b['n']} crops: {b['atypical']} atypical, {b['normal']} normal.", ""]
    if "undefined" in b:
        return L + [f"No metric: {b['undefined']}.", ""]
    L += [f"| metric (threshold {threshold:g}) | value [95 % CI] |", "|---|---|"]
    L += [f"| {name} | {_ci(b, k)} |" for k, name in METRIC_NAMES]
    c = b["confusion"]
    L += ["", "Confusion matrix (rows: truth, columns: call):", "", "| | called atypical | called normal |",
          "|---|---|---|", f"| atypical | {c['tp']} | {c['fn']} |", f"| normal | {c['fp']} | {c['tn']} |", ""]
    if "operating_points" in b:
        L += ["Operating points (the same scores at other thresholds):", "",
              "| threshold | sensitivity | specificity | atypical calls |", "|---|---|---|---|"]
        for o in b["operating_points"]:
            mark = " (model's)" if abs(o["threshold"] - threshold) < 1e-12 else ""
            L.append(f"| {o['threshold']:g}{mark} | {o['sensitivity']:.4f} | {o['specificity']:.4f} | "
                     f"{o['tp'] + o['fp']} |")
        L += ["", f"Expected calibration error (10 bins): {b['expected_calibration_error']:.4f}.", ""]
    return L


def _md_check(rep: dict) -> list[str]:
    d = rep["data_check"]
    L = ["## Data check (before any score)", "",
         f"- Files: {d['n_files']}; unreadable: {len(d['unreadable'])}" + (" (left out: " + "; ".join(
             f"{k}: {v}" for k, v in list(d["unreadable"].items())[:10]) + ")" if d["unreadable"] else "") + ".",
         f"- Crop sizes: {', '.join(f'{k} px ({n})' for k, n in d['sizes'].items())}; the model was trained on "
         f"{d['training_crop']['size_px']} px crops at {d['training_crop']['mpp']} um/px.",
         f"- Byte-identical crops: {len(d['duplicate_groups'])} groups "
         f"({sum(len(g['crops']) - 1 for g in d['duplicate_groups'])} extra copies), of which "
         f"{sum(g['conflicting'] for g in d['duplicate_groups'])} carry conflicting labels."]
    for w in d["warnings"]:
        L.append(f"- **Warning:** {w}.")
    for g in d["duplicate_groups"]:
        if g["conflicting"]:
            L.append(f"- Conflicting labels, same bytes: {', '.join(g['crops'])}.")
    if not d["duplicate_groups"]:
        L.append("- No duplicates: the metrics below are also those of the de-duplicated set.")
    else:
        L.append(f"- De-duplicated set: one copy of each agreeing group kept, every copy of a conflicting group "
                 f"dropped ({len(d['dropped_copies'])} copies and {len(d['dropped_conflicts'])} conflicting crops "
                 f"left out); its metrics follow the all-crops ones.")
    return L + [""]


def _md_reference(rep: dict) -> list[str]:
    ref = rep.get("reference") or {}
    if not ref:
        return ["## The model's own numbers", "", "No model card names this artefact (looked for *-card.json beside it).", ""]
    mine = rep["all"].get("point", {})
    L = ["## The model's own numbers beside yours", "", f"From `{ref['source']}`.", "",
         "| set | n | BA | AUROC |", "|---|---|---|---|"]
    if ref.get("validation_folds"):
        v = ref["validation_folds"]
        L.append(f"| AMi-Br validation folds (mean) | - | {v['balanced_accuracy']:.4f} | {v['auroc']:.4f} |")
    for name, t in ref.get("tests", {}).items():
        cells = (f"{t['balanced_accuracy']:.4f} | {t['auroc']:.4f}" if "auroc" in t else
                 "absent | absent")
        L.append(f"| {name} | {t.get('n', '-')} | {cells} |")
    if mine:
        L.append(f"| **{rep['crops']['name']} (yours, all crops)** | {rep['all']['n']} | "
                 f"{mine['balanced_accuracy']:.4f} | {mine['auroc']:.4f} |")
    if rep.get("same_data_as_reference"):
        L += ["", f"Your set is the benchmark's {rep['same_data_as_reference']}: its row above was recorded on the "
                  "same crops."]
    return L + [""]


def render_markdown(rep: dict) -> str:
    """The human-readable report."""
    m, c, bs = rep["model"], rep["crops"], rep["bootstrap"]
    L = [f"# Evaluation of {m['name']} on {c['name']}", "",
         f"- Model: {m['description']}; decision threshold {m['threshold']:g} (the model's own).",
         f"- Crops: {c['name']} ({c['kind']}): {c['n']} scored, {c['atypical']} atypical, {c['normal']} normal.",
         f"- Intervals: 95 % {bs['method']}; {bs['resamples']} resamples, seed {bs['seed']}.", ""]
    L += _md_check(rep)
    L += ["## Metrics", ""]
    L += _md_block("All crops", rep["all"], m["threshold"])
    if "deduplicated" in rep:
        L += _md_block("De-duplicated (byte-identical copies once, conflicting labels dropped)", rep["deduplicated"],
                       m["threshold"])
    if rep.get("groups"):
        L += ["## Per group", "", "| group | n (atypical) | BA [95 % CI] | AUROC [95 % CI] | sensitivity | specificity |",
              "|---|---|---|---|---|---|"]
        for g, b in rep["groups"].items():
            if "undefined" in b:
                L.append(f"| {g} | {b['n']} ({b['atypical']}) | n/a: {b['undefined']} | | | |")
            else:
                L.append(f"| {g} | {b['n']} ({b['atypical']}) | {_ci(b, 'balanced_accuracy')} | {_ci(b, 'auroc')} | "
                         f"{_ci(b, 'sensitivity')} | {_ci(b, 'specificity')} |")
        L.append("")
    L += _md_reference(rep)
    L += ["Figures: `roc.svg` (ROC curve, the model's threshold marked), `reliability.svg` (predicted probability "
          "against the observed fraction of atypical crops, per 0.1 bin). Every crop's score: `predictions.csv`."]
    return "\n".join(L) + "\n"


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def render_csv(rep: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["crop", "path", "label", "group", "probability", "call", "kept_in_deduplicated"])
    t = rep["model"]["threshold"]
    for r in rep["predictions"]:
        w.writerow([r["crop"], r["path"], r["label"], r["group"] or "", f"{r['probability']:.6f}",
                    int(r["probability"] >= t), int(r["kept_in_deduplicated"])])
    return buf.getvalue()


# -- SVG, by hand ---------------------------------------------------------------------------------

W, PAD = 420, 50


def _xy(x: float, y: float) -> tuple[float, float]:
    s = W - 2 * PAD
    return PAD + x * s, W - PAD - y * s


def _svg(title: str, xlabel: str, ylabel: str, body: list[str]) -> str:
    x0, y0 = _xy(0, 0)
    x1, y1 = _xy(1, 1)
    ticks = []
    for t in np.linspace(0, 1, 6):
        tx, _ = _xy(t, 0)
        _, ty = _xy(0, t)
        ticks += [f'<line x1="{tx:.1f}" y1="{y0}" x2="{tx:.1f}" y2="{y0 + 4}" stroke="#000"/>',
                  f'<text x="{tx:.1f}" y="{y0 + 16}" font-size="10" text-anchor="middle">{t:.1f}</text>',
                  f'<line x1="{x0 - 4}" y1="{ty:.1f}" x2="{x0}" y2="{ty:.1f}" stroke="#000"/>',
                  f'<text x="{x0 - 7}" y="{ty + 3:.1f}" font-size="10" text-anchor="end">{t:.1f}</text>']
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{W}" viewBox="0 0 {W} {W}" font-family="sans-serif">',
        f'<rect width="{W}" height="{W}" fill="#fff"/>',
        f'<text x="{W / 2}" y="22" font-size="13" text-anchor="middle">{_esc(title)}</text>',
        f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#000"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#999" stroke-dasharray="4 3"/>',
        *ticks, *body,
        f'<text x="{W / 2}" y="{W - 12}" font-size="11" text-anchor="middle">{_esc(xlabel)}</text>',
        f'<text x="14" y="{W / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 14 {W / 2})">'
        f'{_esc(ylabel)}</text>', "</svg>", ""])


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _path(xs, ys) -> str:
    return " ".join(f"{'M' if i == 0 else 'L'}{a:.1f},{b:.1f}" for i, (a, b) in enumerate(_xy(x, y) for x, y in zip(xs, ys)))


def roc_svg(rep: dict) -> str:
    """ROC of all crops (and of the de-duplicated set when there is one), the threshold's point marked."""
    body, legend = [], []
    for key, color, label in (("all", "#1f77b4", "all crops"), ("deduplicated", "#d62728", "de-duplicated")):
        b = rep.get(key)
        if not b or "roc" not in b:
            continue
        body.append(f'<path d="{_path(b["roc"]["fpr"], b["roc"]["tpr"])}" fill="none" stroke="{color}" stroke-width="2"/>')
        px, py = _xy(1 - b["point"]["specificity"], b["point"]["sensitivity"])
        body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{color}"/>')
        legend.append((color, f"{label}: AUROC {b['point']['auroc']:.3f} (n={b['n']})"))
    for i, (color, text) in enumerate(legend):
        x, y = _xy(0.35, 0.12 + 0.07 * (len(legend) - 1 - i))
        body.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="10" fill="{color}">{_esc(text)}</text>')
    title = f"ROC: {rep['model']['name']} on {rep['crops']['name']} (dot: threshold {rep['model']['threshold']:g})"
    return _svg(title, "1 - specificity (normal called atypical)", "sensitivity (atypical found)", body)


def reliability_svg(rep: dict) -> str:
    """Observed fraction of atypical crops against the mean predicted probability per bin (dot area ~ crops)."""
    b = rep["all"]
    body = []
    bins = b.get("reliability", [])
    if bins:
        n = max(x["n"] for x in bins)
        body.append(f'<path d="{_path([x["mean_probability"] for x in bins], [x["fraction_atypical"] for x in bins])}" '
                    'fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
        for x in bins:
            cx, cy = _xy(x["mean_probability"], x["fraction_atypical"])
            body.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{2 + 6 * math.sqrt(x["n"] / n):.1f}" fill="#1f77b4" '
                        f'fill-opacity="0.6"><title>{x["lo"]:.1f}-{x["hi"]:.1f}: n={x["n"]}</title></circle>')
        tx, ty = _xy(0.05, 0.92)
        body.append(f'<text x="{tx:.1f}" y="{ty:.1f}" font-size="10">expected calibration error '
                    f'{b["expected_calibration_error"]:.3f} (n={b["n"]})</text>')
    return _svg(f"Reliability: {rep['model']['name']} on {rep['crops']['name']}", "predicted probability (atypical)",
                "observed fraction atypical", body)


def write_report(rep: dict, out: Path) -> list[Path]:
    """Write :data:`FILES` into ``out`` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {"report.md": render_markdown(rep), "report.json": json.dumps(_json_safe(rep), indent=1) + "\n",
             "predictions.csv": render_csv(rep), "roc.svg": roc_svg(rep), "reliability.svg": reliability_svg(rep)}
    paths = []
    for name in FILES:
        (out / name).write_text(texts[name])
        paths.append(out / name)
    return paths
