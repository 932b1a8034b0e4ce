"""ami-bench table: figures come from the runs' fold metrics.json (mean ± sample std), the paper's
figures only from the cited dict, absent datasets stay absent, and fold jobs merge."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ami.bench.table import PAPER_TABLE3, TableError, collect, register, render_csv, render_long, render_markdown
from ami.runtime.metrics import evaluate

ABSENT = "dataset AtNorM-Br is not present (test)"


def _fold_metrics(rng, k, model, method, with_br=False):
    tests, preds = {}, {}
    for ds in ("AMi-Br-test", "AtNorM-Br", "AtNorM-MD"):
        if ds == "AtNorM-Br" and not with_br:
            tests[ds] = {"absent": ABSENT}
            continue
        y = np.r_[np.ones(10, int), np.zeros(30, int)]
        p = np.clip(0.5 * y + rng.uniform(0, 0.6, y.size), 0, 1)
        tests[ds] = evaluate(y, p).to_dict()
        preds[ds] = [[f"c{i}", int(a), float(b)] for i, (a, b) in enumerate(zip(y, p))]
    yv = np.r_[np.ones(5, int), np.zeros(15, int)]
    return {"fold": k, "model": model, "method": method, "validation": evaluate(yv, rng.uniform(0, 1, 20)).to_dict(),
            "tests": tests, "predictions": preds}


def _make_run(root: Path, name: str, model: str, method: str, folds, seed=0, **conf_extra) -> Path:
    rng = np.random.default_rng(seed)
    d = root / name
    d.mkdir(parents=True)
    conf = {"model": model, "method": method, "weights_source": "x", "random_init": False, "tiny_stand_in": False,
            "recipe": {"epochs": 100}, "max_train": 0, "max_eval": 0, "registry_entry": {"pretrained": True},
            **conf_extra}
    (d / "config.json").write_text(json.dumps(conf))
    for k in folds:
        (d / f"fold{k}").mkdir()
        (d / f"fold{k}" / "metrics.json").write_text(json.dumps(_fold_metrics(rng, k, model, method)))
    return d


def _folds(run: Path):
    return [json.loads((run / f"fold{k}" / "metrics.json").read_text()) for k in range(5)
            if (run / f"fold{k}" / "metrics.json").exists()]


def test_mean_std_from_fold_files_and_absent_sets(tmp_path):
    run = _make_run(tmp_path, "virchow2-lora", "virchow2", "lora", range(5))
    configs = collect([run])
    md = render_markdown(configs, ddof=1)
    row = next(ln for ln in md.splitlines() if ln.startswith("| Virchow2 (LoRA) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ba = [m["tests"]["AMi-Br-test"]["balanced_accuracy"] for m in _folds(run)]
    au = [m["tests"]["AtNorM-MD"]["auroc"] for m in _folds(run)]
    assert cells[1] == "0,1,2,3,4"
    assert cells[2] == f"{np.mean(ba):.4f} ± {np.std(ba, ddof=1):.4f}"
    assert cells[7] == f"{np.mean(au):.4f} ± {np.std(au, ddof=1):.4f}"
    assert cells[4] == cells[5] == "absent"
    assert "0.8135" not in md  # no paper figure unless asked for


@pytest.mark.parametrize("ddof", [None, 0, 1])
def test_std_is_numpys_default_unless_asked_and_the_footer_says_which(tmp_path, ddof):
    """The paper's notebooks computed the ± of Table 3 with np.std (ddof 0); so do we by default."""
    run = _make_run(tmp_path, "uni-lora", "uni", "lora", range(5))
    configs = collect([run])
    md = render_markdown(configs) if ddof is None else render_markdown(configs, ddof=ddof)
    want = 0 if ddof is None else ddof
    ba = [m["tests"]["AMi-Br-test"]["balanced_accuracy"] for m in _folds(run)]
    assert np.std(ba, ddof=0) != pytest.approx(np.std(ba, ddof=1))
    row = next(ln for ln in md.splitlines() if ln.startswith("| UNI (LoRA) |"))
    assert row.split("|")[3].strip() == f"{np.mean(ba):.4f} ± {np.std(ba, ddof=want):.4f}"
    assert ("ddof=0 (numpy's default np.std" in md) == (want == 0) and ("sample std (ddof=1)" in md) == (want == 1)
    wide = list(csv.DictReader(io.StringIO(render_csv(configs) if ddof is None else render_csv(configs, ddof=ddof))))
    assert float(wide[0]["AMi-Br-test:balanced_accuracy:std"]) == pytest.approx(np.std(ba, ddof=want), abs=1e-6)
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["table", str(run)] + ([] if ddof is None else ["--ddof", str(ddof)]))
    assert res.exit_code == 0 and row in res.output


