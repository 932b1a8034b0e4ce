"""The run directory: the one module that knows its layout. Torch-free.

A training run (``ami-train``) writes, and export, parity, the table and the card read::

    RUN/config.json               resolved configuration (model entry, method, recipe, versions, ...)
    RUN/split.json                folds file sha256 + data fingerprints, checked on every (re)start
    RUN/fold{k}/state.pt          last completed epoch (model, EMA, optimiser, scheduler, RNG) - atomic
    RUN/fold{k}/history.csv       one line per epoch
    RUN/fold{k}/best.safetensors  weights of the selected epoch (best validation balanced accuracy)
    RUN/fold{k}/metrics.json      validation + test metrics, per-crop probabilities, timings, versions
    RUN/all/...                   optional: the recipe trained on all training crops (no validation)

A fold is named by a :data:`FoldId`: an int ``0..N_FOLDS-1`` for a cross-validation fold, or
:data:`ALL` (``"all"``) for the all-crops model (``None`` is accepted for it, as ``ami-train``'s
fold loop uses it). A fold is *finished* when its ``metrics.json`` exists and *complete* when its
weights exist too (what export needs).

``config.json``'s ``weights_source`` is prose for a person ("random init (...)", a hub id, a local
file, ``pkg:PACKAGE/PATH``); :class:`WeightsSource` is its typed reading, so no caller parses it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .atomic import atomic_write_json
from .errors import BadInput
from .splits import N_FOLDS

CONFIG = "config.json"
SPLIT = "split.json"
WEIGHTS = "best.safetensors"
METRICS = "metrics.json"
HISTORY = "history.csv"
STATE = "state.pt"
ALL = "all"  # fold id and folder name of the all-crops model

FoldId = int | Literal["all"]

_FOLD_DIR = re.compile(r"^fold(\d+)$")

# the prose config.json records for networks without pretrained weights (see WeightsSource)
RANDOM_FROM_SCRATCH = "random init (from scratch: no pretrained weights)"
RANDOM_NOT_PRETRAINED = "random init (--random-init: NOT the pretrained model)"


class RunDirError(BadInput, ValueError):
    """A run directory (or a file in it) is missing, unreadable or not what ami-train writes."""


def fold_id(fold) -> FoldId:
    """Normalise a fold: ``None`` / ``"all"`` -> :data:`ALL`; ``"3"`` / ``3`` -> ``3`` (checked)."""
    if fold is None or fold == ALL:
        return ALL
    try:
        k = int(fold)
    except (TypeError, ValueError):
        raise RunDirError(f"{fold!r} is not a fold (0-{N_FOLDS - 1} or {ALL!r})") from None
    if isinstance(fold, bool) or not 0 <= k < N_FOLDS or str(k) != str(fold).strip():
        raise RunDirError(f"{fold!r} is not a fold (0-{N_FOLDS - 1} or {ALL!r})")
    return k


def fold_name(fold) -> str:
    """The folder name of a fold: ``fold3``, or ``all`` for the all-crops model."""
    k = fold_id(fold)
    return ALL if k == ALL else f"fold{k}"


def fold_key(fold) -> str:
    """The fold as a string key (``"0"``..``"4"``, ``"all"``): metrics.json's ``fold`` field, as text."""
    return str(fold_id(fold))


def parse_fold_name(name: str) -> FoldId | None:
    """``fold3`` -> 3, ``all`` -> ``"all"``, anything else -> None."""
    if name == ALL:
        return ALL
    m = _FOLD_DIR.match(name)
    if m and 0 <= int(m.group(1)) < N_FOLDS:
        return int(m.group(1))
    return None


