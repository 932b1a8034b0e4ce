"""The model-card arithmetic: fold ensemble from per-crop predictions, nested threshold check."""

import numpy as np
import pytest

from ami.bench.card import _ensemble_tests, nested_threshold_check
from ami.runtime.metrics import auroc


def _folds(rng, shift):
    folds = {}
    for k in range(5):
        y = rng.integers(0, 2, 120)
        y[:2] = [0, 1]
        p = np.clip(0.5 * y + rng.random(120) * 0.6 + shift, 0, 1)
        test_y = np.r_[np.zeros(30, int), np.ones(10, int)]
        test_p = np.clip(0.4 * test_y + rng.random(40) * 0.7, 0, 1)
        folds[str(k)] = {"predictions": {
            "validation": [[f"v{k}_{i}", int(a), float(b)] for i, (a, b) in enumerate(zip(y, p))],
            "AMi-Br-test": [[f"t{i}", int(a), float(b)] for i, (a, b) in enumerate(zip(test_y, test_p))]}}
    return folds


def test_ensemble_is_mean_of_fold_probabilities():
    folds = _folds(np.random.default_rng(0), 0.0)
    ens = _ensemble_tests(folds)["AMi-Br-test"]
    mean_p = np.mean([[r[2] for r in f["predictions"]["AMi-Br-test"]] for f in folds.values()], axis=0)
    y = [r[1] for r in folds["0"]["predictions"]["AMi-Br-test"]]
    assert ens["auroc"] == pytest.approx(auroc(y, mean_p)) and ens["n"] == 40


def test_ensemble_skips_sets_not_scored_by_every_fold():
    folds = _folds(np.random.default_rng(1), 0.0)
    del folds["3"]["predictions"]["AMi-Br-test"][0]
    assert "AMi-Br-test" not in _ensemble_tests(folds)


def test_nested_threshold_detects_a_miscalibrated_model():
    # scores shifted up by 0.3: 0.5 is a poor cut, a tuned threshold must win out of sample
    shifted = nested_threshold_check(_folds(np.random.default_rng(2), 0.3))
    assert shifted["tuned_beats_0.5"] and shifted["mean_ba_tuned"] > shifted["mean_ba_0.5"] + 0.05
    for v in shifted["per_fold"].values():
        assert v["threshold"] > 0.5


def test_reproduce_commands_come_from_the_run_config(tmp_path, monkeypatch):
    from pathlib import Path

    from ami.bench.card import reproduce_commands

    monkeypatch.chdir(tmp_path)
    cmds = reproduce_commands(tmp_path / "runs" / "edge-v2", {"model": "edge", "amp": "bf16"})
    assert cmds[0].startswith("ami-train --model edge --threads 1 -o runs/edge-v2 --amp bf16 --folds 0,2,4 &")
    assert "--folds 1,3,full" in cmds[0] and not any(str(tmp_path) in c for c in cmds)
    assert "ami-export runs/edge-v2 --folds full" in cmds[1]
    fp32 = reproduce_commands(Path("runs/x"), {"model": "edge_200mf", "amp": "none"})
    assert "--amp" not in fp32[0] and "--model edge_200mf" in fp32[0]


def test_reproduce_commands_carry_recipe_overrides():
    """A run trained with --epochs / --set must be reproduced with them, not with the entry's recipe."""
    from pathlib import Path

    from ami.bench.card import recipe_overrides, reproduce_commands
    from ami.train.registry import get

    entry = get("edge").to_dict()
    recipe = dict(entry["recipe"])
    same = {"model": "edge", "amp": "bf16", "recipe": recipe, "registry_entry": entry}
    assert recipe_overrides(same) == []
    changed = {**same, "recipe": {**recipe, "epochs": recipe["epochs"] + 40, "lr": 0.001}, "max_train": 64}
    flags = recipe_overrides(changed)
    assert f"--epochs {recipe['epochs'] + 40}" in flags and "--set lr=0.001" in flags and "--max-train 64" in flags
    cmd = reproduce_commands(Path("runs/x"), changed)[0]
    assert cmd.count(f"--epochs {recipe['epochs'] + 40}") == 2 and cmd.count("--set lr=0.001") == 2