def test_paper_column_is_the_cited_figure_beside_ours(tmp_path):
    run = _make_run(tmp_path, "vit", "vit_large_patch16_224", "full", range(3))
    other = _make_run(tmp_path, "edge", "edge", "full", range(2), seed=1)
    md = render_markdown(collect([other, run]), paper=True)
    lines = md.splitlines()
    assert lines[0].split("|")[3:5] == [" AMi-Br BA ", " paper "]
    vit = next(ln for ln in lines if ln.startswith("| ViT-L (e2e) |"))
    cells = [c.strip() for c in vit.strip("|").split("|")]
    assert cells[3] == "0.7552 ± 0.0191" and cells[5] == "0.8634 ± 0.0104" and cells[13] == "0.8396 ± 0.0213"
    assert lines.index(vit) < next(i for i, ln in enumerate(lines) if ln.startswith("| ami-edge"))  # table order
    edge = next(ln for ln in lines if ln.startswith("| ami-edge"))
    assert edge.count("| - |") == 6  # no paper figure for a configuration the paper does not have
    assert "paper: Banerjee et al." in md
    assert len(PAPER_TABLE3) == 17


def test_folds_from_separate_jobs_merge_and_duplicates_are_refused(tmp_path):
    a = _make_run(tmp_path, "uni-lin-a", "uni", "linear", [0, 1, 2])
    b = _make_run(tmp_path, "uni-lin-b", "uni", "linear", [3, 4], seed=5)
    (configs,) = collect([tmp_path])  # a folder of run directories works too
    assert sorted(configs.folds) == [0, 1, 2, 3, 4] and configs.runs == [a, b]
    _make_run(tmp_path, "uni-lin-c", "uni", "linear", [4], seed=6)
    with pytest.raises(TableError, match="fold 4 of UNI \\(linear\\) is in two run directories"):
        collect([tmp_path])


def test_flags_keep_smoke_runs_apart(tmp_path):
    _make_run(tmp_path, "real", "uni", "lora", [0])
    _make_run(tmp_path, "smoke", "uni", "lora", [0], random_init=True, tiny_stand_in=True, max_train=64, max_eval=32)
    names = [ln.split("|")[1].strip() for ln in render_markdown(collect([tmp_path])).splitlines()[2:4]]
    assert names == ["UNI (LoRA)", "UNI (LoRA) [random init, tiny stand-in, subset 64/32]"]


def test_csv_wide_and_long(tmp_path):
    run = _make_run(tmp_path, "uni-lora", "uni", "lora", range(2))
    configs = collect([run])
    wide = list(csv.DictReader(io.StringIO(render_csv(configs, paper=True))))
    assert len(wide) == 1 and wide[0]["AtNorM-Br:auroc:mean"] == "absent"
    ba = [m["tests"]["AMi-Br-test"]["balanced_accuracy"] for m in _folds(run)]
    assert float(wide[0]["AMi-Br-test:balanced_accuracy:mean"]) == pytest.approx(np.mean(ba), abs=1e-6)
    assert float(wide[0]["AMi-Br-test:balanced_accuracy:paper_mean"]) == 0.7952
    long = list(csv.DictReader(io.StringIO(render_long(configs, paper=True))))
    ours = [r for r in long if r["source"] == "ours"]
    assert len(ours) == 2 * 4 * 2  # folds x (validation + 3 test sets) x metrics
    assert {r["value"] for r in ours if r["dataset"] == "AtNorM-Br"} == {"absent"}
    assert len([r for r in long if r["source"] == "paper"]) == 3 * 2 * 2


