"""The benchmark's datasets: where they live, what they must contain, and how to read them.

Layout (upstream release of DeepMicroscopy/AMi-Br_Benchmark)::

    <root>/amibr_train_split.csv
    <root>/AMi-Br/{Atypical,Normal}/*.png
    <root>/AtNorM-Br/{Atypical,Normal}/*.png
    <root>/AtNorM-MD/{Atypical,Normal}/*.png

Every dataset is treated alike. A dataset that is not on disk is a reported state
(:class:`DatasetMissing`), never a crash and never faked.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput
from .hashing import file_sha256  # re-exported: ami.runtime.datasets.file_sha256 keeps working

ENV_DATA_ROOT = "AMI_DATA_ROOT"
CLASS_DIRS = {"Normal": 0, "Atypical": 1}
DATASET_SUFFIXES = (".png",)  # the benchmark releases ship their crops as PNG (ami-infer reads more: infer.IMAGE_SUFFIXES)
TRAIN_SPLIT_CSV = "amibr_train_split.csv"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str
    n_total: int
    n_atypical: int
    description: str

    @property
    def n_normal(self) -> int:
        return self.n_total - self.n_atypical


DATASETS: dict[str, DatasetSpec] = {
    "AMi-Br": DatasetSpec("AMi-Br", "AMi-Br", 3720, 832,
                          "human breast cancer (TUPAC16, MIDOG21), 3-expert majority; train + test"),
    "AtNorM-Br": DatasetSpec("AtNorM-Br", "AtNorM-Br", 746, 128,
                             "TCGA-BRCA, single expert; out-of-domain test set"),
    "AtNorM-MD": DatasetSpec("AtNorM-MD", "AtNorM-MD", 2107, 219,
                             "MIDOG++ non-breast domains, human + canine, 5-expert majority; out-of-domain test set"),
}
# Content fingerprints (:func:`fingerprint`) of the public release, DeepMicroscopy/AMi-Br_Benchmark at
# commit 3acf4da (the commit `ami-data download` fetches). A copy whose counts are right but whose
# bytes, names or class folders differ (a crop replaced by another's bytes, two crops swapped) no
# longer matches.
PINNED_FINGERPRINTS: dict[str, str | None] = {
    "AMi-Br": "423c0704f8e17d8adadc689e21b7b0a7a195e1395f1c8dd30de3ae380037835c",
    "AtNorM-Br": "36588e886d9e22286481fa08b783da9eda1c8944e7a63a7fce2de4e6725ae818",
    "AtNorM-MD": "e9a62678eede5ee925aaa5dfec98f444cca1c67dffa90a10810cbe29b752acbc",
}
# The release's own byte-identical crops, listed once from the release (``sha256,crop`` per file, one
# group per digest): the public AtNorM-Br holds 27 such groups (35 extra copies, 2 groups whose copies
# carry conflicting labels). AMi-Br and AtNorM-MD have none. ``verify`` reports these as the release's
# and calls any other duplicate tampering.
KNOWN_DUPLICATES_FILES: dict[str, Path] = {
    "AtNorM-Br": Path(__file__).parent / "splits" / "atnorm-br_known_duplicates.csv",
}
AMIBR_TRAIN_SIZE = 2894
AMIBR_TEST_SIZE = 826
# The evaluation sets of the paper, in table order.
TEST_SETS = ("AMi-Br-test", "AtNorM-Br", "AtNorM-MD")


class DatasetMissing(BadInput, FileNotFoundError):
    """A dataset folder is absent under the data root."""


class DataRootMissing(DatasetMissing):
    """The data root itself is not there (its message says where ami looked and why there)."""


class DatasetError(BadInput, ValueError):
    """A dataset is present but does not match what the benchmark expects."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 1 = Atypical, 0 = Normal
    name: str  # file name, unique within a dataset (AMi-Br: the `dataset_uid`)
    slide: str | None = None


def default_data_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "ami" / "ami-br-benchmark"


def resolve_data_root(flag: str | os.PathLike | None = None) -> Path:
    """``--data-root`` flag > ``$AMI_DATA_ROOT`` > the per-user default."""
    if flag:
        return Path(flag).expanduser()
    env = os.environ.get(ENV_DATA_ROOT)
    if env:
        return Path(env).expanduser()
    return default_data_root()


