"""The contract of an exported ami artefact (ONNX model or TensorRT plan).

Every artefact describes itself, so the runtime needs no side files:

* ONNX: one input ``pixels`` (uint8, NHWC, ``[N, S, S, 3]``, RGB, S = ``preprocess.input_size``);
  the graph does the cast, the normalisation and the transpose itself. One output
  ``prob_atypical`` (float32, ``[N]``): the probability of the Atypical class (for a fold
  ensemble: the mean of the fold models' probabilities).
* Metadata: ``metadata_props["ami"]`` holds one JSON document (:class:`ArtifactMeta`). Readers use
  onnxruntime's ``get_modelmeta().custom_metadata_map`` (no onnx needed on an edge box).
* TensorRT plan ``X.plan`` carries the same JSON in ``X.plan.json`` next to it, plus the TensorRT
  version, GPU name and compute capability it was built for.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from . import CLASS_NAMES
from .preprocess import Preprocess

META_KEY = "ami"
FORMAT = "ami-artifact/1"
INPUT_NAME = "pixels"
OUTPUT_NAME = "prob_atypical"
PREPROCESS_IN_GRAPH = "uint8 NHWC -> float32, /255, (x-mean)/std, NHWC->NCHW"
REQUIRED = ("format", "model", "method", "preprocess", "class_names", "threshold", "threshold_rule", "precision")


# The field of view a model was trained on, so slide readers cut the same crops: every ami model so
# far is trained on the AMi-Br crops, 128 x 128 px at 0.25 um/px (40x), centred on the figure
# (Banerjee et al.; docs: benchmark-protocol.md). Artefacts exported before the ``crop`` key
# existed carry none: :meth:`ArtifactMeta.training_crop` then assumes this one and says so.
AMIBR_CROP = {"mpp": 0.25, "size_px": 128, "centred": True,
              "source": "AMi-Br crops (TUPAC16, MIDOG21): 128 x 128 px at 0.25 um/px, centred on the mitotic figure"}


class ArtifactError(ValueError):
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
    def from_json(cls, text: str) -> "ArtifactMeta":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"artefact metadata is not valid JSON: {e}") from None
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ArtifactError(f"artefact metadata lacks {', '.join(missing)}")
        if d["format"] != FORMAT:
            raise ArtifactError(f"artefact format {d['format']!r} is not {FORMAT!r}")
        d["preprocess"] = Preprocess.from_json(json.dumps(d["preprocess"]))
        d["class_names"] = tuple(d["class_names"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})
