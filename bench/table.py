"""ami-bench table: the paper's Table 3 rendered from run directories, never from typed numbers.

Every figure in "ours" comes from ``RUN/fold{k}/metrics.json``: mean ± standard deviation over the
folds found, per test set and metric. The standard deviation is numpy's default (``np.std``,
ddof=0, the population formula), which is what the paper's inference notebooks computed, so our
spread is comparable with the published one; ``--ddof 1`` gives the sample standard deviation. The paper's published figures are an
optional extra column (``--paper``), taken from :data:`ami.train.registry.PAPER_TABLE3` and labelled "paper"
wherever they appear. Runs of one configuration spread over several directories (one fold per
machine) are merged; a fold found twice is an error. Datasets absent from disk stay "absent".

Torch-free: this reads JSON and draws with matplotlib (optional, only for ``--roc``).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import typer

from ami.runtime import DIST_NAME
from ami.runtime.cli.contract import guard
from ami.runtime.datasets import DATASETS, TEST_SETS, known_dedup_drops
from ami.runtime.errors import BadInput
from ami.runtime.metrics import MetricError, auroc, balanced_accuracy, mean_std, roc_curve
from ami.runtime.rundir import ALL, CONFIG, WEIGHTS, RunDir, RunDirError
from ami.train.registry import PAPER_CITATION, PAPER_TABLE3  # (model, method) -> test set -> metric -> (mean, std)

METRICS = (("balanced_accuracy", "BA"), ("auroc", "AUROC"))
SHORT = {"AMi-Br-test": "AMi-Br"}
DEDUP = " (dedup)"  # suffix of a de-duplicated view: "AtNorM-Br (dedup)"


def dedup_views() -> dict[str, tuple[str, frozenset[str]]]:
    """De-duplicated views of the test sets whose release holds duplicates (AtNorM-Br): view name ->
    (test set, the ``Class/name`` keys left out). Computed from each fold's per-crop predictions, so
    no run is needed again; they come after the test sets, which keep the paper's numbers (all crops)."""
    out = {}
    for ds in TEST_SETS:
        copies, conflicts = known_dedup_drops(ds)
        if copies or conflicts:
            out[ds + DEDUP] = (ds, copies | conflicts)
    return out


def view_title(view: str) -> str:
    """How a column names a set: "AtNorM-Br (dedup, 709)" for a de-duplicated view."""
    base, drops = dedup_views().get(view, (view, frozenset()))
    if base == view:
        return SHORT.get(view, view)
    return f"{SHORT.get(base, base)} (dedup, {DATASETS[base].n_total - len(drops)})"


def table_sets() -> tuple[str, ...]:
    """Every column set of the table: the test sets (all crops, as the paper), then the de-duplicated views."""
    return TEST_SETS + tuple(dedup_views())


def subset_metrics(rows: list, drops: frozenset[str], threshold: float = 0.5) -> dict:
    """BA and AUROC of recorded per-crop predictions ([name, label, p]) without the ``drops`` keys."""
    kept = [r for r in rows if f"{'Atypical' if r[1] else 'Normal'}/{r[0]}" not in drops]
    y, p = [r[1] for r in kept], [r[2] for r in kept]
    try:
        return {"balanced_accuracy": balanced_accuracy(y, p, threshold), "auroc": auroc(y, p), "n": len(kept)}
    except MetricError as e:
        return {"error": str(e)}


class TableError(BadInput, ValueError):
    """The run directories cannot be combined into a table."""


@dataclass
class Config:
    """One configuration: every fold found for it, possibly from several run directories."""

    model: str
    method: str
    label: str
    flags: list[str]
    runs: list[Path] = field(default_factory=list)
    folds: dict[int, dict] = field(default_factory=dict)  # fold -> metrics.json
    setup: dict = field(default_factory=dict)  # recipe keys and amp, to tell same-label configurations apart

    def values(self, dataset: str, metric: str) -> tuple[list[float], str | None]:
        """Per-fold values, or (empty, 'absent'|'n/a') when there are none to average. ``dataset``:
        a test set or a de-duplicated view of one (:func:`dedup_views`)."""
        vals, absent = [], 0
        for m in self.folds.values():
            t = fold_test(m, dataset)
            if t is None or "absent" in t:
                absent += 1
            elif metric in t and t[metric] is not None:
                vals.append(float(t[metric]))
        if vals:
            return vals, None
        return [], "absent" if absent == len(self.folds) and self.folds else "n/a"


    def without_checkpoints(self) -> bool:
        """No fold of this configuration kept its checkpoint (results/ keeps metrics only)."""
        return not any((Path(m["_dir"]) / WEIGHTS).is_file() for m in self.folds.values())