def test_cli_writes_table_and_roc(tmp_path):
    pytest.importorskip("matplotlib", reason="--roc draws with matplotlib (the train extra)")
    run = _make_run(tmp_path / "runs", "virchow-lin", "virchow", "linear", range(3))
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["table", str(run), "-f", "csv", "-o", str(tmp_path / "t.csv"),
                                   "--roc", str(tmp_path / "roc")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t.csv").read_text().startswith("model,method,label,flags,folds,")
    assert (tmp_path / "roc" / "roc_AMi-Br-test.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "roc" / "roc_AtNorM-Br.png").exists() and "ROC AtNorM-Br: absent" in res.output
    res = CliRunner().invoke(app, ["table", str(tmp_path / "nothing-here")])
    assert res.exit_code == 2 and "no run directories" in res.output


def test_runs_of_an_entry_that_changed_keep_their_own_name(tmp_path):
    """A run made under an older version of a registry entry is its own row, named as recorded."""
    v1 = {"display": "ami-edge v1 (RegNetX-200MF)", "family": "edge", "pretrained": False}
    v2 = {"display": "ami-edge (RegNetX-400MF)", "family": "edge", "pretrained": False}
    _make_run(tmp_path, "edge-v1", "edge", "full", [0, 1], arch="regnetx_002", registry_entry=v1)
    _make_run(tmp_path, "edge-v2", "edge", "full", [0, 1], seed=3, arch="regnetx_004", registry_entry=v2)
    configs = collect([tmp_path])
    assert sorted(c.label for c in configs) == sorted([v1["display"], v2["display"]])
    assert all(sorted(c.folds) == [0, 1] for c in configs)


def test_same_entry_with_another_recipe_is_its_own_row_and_says_how(tmp_path):
    """60 and 100 epochs of one entry: two rows, labelled by the recipe key that differs; a run
    recorded before a recipe key existed still merges with identical newer runs."""
    from dataclasses import asdict

    from ami.train.registry import Recipe

    entry = {"display": "ami-edge (RegNetX-400MF)", "family": "edge", "pretrained": False}
    full = asdict(Recipe(epochs=60))
    old = {k: v for k, v in full.items() if k != "mixup_alpha"}  # written before mixup_alpha existed
    _make_run(tmp_path, "e60", "edge", "full", [0, 1], arch="regnetx_004", registry_entry=entry, recipe=old)
    _make_run(tmp_path, "e60-more", "edge", "full", [2], seed=5, arch="regnetx_004", registry_entry=entry, recipe=full)
    _make_run(tmp_path, "e100", "edge", "full", [0, 1], seed=3, arch="regnetx_004", registry_entry=entry,
              recipe={**full, "epochs": 100})
    configs = {c.label: c for c in collect([tmp_path])}
    assert sorted(configs) == ["ami-edge (RegNetX-400MF) · epochs 100", "ami-edge (RegNetX-400MF) · epochs 60"]
    assert sorted(configs["ami-edge (RegNetX-400MF) · epochs 60"].folds) == [0, 1, 2]


def test_atnorm_br_dedup_view_is_the_recorded_predictions_without_the_release_duplicates(tmp_path):
    """The "AtNorM-Br (dedup, 709)" columns: the same fold predictions less the release's extra copies
    and both sides of its conflicting groups; the AtNorM-Br columns stay all crops."""
    from ami.bench.table import dedup_views, view_title
    from ami.runtime.datasets import known_dedup_drops
    from ami.runtime.metrics import auroc, balanced_accuracy

    copies, conflicts = known_dedup_drops("AtNorM-Br")
    assert (len(copies), len(conflicts)) == (30, 7) and "Atypical/390.png" in conflicts
    assert view_title("AtNorM-Br (dedup)") == "AtNorM-Br (dedup, 709)" and list(dedup_views()) == ["AtNorM-Br (dedup)"]
    run = _make_run(tmp_path, "uni-lora", "uni", "lora", range(2))
    rng = np.random.default_rng(7)
    dropped = sorted(copies | conflicts)
    want = []
    for k in range(2):
        path = run / f"fold{k}" / "metrics.json"
        m = json.loads(path.read_text())
        rows = [[key.split("/")[1], int(key.startswith("Atypical")), float(rng.random())] for key in dropped]
        rows += [[f"{900 + i}.png", i % 3 == 0, float(rng.random())] for i in range(60)]
        rows = [[n, int(y), p] for n, y, p in rows]
        y, p = [r[1] for r in rows], [r[2] for r in rows]
        m["tests"]["AtNorM-Br"] = evaluate(y, p).to_dict()
        m["predictions"]["AtNorM-Br"] = rows
        path.write_text(json.dumps(m))
        kept = rows[len(dropped):]  # the 60 crops the release does not duplicate
        want.append((balanced_accuracy([r[1] for r in kept], [r[2] for r in kept]), auroc([r[1] for r in kept],
                                                                                          [r[2] for r in kept])))
    (cfg,) = collect([run])
    ba, why = cfg.values("AtNorM-Br (dedup)", "balanced_accuracy")
    assert why is None and ba == [pytest.approx(w[0], abs=1e-12) for w in want]
    assert cfg.values("AtNorM-Br (dedup)", "auroc")[0] == [pytest.approx(w[1], abs=1e-12) for w in want]
    assert cfg.values("AtNorM-Br", "balanced_accuracy")[0] != ba
    md = render_markdown([cfg])
    assert "| AtNorM-Br (dedup, 709) BA | AtNorM-Br (dedup, 709) AUROC |" in md.splitlines()[0]
    row = next(ln for ln in md.splitlines() if ln.startswith("| UNI (LoRA) |"))
    assert row.rstrip(" |").endswith(f"{np.mean([w[1] for w in want]):.4f} ± {np.std([w[1] for w in want]):.4f}")
    assert "the AtNorM-Br columns are all 746 crops, as the paper reports them" in md
    long = list(csv.DictReader(io.StringIO(render_long([cfg]))))
    assert len([r for r in long if r["dataset"] == "AtNorM-Br (dedup)"]) == 2 * 2


def test_absent_sets_say_why(tmp_path):
    """A run trained before AtNorM-Br was on disk: absent, and why (no kept checkpoints / how to score)."""
    run = _make_run(tmp_path, "uni-lora", "uni", "lora", range(2))
    md = render_markdown(collect([run]))
    assert ("AtNorM-Br absent for UNI (LoRA): the set was not on disk when these runs were trained and their fold "
            "checkpoints are not kept") in md
    (run / "fold0" / "best.safetensors").write_bytes(b"x")
    md = render_markdown(collect([run]))
    assert f"`ami-bench evaluate {run} AtNorM-Br --record` scores each fold" in md
