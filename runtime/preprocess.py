"""Preprocessing specification and its torch-free implementation.

A :class:`Preprocess` travels with a model: the registry defines it, training uses it, and every
exported artefact carries it in its metadata, so training, export and runtime cannot disagree.

Split of work in an exported graph: the graph takes ``uint8`` NHWC pixels at the model's input
size and does the cast, the normalisation and the NHWC->NCHW transpose itself. What stays outside
is decoding and the geometric part (resize + centre crop), done here with Pillow exactly as the
training pipeline does it (torchvision's PIL path).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    input_size: int = 224  # square model input, pixels
    resize: int | None = None  # shorter side before the centre crop; None = straight to input_size
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.interpolation not in _INTERP:
            raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {self.interpolation!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    # -- geometric part (host side) -------------------------------------------------------
    def needs_resize(self, width: int, height: int) -> bool:
        return not (width == height == self.input_size and self.resize in (None, self.input_size))

    def geometry(self, im: Image.Image) -> Image.Image:
        """Resize (shorter side) + centre crop to ``input_size``; identity for native-size crops."""
        if not self.needs_resize(*im.size):
            return im
        interp = _INTERP[self.interpolation]
        if self.resize is None:
            return im.resize((self.input_size, self.input_size), interp)
        w, h = im.size
        s = self.resize / min(w, h)
        nw, nh = max(self.input_size, round(w * s)), max(self.input_size, round(h * s))
        im = im.resize((nw, nh), interp)
        left, top = (nw - self.input_size) // 2, (nh - self.input_size) // 2
        return im.crop((left, top, left + self.input_size, top + self.input_size))

    def to_uint8(self, im: Image.Image) -> np.ndarray:
        """An RGB PIL image -> HWC uint8 array at the model's input size."""
        return np.asarray(self.geometry(im), dtype=np.uint8)

    # -- photometric part (in the graph; here for reference and for the PyTorch side) -----
    def normalize(self, batch_nhwc_uint8: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 NCHW normalised, the same arithmetic the exported graph does."""
        x = batch_nhwc_uint8.astype(np.float32) * np.float32(1 / 255)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