def data_root_origin(flag: str | os.PathLike | None = None) -> str:
    """Why :func:`resolve_data_root` picked its folder: the flag, the environment, or the default."""
    if flag:
        return "given with --data-root"
    if os.environ.get(ENV_DATA_ROOT):
        return f"from ${ENV_DATA_ROOT}"
    return f"the default: neither --data-root nor ${ENV_DATA_ROOT} is set"


def describe_data_root(flag: str | os.PathLike | None = None) -> str:
    """Where ami looks for the data, for messages: ``/path (given with --data-root)``."""
    return f"{resolve_data_root(flag)} ({data_root_origin(flag)})"


def require_data_root(flag: str | os.PathLike | None = None, datasets: tuple[str, ...] = (),
                      train_split: bool = False) -> Path:
    """:func:`resolve_data_root`, checked before any work: the folder exists and holds ``datasets``
    (and, with ``train_split``, amibr_train_split.csv). Raises :class:`DataRootMissing` /
    :class:`DatasetMissing` with one line saying where it looked."""
    root = resolve_data_root(flag)
    hint = f"set --data-root or ${ENV_DATA_ROOT} to the folder holding AMi-Br/, or fetch it with `ami-data download`"
    if not root.is_dir():
        raise DataRootMissing(f"no data root at {describe_data_root(flag)}; {hint}")
    for name in datasets:
        if not (root / DATASETS[name].folder).is_dir():
            raise DatasetMissing(f"dataset {name} is not present: no {DATASETS[name].folder}/ in the data root "
                                 f"{describe_data_root(flag)}; {hint}")
    if train_split and not (root / TRAIN_SPLIT_CSV).is_file():
        raise DatasetMissing(f"no {TRAIN_SPLIT_CSV} in the data root {describe_data_root(flag)}; {hint}")
    return root


def missing_message(root: Path, name: str) -> str:
    return (f"dataset {name} is not present: expected {root / DATASETS[name].folder}/{{Atypical,Normal}}/*.png "
            f"under data root {root} (set --data-root or ${ENV_DATA_ROOT}, or run `ami-data download`)")


def scan(root: Path, name: str) -> list[Sample]:
    """All crops of one dataset, sorted by (label folder, file name). Raises DatasetMissing."""
    spec = DATASETS[name]
    base = Path(root) / spec.folder
    if not base.is_dir():
        raise DatasetMissing(missing_message(Path(root), name))
    out: list[Sample] = []
    for cls, label in sorted(CLASS_DIRS.items()):
        d = base / cls
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.suffix.lower() in DATASET_SUFFIXES:
                out.append(Sample(p, label, p.name))
    return out


def read_train_split(root: Path) -> list[dict]:
    p = Path(root) / TRAIN_SPLIT_CSV
    if not p.is_file():
        raise DatasetMissing(f"{p} not found: the AMi-Br train split ships with the public release")
    with p.open(newline="") as f:
        return list(csv.DictReader(f))


def amibr_split(root: Path) -> tuple[list[Sample], list[Sample]]:
    """(train, test) for AMi-Br: train = the crops of amibr_train_split.csv, test = all others."""
    root = Path(root)
    by_name = {s.name: s for s in scan(root, "AMi-Br")}
    rows = read_train_split(root)
    train: list[Sample] = []
    for r in rows:
        name = r["dataset_uid"]
        s = by_name.get(name)
        if s is None:
            raise DatasetError(f"{name} is listed in {TRAIN_SPLIT_CSV} but not found under {root / 'AMi-Br'}")
        want = CLASS_DIRS[r["final_label"]]
        if s.label != want:
            raise DatasetError(f"{name}: {TRAIN_SPLIT_CSV} says {r['final_label']} but it is in the other class folder")
        train.append(Sample(s.path, s.label, s.name, r["slide"]))
    names = {s.name for s in train}
    test = [s for s in by_name.values() if s.name not in names]
    return train, test