def _toy_run(root, name, val_ba, last_ba, epochs=3):
    import json

    d = root / name
    for k, (sel, last) in enumerate(zip(val_ba, last_ba)):
        (d / f"fold{k}").mkdir(parents=True)
        (d / f"fold{k}" / "metrics.json").write_text(json.dumps(
            {"train_seconds": 120.0, "validation": {"balanced_accuracy": sel, "auroc": sel + 0.1}}))
        rows = ["epoch,val_auroc,val_ba"] + [f"{e},{last + 0.1 - 0.01 * (epochs - 1 - e)},{last - 0.01 * (epochs - 1 - e)}"
                                              for e in range(epochs)]
        (d / f"fold{k}" / "history.csv").write_text("\n".join(rows) + "\n")
    (d / "config.json").write_text(json.dumps({"model": "edge", "arch": "regnetx_004", "amp": "bf16",
                                               "recipe": {"epochs": epochs}, "registry_entry": {"display": name}}))
    return d


def test_recipe_comparison_reads_validation_only(tmp_path):
    from ami.bench.card import recipe_comparison

    a = _toy_run(tmp_path, "a", [0.70, 0.80], [0.68, 0.78])
    b = _toy_run(tmp_path, "b", [0.75, 0.75, 0.75], [0.74, 0.74, 0.74])
    ra, rb = recipe_comparison([a, b])
    assert ra["selected_balanced_accuracy"][0] == pytest.approx(0.75)
    assert ra["selected_balanced_accuracy"][1] == pytest.approx(np.std([0.70, 0.80], ddof=1))
    assert ra["final_balanced_accuracy"][0] == pytest.approx(0.73) and ra["final_auroc"][0] == pytest.approx(0.83)
    assert rb["folds"] == ["0", "1", "2"] and rb["selected_auroc"][0] == pytest.approx(0.85)
    assert ra["train_minutes_per_fold"] == pytest.approx(2.0) and ra["display"] == "a"
    with pytest.raises(ValueError, match="no finished fold"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "config.json").write_text('{"model": "edge", "arch": "x", "recipe": {"epochs": 1}}')
        recipe_comparison([tmp_path / "c"])


def test_card_text_never_carries_the_data_root(tmp_path):
    import json

    from ami.bench.card import scrub

    root = tmp_path / "data"
    msg = {"absent": f"expected {root}/AtNorM-Br/*.png under data root {root}"}
    out = scrub(json.dumps(msg), root)
    assert str(root) not in out and json.loads(out)["absent"] == "expected <data-root>/AtNorM-Br/*.png under data root <data-root>"


def test_reproduce_commands_name_todays_entry_of_an_old_run():
    """A run trained under an entry that was renamed since (v1 was 'edge', now 'edge_200mf') is
    reproduced with today's name for the same definition; an entry that matches nothing is flagged."""
    from dataclasses import asdict
    from pathlib import Path

    from ami.bench.card import reproduce_commands
    from ami.train.registry import current_name, get

    v1 = {**get("edge_200mf").to_dict(), "name": "edge", "display": "ami-edge (RegNetX-200MF, 128 px)"}
    conf = {"model": "edge", "amp": "none", "recipe": dict(v1["recipe"]), "registry_entry": v1}
    assert current_name(conf) == "edge_200mf"
    assert reproduce_commands(Path("runs/v1"), conf)[0].startswith("ami-train --model edge_200mf ")
    today = {"model": "edge", "registry_entry": get("edge").to_dict()}
    assert current_name(today) == "edge"
    # a different default recipe is not a different entry: the recipe travels as flags
    longer = {**today, "registry_entry": {**get("edge").to_dict(), "recipe": {**v1["recipe"], "epochs": 7}},
              "recipe": {**asdict(get("edge").recipe), "epochs": 7}, "amp": "bf16"}
    assert current_name(longer) == "edge" and "--model edge " in reproduce_commands(Path("r"), longer)[0]
    assert reproduce_commands(Path("r"), longer)[0].count("--epochs 7 ") == 2
    gone = {**v1, "arch": "regnetx_999"}
    cmds = reproduce_commands(Path("runs/v0"), {**conf, "registry_entry": gone})
    assert current_name({**conf, "registry_entry": gone}) is None and cmds[0].startswith("# registry entry 'edge' has changed")
