"""Crops in memory and batched augmentation on tensors.

All crops of a split are decoded once (Pillow, through the runtime's own decoder) into one uint8
NHWC tensor. Evaluation tensors are made by :meth:`Preprocess.to_uint8`, the very function the
runtime uses, so PyTorch evaluation and exported engines see identical pixels. Training
augmentation runs on whole batches (one affine ``grid_sample`` + colour ops), which keeps two
CPU cores busy with the network instead of with per-image PIL transforms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ami.runtime.datasets import Sample
from ami.runtime.imageio import decode_rgb
from ami.runtime.preprocess import Preprocess


@dataclass
class CropSet:
    images: torch.Tensor  # uint8 N,H,W,3
    labels: torch.Tensor  # float32 N
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


def load_crops(samples: list[Sample], pre: Preprocess | None = None) -> CropSet:
    """Decode crops; with ``pre`` also apply its geometric part (evaluation tensors)."""
    arrs = []
    for s in samples:
        im = decode_rgb(s.path)
        arrs.append(pre.to_uint8(im) if pre is not None else np.asarray(im, dtype=np.uint8))
    sizes = {a.shape for a in arrs}
    if len(sizes) > 1:  # native crops of mixed size: bring them to the most common one
        raise ValueError(f"crops of different sizes {sorted(sizes)[:3]}; pass a Preprocess to resize them")
    images = torch.from_numpy(np.stack(arrs)) if arrs else torch.zeros(0, 1, 1, 3, dtype=torch.uint8)
    labels = torch.tensor([s.label for s in samples], dtype=torch.float32)
    return CropSet(images, labels, [s.name for s in samples])


def normalize(x01: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    mean = torch.tensor(pre.mean, dtype=x01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - mean) / std


def to_float(batch_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    return batch_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)


# --- colour ---------------------------------------------------------------------------------
# Ruifrok & Johnston H&E-DAB stain matrix (rows: H, E, D optical densities)
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def hed_jitter(x: torch.Tensor, sigma: float, bias: float, g: torch.Generator) -> torch.Tensor:
    """Stain augmentation (Tellez et al.): scale and shift each HED channel's optical density."""
    b = x.shape[0]
    od = -torch.log(x.clamp_min(1e-6)).permute(0, 2, 3, 1)  # B,H,W,3
    hed = od @ _HED_FROM_RGB
    alpha = 1 + (torch.rand(b, 1, 1, 3, generator=g) * 2 - 1) * sigma
    beta = (torch.rand(b, 1, 1, 3, generator=g) * 2 - 1) * bias
    od = (hed * alpha + beta) @ _RGB_FROM_HED
    return torch.exp(-od).clamp(0, 1).permute(0, 3, 1, 2)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float,
                 g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]

    def factor(amount):
        return 1 + (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * amount

    if brightness:
        x = x * factor(brightness)
    if contrast:
        m = _gray(x).mean(dim=(2, 3), keepdim=True)
        x = (x - m) * factor(contrast) + m
    if saturation:
        gr = _gray(x)
        x = (x - gr) * factor(saturation) + gr
    if hue:  # rotation of the chroma plane in YIQ space, angle = hue * 2 pi
        ang = (torch.rand(b, generator=g) * 2 - 1) * hue * 2 * math.pi
        c, s = torch.cos(ang), torch.sin(ang)
        yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        rgb = torch.linalg.inv(yiq)
        rot = torch.zeros(b, 3, 3)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
        m = rgb @ rot @ yiq  # B,3,3
        x = torch.einsum("bij,bjhw->bihw", m, x)
    return x.clamp(0, 1)


# --- geometry -------------------------------------------------------------------------------
def random_affine(x: torch.Tensor, out_size: int, g: torch.Generator, *, rotate_deg: float, any_rotation: bool,
                  hflip: float, vflip: float, scale: tuple[float, float], translate: float,
                  padding: str = "reflection") -> torch.Tensor:
    """One grid_sample per batch: flips, rotation, zoom (crop scale) and shift, output at out_size."""
    b = x.shape[0]
    if any_rotation:
        ang = torch.rand(b, generator=g) * 2 * math.pi
    else:
        ang = (torch.rand(b, generator=g) * 2 - 1) * math.radians(rotate_deg)
    # zoom: `scale` is the fraction of the crop's area kept (RandomResizedCrop-like)
    area = scale[0] + torch.rand(b, generator=g) * (scale[1] - scale[0])
    z = area.sqrt()
    fx = torch.where(torch.rand(b, generator=g) < hflip, -1.0, 1.0)
    fy = torch.where(torch.rand(b, generator=g) < vflip, -1.0, 1.0)
    max_shift = (1 - z) + translate  # stay mostly inside the crop
    tx = (torch.rand(b, generator=g) * 2 - 1) * max_shift
    ty = (torch.rand(b, generator=g) * 2 - 1) * max_shift
    c, s = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = c * z * fx, -s * z * fy
    theta[:, 1, 0], theta[:, 1, 1] = s * z * fx, c * z * fy
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta, (b, 3, out_size, out_size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def augment(batch_uint8: torch.Tensor, pre: Preprocess, policy: str, g: torch.Generator) -> torch.Tensor:
    """uint8 NHWC batch -> normalised float NCHW batch at ``pre.input_size``."""
    x = to_float(batch_uint8)
    if policy == "edge":
        # mitoses have no orientation: any rotation + flips (covers the 8-fold dihedral group)
        x = random_affine(x, pre.input_size, g, rotate_deg=0, any_rotation=True, hflip=0.5, vflip=0.0,
                          scale=(0.8, 1.0), translate=0.06)
        x = hed_jitter(x, sigma=0.05, bias=0.05, g=g)
        x = color_jitter(x, 0.15, 0.15, 0.15, 0.02, g)
    elif policy == "paper":
        # the paper: h-flip, rotation <= 15 deg, colour jitter 0.2/0.2/0.2/0.1, RRC scale 0.8-1
        x = random_affine(x, pre.input_size, g, rotate_deg=15, any_rotation=False, hflip=0.5, vflip=0.0,
                          scale=(0.8, 1.0), translate=0.0, padding="zeros")
        x = color_jitter(x, 0.2, 0.2, 0.2, 0.1, g)
    elif policy == "none":
        if x.shape[-1] != pre.input_size:
            x = F.interpolate(x, size=(pre.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
    else:
        raise ValueError(f"unknown augmentation policy {policy!r}")
    return normalize(x, pre)


def eval_batch(batch_uint8: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 NHWC at input size (from Preprocess.to_uint8) -> normalised float NCHW."""
    return normalize(to_float(batch_uint8), pre)


def balanced_indices(labels: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """Weighted random sampling with weights inverse to class frequency (with replacement)."""
    y = labels.long()
    counts = torch.bincount(y, minlength=2).float()
    w = (1.0 / counts.clamp_min(1))[y]
    return torch.multinomial(w, n, replacement=True, generator=g)