def fold_test(m: dict, dataset: str) -> dict | None:
    """One fold's record of a test set or of a de-duplicated view of it (subset of its predictions)."""
    view = dedup_views().get(dataset)
    if view is None:
        return m.get("tests", {}).get(dataset)
    base, drops = view
    t = m.get("tests", {}).get(base)
    rows = m.get("predictions", {}).get(base)
    if t is None or "absent" in t or not rows:
        return t
    return subset_metrics(rows, drops, float(t.get("threshold", 0.5)))


def _label(model: str, method: str, entry: dict | None = None) -> str:
    try:
        from ami.train.registry import label

        return label(model, method, entry)
    except (ImportError, KeyError):
        return f"{model} ({method})"


def _upgraded(conf: dict) -> dict:
    try:  # recipe keys added after a run was made count at their default (registry: import-light)
        from ami.train.registry import with_recipe_defaults
    except ImportError:
        return conf
    return with_recipe_defaults(conf)


def _group_key(conf: dict) -> tuple:
    keep = ("model", "method", "arch", "weights_source", "random_init", "tiny_stand_in", "recipe", "max_train", "max_eval",
            "preprocess", "amp")
    return tuple(json.dumps(conf.get(k), sort_keys=True) for k in keep)


def _run_dirs(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        if RunDir(p).is_run():
            out.append(p)
        elif p.is_dir():
            out += sorted(q for q in p.iterdir() if RunDir(q).is_run())
    return out


def collect(paths: list[Path], warn=lambda s: print(s, file=sys.stderr)) -> list[Config]:
    """Configurations found under ``paths`` (run dirs, or folders of run dirs), in Table 3 order."""
    groups: dict[tuple, Config] = {}
    dirs = _run_dirs([Path(p) for p in paths])
    for p in paths:
        if Path(p) not in dirs and not any(d.parent == Path(p) for d in dirs):
            warn(f"skipping {p}: not a run directory (no {CONFIG})")
    for d in dirs:
        conf = _upgraded(RunDir(d).config(required=("model", "method")))
        key = _group_key(conf)
        if key not in groups:
            flags = []
            if conf.get("random_init") and conf.get("registry_entry", {}).get("pretrained", True):
                flags.append("random init")
            if conf.get("tiny_stand_in"):
                flags.append("tiny stand-in")
            if conf.get("max_train") or conf.get("max_eval"):
                flags.append(f"subset {conf.get('max_train') or 'all'}/{conf.get('max_eval') or 'all'}")
            groups[key] = Config(conf["model"], conf["method"],
                                 _label(conf["model"], conf["method"], conf.get("registry_entry")), flags,
                                 setup={**(conf.get("recipe") or {}), "amp": conf.get("amp", "none")})
        g = groups[key]
        g.runs.append(d)
        for fd in RunDir(d).cv_folds():
            if not fd.is_finished():
                continue
            m = fd.metrics(required=("fold",))
            if m["fold"] == ALL:
                raise RunDirError(f"{fd.metrics_path}: field 'fold' is {ALL!r} in a cross-validation fold's folder")
            k = int(m["fold"])
            if k in g.folds:
                raise TableError(f"fold {k} of {g.label} is in two run directories ({g.folds[k]['_dir']} and "
                                 f"{fd.path}); keep one")
            m["_dir"] = str(fd.path)
            g.folds[k] = m
    _tell_apart(list(groups.values()))
    try:
        from ami.train.registry import table3_configs

        order = {c: i for i, c in enumerate(table3_configs())}
    except ImportError:
        order = {}
    return sorted(groups.values(), key=lambda g: (order.get((g.model, g.method), len(order)), g.label, g.flags))


def _tell_apart(configs: list[Config]) -> None:
    """Configurations that would print under one label (the same entry trained with another recipe,
    e.g. 60 vs 100 epochs) get the recipe keys in which they differ appended to the label."""
    by_label: dict[tuple, list[Config]] = {}
    for c in configs:
        by_label.setdefault((c.label, tuple(c.flags)), []).append(c)
    for same in by_label.values():
        if len(same) < 2:
            continue
        keys = sorted({k for c in same for k in c.setup} - {k for k in same[0].setup
                                                             if all(c.setup.get(k) == same[0].setup[k] for c in same)})
        for c in same:
            c.label += " · " + ", ".join(f"{k} {c.setup.get(k)}" for k in keys)


DDOF = 0  # numpy's default np.std, as the paper's notebooks computed the ± of Table 3


def _std_note(ddof: int) -> str:
    return ("std with ddof=0 (numpy's default np.std, as the paper's notebooks computed it)" if ddof == 0 else
            "sample std (ddof=1)" if ddof == 1 else f"std with ddof={ddof}")


def _cell(vals: list[float], why: str | None, ddof: int = DDOF) -> str:
    if why:
        return why
    m, s = mean_std(vals, ddof=ddof)
    return f"{m:.4f} ± {s:.4f}" if len(vals) > 1 else f"{m:.4f} (1 fold)"


def _paper_cell(c: Config, ds: str, metric: str) -> str:
    p = PAPER_TABLE3.get((c.model, c.method))
    return f"{p[ds][metric][0]:.4f} ± {p[ds][metric][1]:.4f}" if p else "-"


def _name(c: Config) -> str:
    return c.label + (f" [{', '.join(c.flags)}]" if c.flags else "")


def render_markdown(configs: list[Config], paper: bool = False, ddof: int = DDOF) -> str:
    head = ["model", "folds"]
    for ds in table_sets():
        for _metric, short in METRICS:
            head.append(f"{view_title(ds)} {short}")
            if paper and ds in TEST_SETS:
                head.append("paper")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in configs:
        row = [_name(c), ",".join(str(k) for k in sorted(c.folds)) or "none"]
        for ds in table_sets():
            for metric, _ in METRICS:
                vals, why = c.values(ds, metric)
                part = f" ({len(vals)} of {len(c.folds)} folds)" if 1 < len(vals) < len(c.folds) else ""
                row.append(_cell(vals, why, ddof=ddof) + part)
                if paper and ds in TEST_SETS:
                    row.append(_paper_cell(c, ds, metric))
        lines.append("| " + " | ".join(row) + " |")
    notes = ["", f"Ours: mean ± {_std_note(ddof)} over the folds listed, read from each fold's metrics.json; "
             "BA at threshold 0.5. 'absent': the dataset is not on disk; 'n/a': no value (e.g. one class only)."]
    notes += _dedup_notes() + _absent_notes(configs)
    if paper:
        notes.append(f"paper: {PAPER_CITATION}.")
    flagged = [c for c in configs if c.flags]
    if flagged:
        notes.append("Bracketed flags mark runs that are NOT the benchmark configuration (random init, tiny "
                     "stand-in, crop subsets).")
    return "\n".join(lines + notes) + "\n"


def _dedup_notes() -> list[str]:
    return [f"{view_title(v)}: the same fold predictions without the release's duplicates ({len(d)} crops left out: "
            f"one copy of each byte-identical group kept, every copy of a group with conflicting labels dropped); "
            f"the {base} columns are all {DATASETS[base].n_total} crops, as the paper reports them."
            for v, (base, d) in dedup_views().items()]


def _absent_notes(configs: list[Config]) -> list[str]:
    """Why a test set is absent from a configuration that has other sets: it was not on disk when the
    run was trained, and either no checkpoint is kept to score it now, or one is (how to score it)."""
    out = []
    for ds in TEST_SETS:
        gone = [c for c in configs if c.values(ds, "auroc")[1] == "absent"
                and any(c.values(o, "auroc")[1] is None for o in TEST_SETS)]
        lost = [_name(c) for c in gone if c.without_checkpoints()]
        kept = [c for c in gone if not c.without_checkpoints()]
        if lost:
            out.append(f"{ds} absent for {', '.join(lost)}: the set was not on disk when these runs were trained and "
                       "their fold checkpoints are not kept (only metrics.json), so their fold models cannot be "
                       "scored on it.")
        for c in kept:
            out.append(f"{ds} absent for {_name(c)}: not on disk at training time; its checkpoints are kept: "
                       f"`ami-bench evaluate {c.runs[0]} {ds} --record` scores each fold.")
    return out


def render_csv(configs: list[Config], paper: bool = False, ddof: int = DDOF) -> str:
    """One row per configuration; the std columns use ``ddof`` (default 0, as the paper)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["model", "method", "label", "flags", "folds"]
    for ds in table_sets():
        for metric, _ in METRICS:
            head += [f"{ds}:{metric}:mean", f"{ds}:{metric}:std", f"{ds}:{metric}:n"]
            if paper and ds in TEST_SETS:
                head += [f"{ds}:{metric}:paper_mean", f"{ds}:{metric}:paper_std"]
    w.writerow(head)
    for c in configs:
        row = [c.model, c.method, c.label, ";".join(c.flags), " ".join(str(k) for k in sorted(c.folds))]
        for ds in table_sets():
            for metric, _ in METRICS:
                vals, why = c.values(ds, metric)
                if why:
                    row += [why, "", 0]
                else:
                    m, s = mean_std(vals, ddof=ddof)
                    row += [f"{m:.6f}", f"{s:.6f}" if len(vals) > 1 else "", len(vals)]
                if paper and ds in TEST_SETS:
                    p = PAPER_TABLE3.get((c.model, c.method))
                    row += [p[ds][metric][0], p[ds][metric][1]] if p else ["", ""]
        w.writerow(row)
    return buf.getvalue()


def render_long(configs: list[Config], paper: bool = False) -> str:
    """One row per (configuration, fold, dataset, metric); paper rows carry fold 'mean' / 'std'."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "model", "method", "label", "flags", "run", "fold", "dataset", "metric", "value"])
    for c in configs:
        for k in sorted(c.folds):
            m = c.folds[k]
            sets = [("validation", m.get("validation") or {})] + [(ds, m.get("tests", {}).get(ds) or {})
                                                                  for ds in TEST_SETS]
            sets += [(v, t) for v in dedup_views() if (t := fold_test(m, v)) and "auroc" in t]  # where scored
            for ds, t in sets:
                for metric, _ in METRICS:
                    if "absent" in t:
                        val = "absent"
                    elif t.get(metric) is None:
                        val = "n/a"
                    else:
                        val = t[metric]
                    w.writerow(["ours", c.model, c.method, c.label, ";".join(c.flags), str(Path(m["_dir"]).parent),
                                k, ds, metric, val])
        p = PAPER_TABLE3.get((c.model, c.method)) if paper else None
        if p:
            for ds in TEST_SETS:
                for metric, _ in METRICS:
                    for stat, v in zip(("mean", "std"), p[ds][metric]):
                        w.writerow(["paper", c.model, c.method, c.label, "", "", stat, ds, metric, v])
    return buf.getvalue()


def plot_roc(configs: list[Config], out_dir: Path, ddof: int = DDOF) -> dict[str, Path | str]:
    """One PNG per test set: each configuration's fold ROC curves (thin) and their vertical mean."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TableError(f"--roc needs matplotlib (pip install '{DIST_NAME}[train]' or pip install matplotlib)") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = np.linspace(0, 1, 201)
    made: dict[str, Path | str] = {}
    for ds in TEST_SETS:
        fig, ax = plt.subplots(figsize=(6, 6))
        drawn = 0
        for i, c in enumerate(configs):
            color = plt.cm.tab20(i % 20)
            tprs, aucs = [], []
            for k in sorted(c.folds):
                rows = c.folds[k].get("predictions", {}).get(ds)
                if not rows:
                    continue
                y = np.array([r[1] for r in rows])
                p = np.array([r[2] for r in rows])
                try:
                    fpr, tpr, _ = roc_curve(y, p)
                except MetricError:
                    continue
                ax.plot(fpr, tpr, color=color, alpha=0.25, lw=0.8)
                tprs.append(np.interp(grid, fpr, tpr))
                auc = c.folds[k].get("tests", {}).get(ds, {}).get("auroc")  # the recorded value, not a re-derivation
                if auc is not None:
                    aucs.append(float(auc))
            if tprs:
                m, s = mean_std(aucs, ddof=ddof)
                spread = f" ± {s:.3f}" if len(aucs) > 1 else ""
                ax.plot(grid, np.mean(tprs, axis=0), color=color, lw=2,
                        label=f"{_name(c)}: AUROC {m:.3f}{spread} ({len(tprs)} fold{'s' * (len(tprs) > 1)})")
                drawn += 1
        if drawn:
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.set(xlabel="false positive rate", ylabel="true positive rate (atypical)", xlim=(0, 1), ylim=(0, 1),
                   title=f"{ds}: ROC per fold (thin) and mean over folds")
            ax.legend(loc="lower right", fontsize=7)
            path = out_dir / f"roc_{ds}.png"
            fig.savefig(path, dpi=120, bbox_inches="tight")
            made[ds] = path
        else:
            made[ds] = "absent"
        plt.close(fig)
    return made


EPILOG = """\b
Examples:
  ami-bench table runs/*                        # Markdown, every run directory under runs/
  ami-bench table runs/* --paper                # with the paper's Table 3 figures beside ours
  ami-bench table runs/* --format csv -o table3.csv --long table3-long.csv
  ami-bench table runs/* --roc figures/         # + one ROC PNG per test set
  ami-bench table runs/* --ddof 1               # sample std instead of numpy's default (the paper's)

Folds of one configuration trained in separate directories (one per GPU or machine) are merged."""


def register(app: typer.Typer) -> None:
    @app.command("table", epilog=EPILOG)
    @guard("ami-bench")
    def table_cmd(
        runs: list[Path] = typer.Argument(..., help="Run directories (or folders holding run directories)."),
        fmt: str = typer.Option("md", "--format", "-f", help="md (Markdown) or csv (one row per configuration)."),
        paper: bool = typer.Option(False, "--paper", help="Add the paper's published figure beside each of ours."),
        roc: Path | None = typer.Option(None, "--roc", help="Write ROC curves per test set (PNG) into this folder."),
        output: Path | None = typer.Option(None, "--out", "-o", help="Write the table here instead of stdout."),
        long: Path | None = typer.Option(None, "--long", help="Also write every per-fold value as long-format CSV."),
        ddof: int = typer.Option(DDOF, "--ddof", min=0, help="Delta degrees of freedom of the ± over folds: 0 = numpy's "
                                 "default np.std, as the paper's notebooks computed Table 3 (default); 1 = the sample "
                                 "standard deviation."),
    ):
        """Render Table 3 (mean ± std over folds, per test set) from run directories."""
        if fmt not in ("md", "csv"):
            raise typer.BadParameter("--format must be md or csv")
        configs = collect(runs, warn=lambda s: typer.echo(s, err=True))  # TableError, RunDirError: exit 2
        if not configs:
            raise TableError(f"no run directories found (each holds a {CONFIG} written by ami-train)")
        text = render_markdown(configs, paper, ddof) if fmt == "md" else render_csv(configs, paper, ddof)
        if output:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text)
            typer.echo(f"wrote {output}", err=True)
        else:
            typer.echo(text, nl=False)
        if long:
            long.parent.mkdir(parents=True, exist_ok=True)
            long.write_text(render_long(configs, paper))
            typer.echo(f"wrote {long}", err=True)
        if roc:
            for ds, p in plot_roc(configs, roc, ddof).items():
                typer.echo(f"ROC {ds}: {p}", err=True)
