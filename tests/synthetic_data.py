"""Generated crops in the real data layout, so the tests that only need *some* crops run everywhere.

The layout is the public release's, as :mod:`ami.runtime.datasets` reads it::

    <root>/amibr_train_split.csv                         the release's columns (slide, dataset_uid, final_label, ...)
    <root>/AMi-Br/{Atypical,Normal}/MIDOG21_<uid>.png    training crops (listed in the CSV) + test crops (not listed)
    <root>/AtNorM-MD/{Atypical,Normal}/<n>.png
    <root>/AtNorM-Br/...                                 only when asked for: the CI copy holds it back

Every crop is a 128 x 128 RGB PNG like the real ones: uneven pink stroma, a few pale nuclei and a
dark figure in the centre, one compact plate for Normal, two to four scattered fragments for
Atypical (so a model can learn something from them), with a per-crop stain and grain. Nothing about them is real: accuracy on them means
nothing, and the real counts, fingerprints and pinned folds are tested on the real data only.

Two shapes (:data:`SMALL`, :data:`PINNED`): a few dozen crops with a training split of its own, and
one whose AMi-Br training part is exactly the crops of the pinned folds file
(``runtime/splits/amibr_folds_v1.csv``: same names, labels and slides, same order), so that
``ami-train`` (which checks the folds against the data before it starts), ``ami-export`` and
``ami-bench parity`` run on it. Only numpy and Pillow: the base install's test run uses it too.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ami.runtime.datasets import CLASS_DIRS, TRAIN_SPLIT_CSV
from ami.runtime.splits import FOLDS_FILE

CROP_SIZE = 128  # the real crops' size (every AMi-Br / AtNorM crop is 128 x 128 RGB)
# amibr_train_split.csv's columns as released (the code reads slide, dataset_uid and final_label)
SPLIT_COLUMNS = ("Unnamed: 0", "slide", "dataset", "uid", "final_label", "dataset_uid", "x", "y",
                 "expert1_label", "expert2_label", "expert1_atypical", "expert2_atypical", "expert3_atypical",
                 "majority_atypical")
LABEL_NAME = {label: name for name, label in CLASS_DIRS.items()}  # 1 -> "Atypical", 0 -> "Normal"


@dataclass(frozen=True)
class Spec:
    """What a generated tree holds: (atypical, normal) crops per part."""

    name: str
    amibr_train: tuple[int, int] | None  # None: the pinned folds' 2894 training crops
    amibr_test: tuple[int, int]
    atnorm_md: tuple[int, int]
    atnorm_br: tuple[int, int] | None = None  # None: absent, as in the CI copy of the data
    train_slides: int = 10  # slides the generated training split spreads over (not for the pinned one)

    def count(self, part: str) -> int:
        n = {"AMi-Br-test": self.amibr_test, "AtNorM-MD": self.atnorm_md, "AtNorM-Br": self.atnorm_br,
             "AMi-Br-train": self.amibr_train}[part]
        if n is None and part == "AMi-Br-train":
            return len(pinned_rows())
        return sum(n) if n else 0


# A few dozen crops: AtNorM-MD > 64 with >= 20 per class (parity samples 64, the decoder test 20 per class).
SMALL = Spec("small", amibr_train=(12, 28), amibr_test=(6, 18), atnorm_md=(24, 72))
# The pinned folds' training crops, plus test sets of more than 64 crops each (parity's sample).
PINNED = Spec("pinned", amibr_train=None, amibr_test=(18, 62), atnorm_md=(24, 72))


def pinned_rows() -> list[dict]:
    """The pinned folds file's rows (image, slide, label, fold), in its order."""
    with FOLDS_FILE.open(newline="") as f:
        return list(csv.DictReader(f))


_HALF = CROP_SIZE // 2  # drawn at half size, then upsampled (smooth, like a scanner's optics; 4x less work)
_GRID = np.mgrid[0:_HALF, 0:_HALF].astype(np.float32)  # (yy, xx), shared by every crop


def _blob(cy: float, cx: float, a: float, b: float, t: float) -> np.ndarray:
    """An elliptical blob (semi-axes a, b, angle t) at (cy, cx) on the half-size grid, values in (0, 1]."""
    yy, xx = _GRID
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = (yy - cy) * np.cos(t) - (xx - cx) * np.sin(t)
    return np.exp(-((u / a) ** 2 + (v / b) ** 2))


