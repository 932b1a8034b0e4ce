"""The generated data the tests run on without the real data (tests/synthetic_data.py): it must be
what the code reads from the real release (layout, file names, CSV columns, PNG crops of the real
size), clean (verify finds nothing but the counts), deterministic, and for the pinned shape exactly
the pinned folds' training crops."""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from ami.runtime import datasets as ds
from ami.runtime import splits
from synthetic_data import CROP_SIZE, PINNED, SMALL, SPLIT_COLUMNS, make_dataset


def _counts(root, name) -> dict[str, int]:
    return {cls: len(list((root / name / cls).glob("*.png"))) for cls in ("Atypical", "Normal")}


def test_small_tree_has_the_real_layout_and_only_count_findings(synthetic_root):
    root = synthetic_root
    assert sorted(p.name for p in root.iterdir()) == ["AMi-Br", "AtNorM-MD", ds.TRAIN_SPLIT_CSV]
    n_at = SMALL.amibr_train[0] + SMALL.amibr_test[0]
    n_no = SMALL.amibr_train[1] + SMALL.amibr_test[1]
    assert _counts(root, "AMi-Br") == {"Atypical": n_at, "Normal": n_no}
    assert _counts(root, "AtNorM-MD") == {"Atypical": SMALL.atnorm_md[0], "Normal": SMALL.atnorm_md[1]}
    for p in root.rglob("*.png"):
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (CROP_SIZE, CROP_SIZE)), p
    for name in ("AMi-Br", "AtNorM-MD"):
        rep = ds.verify_dataset(root, name)  # decodes every crop, looks for duplicates and strays
        spec = ds.DATASETS[name]
        want = [f"Atypical: found {rep.counts['Atypical']} crops, expected {spec.n_atypical}",
                f"Normal: found {rep.counts['Normal']} crops, expected {spec.n_normal}"]
        if name == "AMi-Br":
            want.append(f"train/test split is {SMALL.count('AMi-Br-train')}/{SMALL.count('AMi-Br-test')}, "
                        f"expected {ds.AMIBR_TRAIN_SIZE}/{ds.AMIBR_TEST_SIZE}")
        assert rep.present and rep.problems == want, rep.problems
        assert rep.fingerprint != ds.PINNED_FINGERPRINTS[name]  # never mistaken for the release


def test_small_tree_split_csv_is_the_releases_format(synthetic_root):
    with (synthetic_root / ds.TRAIN_SPLIT_CSV).open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == SPLIT_COLUMNS
    assert len(rows) == SMALL.count("AMi-Br-train")
    train, test = ds.amibr_split(synthetic_root)
    assert [s.name for s in train] == [r["dataset_uid"] for r in rows]
    assert [s.label for s in train] == [ds.CLASS_DIRS[r["final_label"]] for r in rows]
    assert len({s.slide for s in train}) == SMALL.train_slides and all(s.slide.endswith(".tiff") for s in train)
    assert sum(s.label for s in test) == SMALL.amibr_test[0] and len(test) == SMALL.count("AMi-Br-test")


def test_same_seed_same_bytes_other_seed_other_crops(synthetic_root, tmp_path):
    again = make_dataset(tmp_path / "again", SMALL)
    for name in ("AMi-Br", "AtNorM-MD"):
        assert ds.fingerprint(ds.scan(again, name)) == ds.fingerprint(ds.scan(synthetic_root, name))
    assert (again / ds.TRAIN_SPLIT_CSV).read_bytes() == (synthetic_root / ds.TRAIN_SPLIT_CSV).read_bytes()
    other = make_dataset(tmp_path / "other", SMALL, seed=1)
    assert ds.fingerprint(ds.scan(other, "AtNorM-MD")) != ds.fingerprint(ds.scan(synthetic_root, "AtNorM-MD"))


def test_the_classes_differ_in_the_pixels(synthetic_root):
    """Atypical crops carry a fragmented figure, Normal ones a single plate: the darkest pixels lie
    farther from the centre in Atypical crops, so a model can learn something from them."""
    yy, xx = np.mgrid[0:CROP_SIZE, 0:CROP_SIZE]
    r = np.hypot(yy - CROP_SIZE / 2, xx - CROP_SIZE / 2).ravel()

    def spread(p):
        darkest = np.argsort(np.asarray(Image.open(p).convert("L")).ravel(), kind="stable")[:40]
        return float(r[darkest].mean())

    s = {cls: [spread(p) for p in sorted((synthetic_root / "AtNorM-MD" / cls).glob("*.png"))]
         for cls in ("Atypical", "Normal")}
    assert np.median(s["Atypical"]) > 2 * np.median(s["Normal"]), {k: np.median(v) for k, v in s.items()}


def test_pinned_tree_holds_exactly_the_pinned_folds_crops(synthetic_folds_root):
    root = synthetic_folds_root
    rows = splits.load_folds()
    train, test = ds.amibr_split(root)
    splits.check_against_data(rows, train)  # names, labels and slides, as ami-train checks them
    assert [s.name for s in train] == [r.image for r in rows]
    assert len(test) == PINNED.count("AMi-Br-test") and not {s.name for s in test} & {r.image for r in rows}
    assert len(ds.scan(root, "AtNorM-MD")) == PINNED.count("AtNorM-MD") > 64  # parity samples 64 per set
    assert not (root / "AtNorM-Br").exists()
