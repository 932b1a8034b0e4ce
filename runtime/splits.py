"""The versioned 5-fold split of the AMi-Br training crops.

``splits/amibr_folds_v1.csv`` (image, slide, label, fold) reproduces the public scripts'
``StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=42)`` over the 2894 crops of
``amibr_train_split.csv``, grouped by slide. It was written once (``ami-data folds --write``) and its
SHA-256 is pinned below and in ``splits/amibr_folds_v1.csv.sha256``; every training run checks
the file and the data against it before starting.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from . import DIST_NAME
from .datasets import DatasetError, Sample, amibr_split
from .errors import BadInput

SPLITS_DIR = Path(__file__).parent / "splits"
FOLDS_FILE = SPLITS_DIR / "amibr_folds_v1.csv"
N_FOLDS = 5


def parse_folds(text: str) -> list[int | None]:
    """'all' -> 0..4; '0,2' -> [0, 2]; 'full' -> None (all training crops, no validation); repeats
    dropped, order kept. Raises ValueError naming the bad part (``ami-train --folds``, sweeps)."""
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            out += list(range(N_FOLDS))
        elif part == "full":
            out.append(None)
        elif part:
            try:
                k = int(part)
            except ValueError:
                raise ValueError(f"{part!r} is not a fold (0-{N_FOLDS - 1}, 'all' or 'full')") from None
            if not 0 <= k < N_FOLDS:
                raise ValueError(f"fold {k} out of range 0..{N_FOLDS - 1}")
            out.append(k)
    return list(dict.fromkeys(out))
FOLDS_COLUMNS = ("image", "slide", "label", "fold")


class SplitError(BadInput, ValueError):
    """The folds file or the data it refers to does not match the pinned split."""


@dataclass(frozen=True)
class FoldRow:
    image: str
    slide: str
    label: int
    fold: int


def pinned_sha256(path: Path = FOLDS_FILE) -> str:
    return Path(str(path) + ".sha256").read_text().split()[0]


def folds_sha256(path: Path = FOLDS_FILE) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_folds(rows: list[FoldRow], path: Path = FOLDS_FILE) -> str:
    """Write the folds file and its .sha256 beside it; returns the digest."""
    lines = [",".join(FOLDS_COLUMNS)] + [f"{r.image},{r.slide},{r.label},{r.fold}" for r in rows]
    data = ("\n".join(lines) + "\n").encode()
    Path(path).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    Path(str(path) + ".sha256").write_text(f"{digest}  {Path(path).name}\n")
    return digest


def load_folds(path: Path = FOLDS_FILE, check: bool = True) -> list[FoldRow]:
    path = Path(path)
    if check:
        got, want = folds_sha256(path), pinned_sha256(path)
        if got != want:
            raise SplitError(f"{path} has sha256 {got}, but {want} is pinned: the split file was modified")
    with path.open(newline="") as f:
        return [FoldRow(r["image"], r["slide"], int(r["label"]), int(r["fold"])) for r in csv.DictReader(f)]


def check_against_data(rows: list[FoldRow], train: list[Sample]) -> None:
    """The folds must cover exactly the training crops, with the same labels and slides."""
    by_name = {s.name: s for s in train}
    names = {r.image for r in rows}
    if names != set(by_name):
        missing, extra = set(by_name) - names, names - set(by_name)
        raise SplitError(f"folds file and data disagree: {len(missing)} training crops not in the folds, "
                         f"{len(extra)} fold rows without a crop (e.g. {sorted(missing | extra)[:3]})")
    for r in rows:
        s = by_name[r.image]
        if s.label != r.label or s.slide != r.slide:
            raise SplitError(f"{r.image}: folds file says label {r.label} slide {r.slide}, "
                             f"data says label {s.label} slide {s.slide}")


def fold_samples(root: Path, fold: int, path: Path = FOLDS_FILE) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) samples of one fold, after checking file and data."""
    if not 0 <= fold < N_FOLDS:
        raise SplitError(f"fold must be in 0..{N_FOLDS - 1}, got {fold}")
    rows = load_folds(path)
    try:
        train, _ = amibr_split(root)
    except DatasetError as e:
        raise SplitError(str(e)) from e
    check_against_data(rows, train)
    fold_of = {r.image: r.fold for r in rows}
    tr = [s for s in train if fold_of[s.name] != fold]
    va = [s for s in train if fold_of[s.name] == fold]
    return tr, va


def compute_folds(root: Path, seed: int = 42) -> list[FoldRow]:
    """Recompute the split from the data, exactly as the public scripts do.

    Rows in ``amibr_train_split.csv`` order; StratifiedGroupKFold(5, shuffle=True,
    random_state=42) over (image, final_label, slide). Needs scikit-learn (the ``train`` or
    ``dev`` extra); the edge install only ever reads the stored file.
    """
    try:
        from sklearn.model_selection import StratifiedGroupKFold
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SplitError(f"computing folds needs scikit-learn: pip install '{DIST_NAME}[train]'") from e
    train, _ = amibr_split(root)
    labels = ["Atypical" if s.label else "Normal" for s in train]
    slides = [s.slide for s in train]
    sgkf = StratifiedGroupKFold(n_splits=N_FOLDS, shuffle=True, random_state=seed)
    fold = [0] * len(train)
    for k, (_, val_idx) in enumerate(sgkf.split([s.name for s in train], labels, slides)):
        for i in val_idx:
            fold[i] = k
    return [FoldRow(s.name, s.slide, s.label, f) for s, f in zip(train, fold)]