def load_eval_set(root: Path, name: str) -> list[Sample]:
    """One of TEST_SETS. Raises DatasetMissing when its folder is absent."""
    if name == "AMi-Br-test":
        return amibr_split(root)[1]
    if name not in DATASETS:
        raise KeyError(f"unknown evaluation set {name!r}; known: {', '.join(TEST_SETS)}")
    return scan(root, name)


def available_eval_sets(root: Path) -> dict[str, list[Sample] | str]:
    """Every evaluation set: its samples, or the message saying why it is absent."""
    out: dict[str, list[Sample] | str] = {}
    for name in TEST_SETS:
        try:
            out[name] = load_eval_set(root, name)
        except DatasetMissing as e:
            out[name] = str(e)
    return out


def fingerprint(samples: list[Sample], digests: dict[Path, str] | None = None) -> str:
    """Content fingerprint of a set of crops: sha256 over (label, name, sha256(bytes)), sorted.
    ``digests``: file sha256s already computed (path -> hex), to hash each file once."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: (s.label, s.name)):
        d = digests[s.path] if digests and s.path in digests else file_sha256(s.path)
        h.update(f"{s.label}\t{s.name}\t{d}\n".encode())
    return h.hexdigest()


def known_duplicates(name: str) -> dict[str, frozenset[str]]:
    """The release's own duplicate groups of one dataset: sha256 -> {"Class/name.png", ...} (empty
    when the release has none)."""
    path = KNOWN_DUPLICATES_FILES.get(name)
    if path is None:
        return {}
    groups: dict[str, set[str]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            groups.setdefault(row["sha256"], set()).add(row["crop"])
    return {d: frozenset(v) for d, v in groups.items()}


def crop_key(s: Sample) -> str:
    """``Class/name``: how a crop is named across datasets, reports and the known-duplicates lists."""
    return f"{'Atypical' if s.label else 'Normal'}/{s.name}"


@dataclass(frozen=True)
class DuplicateGroup:
    """Crops with byte-identical content."""

    sha256: str
    samples: tuple[Sample, ...]

    @property
    def conflicting(self) -> bool:
        """The copies carry different labels."""
        return len({s.label for s in self.samples}) > 1

    def describe(self) -> str:
        return ", ".join(crop_key(s) for s in self.samples)


def duplicate_groups(samples: list[Sample], digests: dict[Path, str] | None = None) -> list[DuplicateGroup]:
    """Groups of two or more samples whose files have identical bytes, each sorted by (label, name),
    in the order of their first member."""
    by_content: dict[str, list[Sample]] = {}
    for s in samples:
        d = digests[s.path] if digests and s.path in digests else file_sha256(s.path)
        by_content.setdefault(d, []).append(s)
    groups = [DuplicateGroup(d, tuple(sorted(v, key=lambda s: (s.label, s.name))))
              for d, v in by_content.items() if len(v) > 1]
    return sorted(groups, key=lambda g: (g.samples[0].label, g.samples[0].name))


@dataclass(frozen=True)
class Deduplicated:
    """A crop set without its duplicates: ``kept`` (one copy of each agreeing group, first by (label,
    name)), ``dropped_copies`` (the other copies) and ``dropped_conflicts`` (every copy of a group
    whose labels disagree: no label can be trusted)."""

    kept: list[Sample]
    dropped_copies: list[Sample]
    dropped_conflicts: list[Sample]
    groups: list[DuplicateGroup]


def dedup_rule(groups) -> tuple[set[tuple[int, str]], set[tuple[int, str]]]:
    """The de-duplication rule, once: for groups of identical crops given as (label, name) pairs,
    (the copies to drop: all but the first by (label, name) of a group whose labels agree; the
    conflicts to drop: every member of a group whose labels disagree)."""
    copies: set[tuple[int, str]] = set()
    conflicts: set[tuple[int, str]] = set()
    for members in groups:
        ordered = sorted(members)
        if len({label for label, _ in ordered}) > 1:
            conflicts.update(ordered)
        else:
            copies.update(ordered[1:])
    return copies, conflicts


def deduplicate(samples: list[Sample], digests: dict[Path, str] | None = None,
                groups: list[DuplicateGroup] | None = None) -> Deduplicated:
    """The de-duplicated set (order of ``samples`` kept): conflicting groups dropped, one copy of
    the others."""
    groups = duplicate_groups(samples, digests) if groups is None else groups
    by_key = {(s.label, s.name): s.path for g in groups for s in g.samples}
    drop_copies, drop_conflicts = dedup_rule([(s.label, s.name) for s in g.samples] for g in groups)
    copies = {by_key[k] for k in drop_copies}
    conflicts = {by_key[k] for k in drop_conflicts}
    return Deduplicated(kept=[s for s in samples if s.path not in copies and s.path not in conflicts],
                        dropped_copies=[s for s in samples if s.path in copies],
                        dropped_conflicts=[s for s in samples if s.path in conflicts],
                        groups=groups)


def known_dedup_drops(name: str) -> tuple[frozenset[str], frozenset[str]]:
    """(copies, conflicts): the ``Class/name`` keys :func:`deduplicate` drops from the release of
    ``name``, read from its known-duplicates list alone (no crop is opened): every copy of a group
    but the first by (label, name), and every member of a group whose labels disagree. Lets a
    table subset recorded per-crop predictions to the de-duplicated set."""
    def label_name(key: str) -> tuple[int, str]:
        cls, file = key.split("/", 1)
        return CLASS_DIRS[cls], file

    copies, conflicts = dedup_rule([label_name(k) for k in members] for members in known_duplicates(name).values())
    words = {v: k for k, v in CLASS_DIRS.items()}
    return (frozenset(f"{words[lb]}/{n}" for lb, n in copies), frozenset(f"{words[lb]}/{n}" for lb, n in conflicts))


LABEL_WORDS = {"atypical": 1, "1": 1, "normal": 0, "0": 0}


class CropSetError(BadInput, ValueError):
    """A labelled crop set (folder or CSV) cannot be read as one."""


def labelled_folder(folder: str | os.PathLike) -> list[Sample]:
    """The crops of a folder in the release layout, ``FOLDER/{Atypical,Normal}/*`` (any image
    suffix ami reads), sorted by (class, name). Raises CropSetError."""
    from .imageio import IMAGE_SUFFIXES  # what ami-infer reads

    base = Path(folder)
    if not any((base / c).is_dir() for c in CLASS_DIRS):
        raise CropSetError(f"{base}: no Atypical/ or Normal/ folder (expected {base}/{{Atypical,Normal}}/*.png)")
    out = [Sample(p, label, p.name) for cls, label in sorted(CLASS_DIRS.items()) if (base / cls).is_dir()
           for p in sorted((base / cls).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not out:
        raise CropSetError(f"{base}: no images under Atypical/ or Normal/")
    return out


def labelled_csv(path: str | os.PathLike) -> tuple[list[Sample], dict[Path, str] | None]:
    """(crops, groups) of a CSV with columns ``path,label`` and an optional ``group`` column (e.g. a
    site, scanner or slide). Paths are relative to the CSV's folder; labels are Atypical / Normal
    (any case) or 1 / 0. ``groups``: crop path -> group, None without the column. Raises
    CropSetError naming the row."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            cols = {c.strip().lower(): c for c in (rows[0].keys() if rows else [])}
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CropSetError(f"{path}: cannot read it as CSV ({e})") from None
    if not rows or "path" not in cols or "label" not in cols:
        raise CropSetError(f"{path}: needs a header with 'path' and 'label' columns and at least one row")
    samples, groups = [], ({} if "group" in cols else None)
    for i, row in enumerate(rows, start=2):
        raw, word = (row.get(cols["path"]) or "").strip(), (row.get(cols["label"]) or "").strip().lower()
        if not raw or word not in LABEL_WORDS:
            raise CropSetError(f"{path}, line {i}: needs a path and a label (Atypical/Normal or 1/0), got "
                               f"{raw!r}, {word!r}")
        p = Path(raw) if Path(raw).is_absolute() else path.parent / raw
        samples.append(Sample(p, LABEL_WORDS[word], p.name))
        if groups is not None:
            groups[p] = (row.get(cols["group"]) or "").strip() or "(none)"
    return samples, groups


@dataclass
class VerifyReport:
    name: str
    present: bool
    counts: dict[str, int] = field(default_factory=dict)  # found per class
    expected: dict[str, int] = field(default_factory=dict)
    fingerprint: str | None = None
    pinned: str | None = None  # the public release's fingerprint, when known
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # findings that are the release's own (known duplicates)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.present and not self.problems


def _png_ok(path: Path) -> str | None:
    """A cheap, torch-free readability check: PNG signature and a full decode by Pillow."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # any decoder failure is a finding, not a crash
        return f"{path.name}: unreadable ({type(e).__name__}: {e})"
    return None


def check_duplicates(rep: VerifyReport, name: str, groups: list[DuplicateGroup]) -> None:
    """Duplicates the release itself ships (same digest, same crops) become one note; any other
    duplicate is a problem: a crop replaced by another's bytes."""
    known = known_duplicates(name)
    matched = [g for g in groups if known.get(g.sha256) == frozenset(crop_key(s) for s in g.samples)]
    for g in groups:
        if g not in matched:
            rep.problems.append(f"identical content under {len(g.samples)} names: {g.describe()} "
                                "(a crop replaced by another's bytes?)")
    missing = set(known) - {g.sha256 for g in matched}
    if missing:  # a listed group no longer there: its crops changed, which the fingerprint also says
        rep.problems.append(f"{len(missing)} of the release's {len(known)} known duplicate groups are not as listed")
    if matched:
        extra = sum(len(g.samples) - 1 for g in matched)
        conflicting = sum(g.conflicting for g in matched)
        rep.notes.append(f"{len(matched)} groups of byte-identical crops ({extra} extra copies, {conflicting} "
                         "groups with conflicting labels) are the public release's own, as listed: reported, "
                         "not a problem; tables also give the de-duplicated set")


def verify_dataset(root: Path, name: str, check_images: bool = True) -> VerifyReport:
    spec = DATASETS[name]
    rep = VerifyReport(name, present=False, expected={"Atypical": spec.n_atypical, "Normal": spec.n_normal})
    base = Path(root) / spec.folder
    if not base.is_dir():
        rep.message = missing_message(Path(root), name)
        return rep
    rep.present = True
    seen: dict[str, str] = {}
    samples: list[Sample] = []
    for cls, label in CLASS_DIRS.items():
        d = base / cls
        if not d.is_dir():
            rep.problems.append(f"class folder {cls}/ is missing")
            rep.counts[cls] = 0
            continue
        n = 0
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue
            if p.suffix.lower() not in DATASET_SUFFIXES or not p.is_file():
                rep.problems.append(f"extra file {cls}/{p.name}")
                continue
            if p.name in seen:
                rep.problems.append(f"{p.name} is in both {seen[p.name]}/ and {cls}/")
            seen[p.name] = cls
            n += 1
            samples.append(Sample(p, label, p.name))
            if check_images and (err := _png_ok(p)):
                rep.problems.append(err)
        rep.counts[cls] = n
    counts_ok = True
    for cls, want in rep.expected.items():
        got = rep.counts.get(cls, 0)
        if got != want:
            counts_ok = False
            rep.problems.append(f"{cls}: found {got} crops, expected {want}")
    digests = {x.path: file_sha256(x.path) for x in samples}
    check_duplicates(rep, name, duplicate_groups(samples, digests))
    rep.fingerprint = fingerprint(samples, digests)
    rep.pinned = PINNED_FINGERPRINTS.get(name)
    if rep.pinned and rep.fingerprint != rep.pinned and counts_ok:  # wrong counts already say why
        rep.problems.append(f"content fingerprint {rep.fingerprint[:16]}... differs from the public release's "
                            f"{rep.pinned[:16]}...: the counts are right but a crop's bytes, name or class folder "
                            "changed")
    if name == "AMi-Br":
        try:
            train, test = amibr_split(root)
            if (len(train), len(test)) != (AMIBR_TRAIN_SIZE, AMIBR_TEST_SIZE):
                rep.problems.append(f"train/test split is {len(train)}/{len(test)}, expected "
                                    f"{AMIBR_TRAIN_SIZE}/{AMIBR_TEST_SIZE}")
        except (DatasetError, DatasetMissing) as e:
            rep.problems.append(str(e))
    return rep