# -- the records' shapes: a tampered or damaged file is one line naming the file and the field -----------
NoneType = type(None)
Fields = dict[str, tuple[type, ...]]
CONFIG_FIELDS: Fields = {
    "model": (str,), "method": (str,), "arch": (str,), "recipe": (dict,), "registry_entry": (dict,),
    "preprocess": (dict,), "random_init": (bool,), "tiny_stand_in": (bool,), "max_train": (int,),
    "max_eval": (int,), "amp": (str,), "weights_source": (str, NoneType), "hub_id": (str, NoneType),
}
SPLIT_FIELDS: Fields = {"folds_file": (str,), "folds_sha256": (str,), "train_fingerprint": (str, NoneType)}
METRICS_FIELDS: Fields = {
    "fold": (int, str), "model": (str,), "method": (str,), "validation": (dict, NoneType), "tests": (dict,),
    "predictions": (dict,), "train_seconds": (float, NoneType), "eval_seconds": (float, NoneType),
    "best_epoch": (int, NoneType), "epochs_run": (int,),
}
# inside metrics.json's "validation" and each "tests" entry: the figures (runtime.metrics.BinaryMetrics)
FIGURE_FIELDS: Fields = {k: (float, NoneType) for k in (
    "threshold", "balanced_accuracy", "auroc", "sensitivity", "specificity")} | {
    k: (int, NoneType) for k in ("n", "n_atypical", "tp", "fn", "tn", "fp")}
_KIND = {str: "a string", dict: "an object", list: "a list", bool: "true or false", int: "an integer",
         float: "a number", NoneType: "null"}


def _kind(value) -> str:
    for t in (bool, NoneType, str, dict, list, int, float):  # bool before int: True is an int to Python
        if isinstance(value, t):
            return _KIND[t]
    return type(value).__name__


