"""The pinned 5-fold split: grouped by slide, stratified, checksummed, reproducible."""

from collections import Counter, defaultdict

import pytest

from ami.runtime import splits


def test_pinned_checksum_matches_file():
    assert splits.folds_sha256() == splits.pinned_sha256()
    rows = splits.load_folds()
    assert len(rows) == 2894


def test_tampered_file_is_refused(tmp_path):
    p = tmp_path / "folds.csv"
    p.write_bytes(splits.FOLDS_FILE.read_bytes().replace(b",0\n", b",1\n", 1))
    (tmp_path / "folds.csv.sha256").write_text(splits.pinned_sha256())
    with pytest.raises(splits.SplitError, match="was modified"):
        splits.load_folds(p)


def test_folds_are_grouped_and_stratified(data_root):
    rows = splits.load_folds()
    folds_of_slide = defaultdict(set)
    for r in rows:
        folds_of_slide[r.slide].add(r.fold)
    assert all(len(f) == 1 for f in folds_of_slide.values()), "a slide is in two folds"
    assert len(folds_of_slide) == 146
    assert len({r.image for r in rows}) == len(rows) == 2894  # every crop in exactly one fold
    c = Counter((r.fold, r.label) for r in rows)
    rates = [c[(k, 1)] / (c[(k, 0)] + c[(k, 1)]) for k in range(5)]
    print("per-fold atypical rate:", [f"{x:.3f}" for x in rates])
    assert all(abs(x - 0.22) < 0.04 for x in rates), rates
    train, _ = __import__("ami.runtime.datasets", fromlist=["amibr_split"]).amibr_split(data_root)
    splits.check_against_data(rows, train)


def test_stored_file_equals_fresh_computation(data_root):
    pytest.importorskip("sklearn")
    assert splits.compute_folds(data_root) == splits.load_folds()


def test_fold_samples_partition(data_root):
    tr, va = splits.fold_samples(data_root, 2)
    assert len(tr) + len(va) == 2894 and not {s.name for s in tr} & {s.name for s in va}
    assert not {s.slide for s in tr} & {s.slide for s in va}
    with pytest.raises(splits.SplitError):
        splits.fold_samples(data_root, 5)
