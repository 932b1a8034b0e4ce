"""The pinned 5-fold split: grouped by slide, stratified, checksummed, reproducible.

The file itself is checked without data; re-deriving it and splitting crops by it runs on the
generated tree that holds the pinned folds' crops (conftest's folds_root: always) and on the real
data (skips without it); only the real data can show that the file matches the release's crops."""

import os
import re
import shutil
from collections import Counter, defaultdict

import pytest

from ami.runtime import splits
from ami.runtime.datasets import amibr_split


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


def test_folds_are_grouped_and_stratified():
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


def test_folds_match_the_real_training_crops(data_root):
    """Names, labels and slides of the pinned file are the release's training crops."""
    rows = splits.load_folds()
    train, _ = amibr_split(data_root)
    splits.check_against_data(rows, train)
    assert [s.name for s in train] == [r.image for r in rows]  # the file keeps amibr_train_split.csv's order


def test_stored_file_equals_fresh_computation(folds_root):
    pytest.importorskip("sklearn")
    assert splits.compute_folds(folds_root) == splits.load_folds()


def test_fold_samples_partition(folds_root):
    tr, va = splits.fold_samples(folds_root, 2)
    assert len(tr) + len(va) == 2894 and not {s.name for s in tr} & {s.name for s in va}
    assert not {s.slide for s in tr} & {s.slide for s in va}
    assert {s.name for s in va} == {r.image for r in splits.load_folds() if r.fold == 2}
    with pytest.raises(splits.SplitError, match=r"fold must be in 0\.\.4, got 5"):
        splits.fold_samples(folds_root, 5)


def test_data_that_disagrees_with_the_folds_is_refused(synthetic_root, synthetic_folds_root, tmp_path):
    """A tree whose training crops are not the pinned ones (another split, a crop relabelled) is refused."""
    with pytest.raises(splits.SplitError,
                       match=r"folds file and data disagree: \d+ training crops not in the folds, \d+ fold rows "):
        splits.fold_samples(synthetic_root, 0)  # its own small split
    root = tmp_path / "relabelled"
    shutil.copytree(synthetic_folds_root, root, copy_function=os.link)  # links: fast, and renames stay in the copy
    first = splits.load_folds()[0]
    src = root / "AMi-Br" / ("Atypical" if first.label else "Normal") / first.image
    src.rename(root / "AMi-Br" / ("Normal" if first.label else "Atypical") / first.image)
    with pytest.raises(splits.SplitError, match=re.escape(f"{first.image}: amibr_train_split.csv says ")):
        splits.fold_samples(root, 0)