def _fits(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if float in types and isinstance(value, int):
        return True  # 120 is a number of seconds too
    return isinstance(value, types)


def check_fields(path: Path, record, fields: Fields, required: tuple[str, ...] = (), where: str = "") -> dict:
    """``record`` (read from ``path``) if it is a JSON object whose known ``fields`` have their types
    and whose ``required`` fields are there; else :class:`RunDirError` naming the file and the field."""
    if not isinstance(record, dict):
        name = f"field {where!r}" if where else "it"
        raise RunDirError(f"{path}: {name} should be {_KIND[dict]}, not {_kind(record)}")
    for key in required:
        if key not in record:
            raise RunDirError(f"{path}: field {where + '.' if where else ''}{key!r} is missing")
    for key, types in fields.items():
        if key in record and not _fits(record[key], types):
            want = " or ".join(dict.fromkeys(_KIND[t] for t in types))
            raise RunDirError(f"{path}: field {(where + '.' if where else '') + key!r} should be {want}, "
                              f"not {_kind(record[key])}")
    return record


def check_metrics(path: Path, record, required: tuple[str, ...] = ()) -> dict:
    """metrics.json's shape: its fields, the figures of 'validation' and of each 'tests' entry, the
    'predictions' lists; a fold that is 0..N_FOLDS-1 or 'all'."""
    check_fields(path, record, METRICS_FIELDS, required)
    if "fold" in record:
        try:
            fold_id(record["fold"])
        except RunDirError as e:
            raise RunDirError(f"{path}: field 'fold': {e}") from None
    if isinstance(record.get("validation"), dict):
        check_fields(path, record["validation"], FIGURE_FIELDS, where="validation")
    for name, entry in record.get("tests", {}).items():
        check_fields(path, entry, FIGURE_FIELDS, where=f"tests.{name}")
    for name, rows in record.get("predictions", {}).items():
        if not isinstance(rows, (list, NoneType)):
            raise RunDirError(f"{path}: field 'predictions.{name}' should be a list, not {_kind(rows)}")
    return record


def read_json(path: Path, fields: Fields | None = None, required: tuple[str, ...] = ()) -> dict:
    """A JSON object of a run (checked against ``fields``, see :func:`check_fields`), or
    :class:`RunDirError` saying what is wrong with it."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise RunDirError(f"{path} cannot be read ({e.strerror or e})") from None
    return check_fields(path, record, fields or {}, required)


@dataclass(frozen=True)
class WeightsSource:
    """Where a run's starting weights came from, read from config.json's ``weights_source``.

    ``kind``: ``"random"`` (no pretrained weights: from scratch, or ``--random-init``), ``"hub"``
    (the registry entry's own hub weights), ``"package"`` (``pkg:PACKAGE/PATH``, a file inside an installed
    package) or ``"file"`` (a local file or another ``hf-hub:`` id given with ``--weights``).
    """

    kind: Literal["random", "hub", "package", "file"]
    ref: str | None  # the text config.json holds (None: not recorded)

    @classmethod
    def from_config(cls, config: dict) -> WeightsSource:
        text = config.get("weights_source")
        if config.get("random_init") or (isinstance(text, str) and text.startswith("random init")):
            return cls("random", text)
        if not text or text == config.get("hub_id"):  # not recorded: the registry entry's own weights
            return cls("hub", text)
        if str(text).startswith("pkg:"):
            return cls("package", text)
        return cls("file", text)

    @property
    def pretrained(self) -> bool:
        return self.kind != "random"

    def override(self) -> str | None:
        """What to pass as ``weights=`` when rebuilding the network: None for random init and for the
        registry's own hub id (the registry entry loads it), else the recorded source."""
        return self.ref if self.kind in ("package", "file") else None


@dataclass(frozen=True)
class FoldDir:
    """One fold of a run: ``RUN/fold{k}`` or ``RUN/all``."""

    run: RunDir
    fold: FoldId

    @property
    def path(self) -> Path:
        return self.run.path / fold_name(self.fold)

    @property
    def name(self) -> str:
        return fold_name(self.fold)

    @property
    def key(self) -> str:
        return fold_key(self.fold)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def history(self) -> Path:
        return self.path / HISTORY

    @property
    def state(self) -> Path:
        return self.path / STATE

    @property
    def is_all(self) -> bool:
        return self.fold == ALL

    def is_finished(self) -> bool:
        """metrics.json exists: training and evaluation of this fold are done."""
        return self.metrics_path.is_file()

    def is_complete(self) -> bool:
        """Finished and its weights are there (what export and parity need)."""
        return self.weights.is_file() and self.metrics_path.is_file()

    def require_weights(self) -> Path:
        """The weights file, or :class:`RunDirError` saying that this fold is not trained yet."""
        if not self.weights.is_file():
            raise RunDirError(f"{self.weights} is missing: fold {self.key} of {self.run.name} is not trained "
                              "(or not finished)")
        return self.weights

    def metrics(self, required: tuple[str, ...] = ()) -> dict:
        """metrics.json, its shape checked (:func:`check_metrics`; ``required`` fields must be there)."""
        return check_metrics(self.metrics_path, read_json(self.metrics_path), required)

    def mkdir(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def write_metrics(self, record: dict) -> None:
        atomic_write_json(self.metrics_path, record)


@dataclass(frozen=True)
class RunDir:
    """A run directory written by ``ami-train`` (see the module docstring for its layout)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def split_path(self) -> Path:
        return self.path / SPLIT

    def is_run(self) -> bool:
        """True when ``config.json`` is there (what makes a folder a run directory)."""
        return self.config_path.is_file()

    def fold(self, fold) -> FoldDir:
        return FoldDir(self, fold_id(fold))

    def cv_folds(self) -> Iterator[FoldDir]:
        """The cross-validation folds 0..N_FOLDS-1 (present or not)."""
        for k in range(N_FOLDS):
            yield FoldDir(self, k)

    def finished_folds(self) -> list[int]:
        """Cross-validation folds whose metrics.json exists."""
        return [f.fold for f in self.cv_folds() if f.is_finished()]

    def completed_folds(self) -> list[int]:
        """Cross-validation folds with both best weights and metrics.json (a finished, exportable fold)."""
        return [f.fold for f in self.cv_folds() if f.is_complete()]

    def config(self, required: tuple[str, ...] = ()) -> dict:
        """config.json, its fields' types checked (``required`` fields must be there)."""
        return read_json(self.config_path, CONFIG_FIELDS, required)

    def split(self) -> dict:
        """split.json, or {} for a run written before split.json existed."""
        return read_json(self.split_path, SPLIT_FIELDS) if self.split_path.is_file() else {}

    def write_config(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_path, record)

    def write_split(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.split_path, record)

    @classmethod
    def locate(cls, path) -> tuple[RunDir, FoldId | None]:
        """A run directory, or one fold directory inside one -> (the run, that fold or None).

        Raises :class:`RunDirError` saying what the path is instead."""
        p = Path(path)
        if not p.exists():
            raise RunDirError(f"{p} does not exist")
        if not p.is_dir():
            raise RunDirError(f"{p} is a file, not a run directory")
        run = cls(p)
        if run.is_run():
            return run, None
        fold = parse_fold_name(p.name)
        if fold is not None and cls(p.parent).is_run():
            return cls(p.parent), fold
        raise RunDirError(f"{p} is not a training run (no {CONFIG}) nor a fold directory of one")
