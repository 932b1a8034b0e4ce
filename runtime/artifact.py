"""The contract of an exported ami artefact (ONNX model or TensorRT plan), and its checks.

Every artefact describes itself, so the runtime needs no side files:

* ONNX: one input ``pixels`` (uint8, NHWC, ``[N, S, S, 3]``, RGB, S = ``preprocess.input_size``,
  N dynamic); the graph does the cast, the normalisation and the transpose itself. One output
  ``prob_atypical`` (float32, ``[N]``): the probability of the Atypical class (for a fold
  ensemble: the mean of the fold models' probabilities).
* Metadata: ``metadata_props["ami"]`` holds one JSON document (:class:`ArtifactMeta`). Readers use
  onnxruntime's ``get_modelmeta().custom_metadata_map`` (no onnx needed on an edge box).
* TensorRT plan ``X.plan`` carries the same JSON in ``X.plan.json`` next to it, plus the TensorRT
  version, GPU name and compute capability it was built for.

This module is the one place that decides whether metadata is acceptable
(:func:`validate_meta_dict`, run by :meth:`ArtifactMeta.from_json` for every reader: the ONNX
loader, the plan side file, ``ami-export``'s checks, ``ami-bench``), and whether an artefact's
weights are the ones it was exported with:

* ``weights_digest`` (``"sha256:<hex>"``): for ONNX, the SHA-256 of the serialised ``graph``
  field of the model file (every node and every initialiser, the weights) followed by the bytes
  of any external-data tensor it references, in order; the metadata itself is outside the hashed
  bytes, so it can be written after the graph. For a TensorRT plan, the SHA-256 of the plan file.
  :func:`check_weights_digest` recomputes it at load (one pass over the file; see the README for
  its cost) and refuses a mismatch. Artefacts exported before digests existed have none: they
  load with a warning (:data:`NO_DIGEST_WARNING`), never silently as "verified".
* :func:`stamp_weights_digest` writes the digest into an existing ONNX file without touching a
  byte of its graph (it rewrites only the top-level ``metadata_props`` of the protobuf).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import CLASS_NAMES
from .atomic import atomic_write_bytes
from .errors import BadInput
from .hashing import file_sha256
from .preprocess import Preprocess

META_KEY = "ami"
FORMAT = "ami-artifact/1"
INPUT_NAME = "pixels"
OUTPUT_NAME = "prob_atypical"
PREPROCESS_IN_GRAPH = "uint8 NHWC -> float32, /255, (x-mean)/std, NHWC->NCHW"
REQUIRED = ("format", "model", "method", "preprocess", "class_names", "threshold", "threshold_rule", "precision")
# Sane bounds for the geometry a model asks for: a crop model below 8 px or above 4096 px is a
# broken writer, and the runtime allocates batch x size^2 x 3 bytes from these numbers.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 8, 4096
MAX_RESIZE = 8192
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
NO_DIGEST_WARNING = ("{name} carries no weights digest (exported before ami recorded one), so its weights "
                     "cannot be checked for corruption; export it again with ami-export to add one")
PLAN_SUFFIXES = (".plan", ".engine", ".trt")


# The field of view a model was trained on, so slide readers cut the same crops: every ami model so
# far is trained on the AMi-Br crops, 128 x 128 px at 0.25 um/px (40x), centred on the figure
# (Banerjee et al.; docs: benchmark-protocol.md). Artefacts exported before the ``crop`` key
# existed carry none: :meth:`ArtifactMeta.training_crop` then assumes this one and says so.
AMIBR_CROP = {"mpp": 0.25, "size_px": 128, "centred": True,
              "source": "AMi-Br crops (TUPAC16, MIDOG21): 128 x 128 px at 0.25 um/px, centred on the mitotic figure"}


class ArtifactError(BadInput, ValueError):
    """An artefact is missing, unreadable, or does not describe itself as ami expects."""


@dataclass
class ArtifactMeta:
    model: str  # registry name, e.g. "edge"
    method: str  # full | linear | lora (merged)
    preprocess: Preprocess
    threshold: float = 0.5
    threshold_rule: str = "default 0.5"  # how it was chosen (validation folds only)
    precision: str = "fp32"  # fp32 | int8 | fp16
    display: str = ""
    folds: list = field(default_factory=list)  # fold indices in the graph, or ["all"]
    class_names: tuple = CLASS_NAMES
    preprocess_in_graph: str = PREPROCESS_IN_GRAPH
    source: dict = field(default_factory=dict)  # run dir, folds sha256, data fingerprints, weights
    validation: dict = field(default_factory=dict)  # validation metrics it was exported from
    calibration: dict = field(default_factory=dict)  # int8: calibration set and size
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    crop: dict = field(default_factory=dict)  # training field of view: mpp, size_px, centred, source
    format: str = FORMAT
    weights_digest: str = ""  # "sha256:<hex>" of the weights (see the module docstring); "" = predates digests
    # module names of the classifier head in each fold network (e.g. ["head.fc"], ["logit_head"]): the
    # int8 exporter keeps them float32. [] = not recorded (exported before ami recorded the head).
    head_modules: list = field(default_factory=list)

    def training_crop(self) -> dict:
        """The crops the model was trained on: {"mpp", "size_px", "centred", "source", "assumed"}.
        ``assumed`` is True for an artefact that does not record them (the AMi-Br crops are assumed)."""
        c = self.crop or AMIBR_CROP
        try:
            mpp, size = float(c["mpp"]), int(c["size_px"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"artefact metadata 'crop' is malformed ({c!r}: {e}); expected mpp and size_px") from None
        if not (mpp > 0 and size > 0):
            raise ArtifactError(f"artefact metadata 'crop' must have mpp > 0 and size_px > 0, got {c!r}")
        return {"mpp": mpp, "size_px": size, "centred": bool(c.get("centred", True)),
                "source": str(c.get("source", "")), "assumed": not self.crop}

    def to_json(self) -> str:
        d = asdict(self)
        d["preprocess"] = asdict(self.preprocess)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArtifactMeta:
        """Parse and validate (completely: see :func:`validate_meta_dict`). Raises ArtifactError."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise ArtifactError(f"artefact metadata is not valid JSON: {e}") from None
        problems = validate_meta_dict(d)
        if problems:
            raise ArtifactError("artefact metadata is malformed: " + "; ".join(problems))
        d = dict(d)
        pre = d["preprocess"]
        d["preprocess"] = Preprocess(input_size=pre["input_size"], resize=pre.get("resize"),
                                     interpolation=pre.get("interpolation", "bicubic"),
                                     mean=tuple(float(v) for v in pre["mean"]), std=tuple(float(v) for v in pre["std"]))
        d["class_names"] = tuple(d["class_names"])
        d["threshold"] = float(d["threshold"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# -- validation (the one place) ------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


def validate_preprocess_dict(p) -> list[str]:
    """Problems with a ``preprocess`` object (empty list: fine)."""
    if not isinstance(p, dict):
        return [f"preprocess must be an object, got {type(p).__name__}"]
    out = []
    known = set(Preprocess.__dataclass_fields__)
    unknown = sorted(set(p) - known)
    if unknown:
        out.append(f"preprocess has unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))}); "
                   "the runtime would not apply them, so the model's preprocessing cannot be honoured")
    for k in ("input_size", "mean", "std"):
        if k not in p:
            out.append(f"preprocess lacks {k}")
    s = p.get("input_size")
    if "input_size" in p:
        if not _is_int(s):
            out.append(f"preprocess.input_size must be a whole number of pixels, got {s!r}")
        elif not MIN_INPUT_SIZE <= s <= MAX_INPUT_SIZE:
            out.append(f"preprocess.input_size {s} is outside [{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}] pixels")
    r = p.get("resize")
    if r is not None and (not _is_int(r) or not MIN_INPUT_SIZE <= r <= MAX_RESIZE):
        out.append(f"preprocess.resize must be null or a whole number in [{MIN_INPUT_SIZE}, {MAX_RESIZE}], got {r!r}")
    i = p.get("interpolation", "bicubic")
    try:
        if not isinstance(i, str):
            raise ValueError(f"interpolation must be a name, got {i!r}")
        Preprocess(interpolation=i)
    except ValueError as e:
        out.append(f"preprocess.{e}")
    for k in ("mean", "std"):
        v = p.get(k)
        if k not in p:
            continue
        if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_is_num(x) for x in v):
            out.append(f"preprocess.{k} must be 3 finite numbers (R, G, B), got {v!r}")
        elif k == "std" and not all(x > 0 for x in v):
            out.append(f"preprocess.std must be > 0 in every channel, got {list(v)}")
    return out


def _scalar_problems(d: dict) -> list[str]:
    """Problems of the scalar fields: strings, the threshold and the class names."""
    out = []
    for k in ("model", "method", "threshold_rule", "precision"):
        if k in d and not _text(d[k]):
            out.append(f"{k} must be a non-empty string, got {d[k]!r}")
    for k in ("display", "preprocess_in_graph"):
        if k in d and not isinstance(d[k], str):
            out.append(f"{k} must be a string, got {d[k]!r}")
    if "threshold" in d:
        t = d["threshold"]
        if not _is_num(t):
            out.append(f"threshold must be a finite number, got {t!r}")
        elif not 0.0 <= t <= 1.0:
            out.append(f"threshold {t} is outside [0, 1]")
    if "class_names" in d:
        c = d["class_names"]
        if (not isinstance(c, (list, tuple)) or len(c) != 2 or not all(_text(x) for x in c)
                or len(set(c)) != 2):
            out.append(f"class_names must be two different non-empty names (negative class first), got {c!r}")
    return out


def _structure_problems(d: dict) -> list[str]:
    """Problems of the nested fields: preprocessing, folds, the objects, head modules, the digest."""
    out = validate_preprocess_dict(d["preprocess"]) if "preprocess" in d else []
    if "folds" in d and not isinstance(d["folds"], list):
        out.append(f"folds must be a list, got {d['folds']!r}")
    for k in ("source", "validation", "calibration", "versions", "extra", "crop"):
        if k in d and not isinstance(d[k], dict):
            out.append(f"{k} must be an object, got {type(d[k]).__name__}")
    h = d.get("head_modules", [])
    if not isinstance(h, list) or not all(_text(x) for x in h):
        out.append(f"head_modules must be a list of module names, got {h!r}")
    w = d.get("weights_digest", "")
    if w != "" and not (isinstance(w, str) and DIGEST_RE.match(w)):
        out.append(f"weights_digest must be 'sha256:' and 64 hex digits, got {w!r}")
    return out


def validate_meta_dict(d) -> list[str]:
    """Every problem with an artefact's metadata document (types, ranges, required keys); empty
    when it is usable. Unknown top-level keys are allowed (newer writers, plan build facts)."""
    if not isinstance(d, dict):
        return [f"metadata must be a JSON object, got {type(d).__name__}"]
    out = []
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        out.append(f"lacks {', '.join(missing)}")
    if "format" in d and d["format"] != FORMAT:
        out.append(f"format {d['format']!r} is not {FORMAT!r}")
    return out + _scalar_problems(d) + _structure_problems(d)


def check_batch_axis(shape, path: str | os.PathLike) -> None:
    """An ami graph takes any batch: a fixed batch axis (e.g. 1) would fail on the first real batch."""
    if shape and isinstance(shape[0], int) and shape[0] > 0:
        raise ArtifactError(f"{path}: input '{INPUT_NAME}' has a fixed batch of {shape[0]} (shape {list(shape)}); "
                            "ami artefacts have a dynamic batch axis; export the model again with ami-export")


# -- protobuf, just enough to find the graph without the onnx package -----------------------------

def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ArtifactError("truncated protobuf (a varint runs past the end)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ArtifactError("malformed protobuf (varint too long)")


def _fields(buf, start: int = 0, end: int | None = None):
    """(field number, wire type, value start, value end, record start) of each field in buf[start:end]."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        rec = pos
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            _, nxt = _varint(buf, pos)
        elif wt == 1:
            nxt = pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            nxt = pos + n
        elif wt == 5:
            nxt = pos + 4
        else:
            raise ArtifactError(f"malformed protobuf (wire type {wt})")
        if nxt > end:
            raise ArtifactError("truncated protobuf (a field runs past the end of the file)")
        yield num, wt, pos, nxt, rec
        pos = nxt


def _len_field(num: int, payload: bytes) -> bytes:
    out, n, key = bytearray(), len(payload), (num << 3) | 2
    for v in (key, n):
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                break
    return bytes(out) + payload


_MODEL_GRAPH, _MODEL_METADATA = 7, 14  # ModelProto field numbers
_GRAPH_INITIALIZER = 5  # GraphProto.initializer (TensorProto)
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14  # TensorProto


def _external_refs(buf, g0: int, g1: int) -> list[tuple[str, int, int | None]]:
    """(location, offset, length) of every initialiser stored outside the file, in graph order."""
    refs = []
    for num, wt, a, b, _ in _fields(buf, g0, g1):
        if num != _GRAPH_INITIALIZER or wt != 2:
            continue
        external, entry = False, {}
        for tnum, twt, ta, tb, _ in _fields(buf, a, b):
            if tnum == _TENSOR_DATA_LOCATION and twt == 0:
                external = _varint(buf, ta)[0] == 1
            elif tnum == _TENSOR_EXTERNAL_DATA and twt == 2:
                kv = {}
                for knum, kwt, ka, kb, _ in _fields(buf, ta, tb):
                    if kwt == 2:
                        kv[knum] = bytes(buf[ka:kb]).decode("utf-8", "replace")
                if 1 in kv:
                    entry[kv[1]] = kv.get(2, "")
        if external:
            refs.append((entry.get("location", ""), int(entry.get("offset", 0) or 0),
                         int(entry["length"]) if entry.get("length") else None))
    return refs


def onnx_weights_digest(path: str | os.PathLike, data: bytes | None = None) -> str:
    """The weights digest of an ONNX file: sha256 over its serialised graph field, then the bytes
    of every external-data tensor it references (relative to the file's folder), in order."""
    p = Path(path)
    buf = memoryview(data if data is not None else p.read_bytes())
    h = hashlib.sha256()
    graphs = 0
    for num, wt, a, b, _ in _fields(buf):
        if num == _MODEL_GRAPH and wt == 2:
            graphs += 1
            h.update(buf[a:b])
            for loc, off, length in _external_refs(buf, a, b):
                ext = p.parent / loc
                try:
                    with open(ext, "rb") as f:
                        f.seek(off)
                        chunk = f.read() if length is None else f.read(length)
                except OSError as e:
                    raise ArtifactError(f"{p}: external weights file {loc!r} cannot be read ({e.strerror or e})") from None
                if length is not None and len(chunk) != length:
                    raise ArtifactError(f"{p}: external weights file {loc!r} is truncated")
                h.update(loc.encode("utf-8", "surrogateescape") + b"\0")
                h.update(chunk)
    if graphs == 0:
        raise ArtifactError(f"{p} holds no ONNX graph")
    return "sha256:" + h.hexdigest()


def plan_weights_digest(path: str | os.PathLike) -> str:
    """The weights digest of a TensorRT plan: sha256 of the whole plan file."""
    return "sha256:" + file_sha256(path)


def weights_digest(path: str | os.PathLike) -> str:
    return plan_weights_digest(path) if Path(path).suffix.lower() in PLAN_SUFFIXES else onnx_weights_digest(path)


def check_weights_digest(path: str | os.PathLike, meta: ArtifactMeta) -> bool:
    """Recompute the artefact's weights digest and compare it with its metadata. True: verified;
    False: the artefact predates digests (the caller warns, see :data:`NO_DIGEST_WARNING`).
    Raises ArtifactError when they differ: the weights are not the ones that were exported."""
    want = meta.weights_digest
    if not want:
        return False
    got = weights_digest(path)
    if got != want:
        raise ArtifactError(f"{path}: its weights do not match the digest in its metadata (recorded {want[:19]}..., "
                            f"found {got[:19]}...): the file is corrupted or was altered after export; "
                            "copy it again or export it again")
    return True


def stamp_weights_digest(path: str | os.PathLike) -> str:
    """Write the weights digest into an ONNX file's ``ami`` metadata, in place (temporary file,
    then rename). Only the top-level metadata_props records change: the graph bytes (so every
    weight) are copied verbatim. Returns the digest."""
    p = Path(path)
    buf = memoryview(p.read_bytes())
    digest = onnx_weights_digest(p, bytes(buf))
    kept, props, seen_ami, at = [], [], False, None
    for num, wt, a, b, rec in _fields(buf):
        if num == _MODEL_METADATA and wt == 2:
            at = len(kept) if at is None else at
            kv = {}
            for knum, kwt, ka, kb, _ in _fields(buf, a, b):
                if kwt == 2:
                    kv[knum] = bytes(buf[ka:kb]).decode("utf-8")
            key, value = kv.get(1, ""), kv.get(2, "")
            if key == META_KEY:
                d = json.loads(value)
                d["weights_digest"] = digest
                value, seen_ami = json.dumps(d, sort_keys=True), True
            props.append((key, value))
        else:
            kept.append(bytes(buf[rec:b]))
    if not seen_ami:
        raise ArtifactError(f"{p} has no '{META_KEY}' metadata to stamp")
    meta_records = [_len_field(_MODEL_METADATA, _len_field(1, k.encode()) + _len_field(2, v.encode()))
                    for k, v in props]
    atomic_write_bytes(p, b"".join(kept[:at] + meta_records + kept[at:]))
    return digest