def crop_pixels(rng: np.random.Generator, atypical: bool) -> np.ndarray:
    """One H&E-like uint8 crop [128, 128, 3]: stroma, a few pale nuclei, and a dark mitotic figure in
    the centre (one plate for Normal, two to four fragments for Atypical)."""
    size = _HALF
    texture = np.asarray(Image.fromarray(rng.uniform(0.7, 1.1, (8, 8)).astype(np.float32))
                         .resize((size, size), Image.BILINEAR))[..., None]  # stroma, uneven
    nuclei = np.zeros((size, size), np.float32)
    for cy, cx in rng.uniform(0, size, (int(rng.integers(3, 9)), 2)):  # the cells around the figure
        r = rng.uniform(size / 20, size / 9)
        np.maximum(nuclei, 0.6 * _blob(cy, cx, r, r * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)), out=nuclei)
    figure = np.zeros((size, size), np.float32)
    c = size / 2
    parts = [(c, c, 1.0)] if not atypical else [(c + dy, c + dx, 0.6) for dy, dx in
                                                rng.uniform(-size / 5, size / 5, (int(rng.integers(2, 5)), 2))]
    for cy, cx, scale in parts:
        a, b = rng.uniform(size / 14, size / 7) * scale, rng.uniform(size / 28, size / 14) * scale  # plate-like
        np.maximum(figure, _blob(cy, cx, a, b, rng.uniform(0, np.pi)), out=figure)
    stain = (rng.uniform(0.75, 1.05) * rng.uniform(0.92, 1.05, 3)).astype(np.float32)  # brightness, stain
    pink = np.array([232, 172, 205], np.float32) * stain
    pale = np.array([150, 100, 175], np.float32) * stain
    dark = np.array([70, 40, 120], np.float32) * rng.uniform(0.7, 1.3, 3).astype(np.float32)
    img = pink * texture
    img += (pale - img) * nuclei[..., None]
    img += (dark - img) * figure[..., None]
    img += rng.normal(0, 6, img.shape).astype(np.float32)  # grain (halved by the upsampling below)
    np.clip(img, 0, 255, out=img)
    half = Image.fromarray(img.astype(np.uint8))
    return np.asarray(half.resize((CROP_SIZE, CROP_SIZE), Image.BILINEAR))


def write_crop(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


def _labels(counts: tuple[int, int], rng: np.random.Generator) -> list[int]:
    n_atypical, n_normal = counts
    labels = [1] * n_atypical + [0] * n_normal
    rng.shuffle(labels)
    return labels


def _write_set(folder: Path, names_labels: list[tuple[str, int]], rng: np.random.Generator) -> None:
    for name, label in names_labels:
        write_crop(folder / LABEL_NAME[label] / name, crop_pixels(rng, bool(label)))


def _split_row(i: int, name: str, slide: str, label: int, rng: np.random.Generator) -> dict:
    dataset, uid = name[:-len(".png")].split("_", 1)
    atypical = str(bool(label))
    kind = "AMF" if label else "NMF"
    return {"Unnamed: 0": i, "slide": slide, "dataset": dataset, "uid": uid, "final_label": LABEL_NAME[label],
            "dataset_uid": name, "x": int(rng.integers(100, 6000)), "y": int(rng.integers(100, 6000)),
            "expert1_label": f"{kind} generated", "expert2_label": f"{kind} generated", "expert1_atypical": atypical,
            "expert2_atypical": atypical, "expert3_atypical": atypical, "majority_atypical": atypical}


def make_dataset(root: Path, spec: Spec = SMALL, seed: int = 0) -> Path:
    """Write ``spec``'s tree under ``root`` (deterministic for a seed) and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    if spec.amibr_train is None:
        train = [(r["image"], r["slide"], int(r["label"])) for r in pinned_rows()]
    else:
        labels = _labels(spec.amibr_train, rng)
        train = [(f"MIDOG21_{i + 1}.png", f"{i % spec.train_slides + 1:03d}.tiff", lab) for i, lab in enumerate(labels)]
    taken = {name for name, _, _ in train}
    test_names = (f"TUPAC16_{i}.png" for i in range(1, 10**6) if f"TUPAC16_{i}.png" not in taken)
    test = [(next(test_names), lab) for lab in _labels(spec.amibr_test, rng)]
    _write_set(root / "AMi-Br", [(n, lab) for n, _, lab in train] + test, rng)
    with (root / TRAIN_SPLIT_CSV).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SPLIT_COLUMNS)
        w.writeheader()
        w.writerows(_split_row(i, n, slide, lab, rng) for i, (n, slide, lab) in enumerate(train))
    for folder, counts in (("AtNorM-MD", spec.atnorm_md), ("AtNorM-Br", spec.atnorm_br)):
        if counts is not None:
            _write_set(root / folder, [(f"{i + 1}.png", lab) for i, lab in enumerate(_labels(counts, rng))], rng)
    return root
