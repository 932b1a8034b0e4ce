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
from ami.runtime.pixels import decode_pixels
from ami.runtime.preprocess import Preprocess


@dataclass
class CropSet:
    images: torch.Tensor  # uint8 N,H,W,3
    labels: torch.Tensor  # float32 N
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


def load_crops(samples: list[Sample], pre: Preprocess | None = None) -> CropSet:
    """Decode crops; with ``pre`` also apply its geometric part (evaluation tensors: the pixels
    :func:`ami.runtime.pixels.decode_pixels` gives an engine). Without ``pre`` the crops keep their
    native size, which must then be the same for all of them."""
    if not samples:
        images = torch.zeros(0, 1, 1, 3, dtype=torch.uint8)
    elif pre is not None:
        images = torch.from_numpy(decode_pixels([s.path for s in samples], pre))
    else:
        arrs = [np.asarray(decode_rgb(s.path), dtype=np.uint8) for s in samples]
        sizes = {a.shape for a in arrs}
        if len(sizes) > 1:  # native crops of mixed size cannot be stacked: refused, never resized silently
            raise ValueError(f"crops of different sizes {sorted(sizes)[:3]}; pass a Preprocess to resize them")
        images = torch.from_numpy(np.stack(arrs))
    labels = torch.tensor([s.label for s in samples], dtype=torch.float32)
    return CropSet(images, labels, [s.name for s in samples])


def normalize(x01: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    # on the batch's device: a CUDA batch minus a CPU [1,3,1,1] tensor is an error (only 0-dim CPU tensors mix)
    mean = torch.tensor(pre.mean, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
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
                  padding: str = "reflection", ratio: tuple[float, float] | None = None) -> torch.Tensor:
    """One grid_sample per batch: flips, rotation, zoom (crop scale) and shift, output at out_size.

    ``scale``: fraction of the crop's area kept, uniform (RandomResizedCrop's ``scale``);
    ``ratio``: aspect ratio of the kept window, log-uniform (RandomResizedCrop's ``ratio``;
    None = square window, which is also the random-number sequence of the edge recipe)."""
    b = x.shape[0]
    if any_rotation:
        ang = torch.rand(b, generator=g) * 2 * math.pi
    else:
        ang = (torch.rand(b, generator=g) * 2 - 1) * math.radians(rotate_deg)
    # zoom: `scale` is the fraction of the crop's area kept (RandomResizedCrop-like)
    area = scale[0] + torch.rand(b, generator=g) * (scale[1] - scale[0])
    if ratio is None:
        zx = zy = area.sqrt()
    else:  # a window of that area and a log-uniform aspect ratio, clipped to the crop (torchvision
        # retries such draws and falls back to a centre crop; clipping keeps one draw per crop)
        lo, hi = math.log(ratio[0]), math.log(ratio[1])
        r = torch.exp(lo + torch.rand(b, generator=g) * (hi - lo))
        zx, zy = (area * r).sqrt().clamp(max=1.0), (area / r).sqrt().clamp(max=1.0)
    fx = torch.where(torch.rand(b, generator=g) < hflip, -1.0, 1.0)
    fy = torch.where(torch.rand(b, generator=g) < vflip, -1.0, 1.0)
    tx = (torch.rand(b, generator=g) * 2 - 1) * ((1 - zx) + translate)  # stay mostly inside the crop
    ty = (torch.rand(b, generator=g) * 2 - 1) * ((1 - zy) + translate)
    c, s = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = c * zx * fx, -s * zy * fy
    theta[:, 1, 0], theta[:, 1, 1] = s * zx * fx, c * zy * fy
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta, (b, 3, out_size, out_size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def augment(batch_uint8: torch.Tensor, pre: Preprocess, policy, g: torch.Generator) -> torch.Tensor:
    """uint8 NHWC batch -> normalised float NCHW batch at ``pre.input_size``.

    ``policy``: an :class:`~ami.train.recipes.AugPolicy` or the name of one (``recipes.POLICIES``).
    ``affine``: one random affine resample of the native crop (flips, rotation, crop window), then
    stain jitter (if any) and colour jitter; ``resize``: bilinear resize only; ``eval``: the batch is
    already the evaluation preprocessing (``load_crops(samples, pre)``) and is only normalised."""
    from .recipes import POLICIES, AugPolicy

    if not isinstance(policy, AugPolicy):
        if policy not in POLICIES:
            raise ValueError(f"unknown augmentation policy {policy!r}; known: {', '.join(POLICIES)}")
        policy = POLICIES[policy]
    p = policy
    x = to_float(batch_uint8)
    if p.kind == "affine":
        x = random_affine(x, pre.input_size, g, rotate_deg=p.rotate_deg, any_rotation=p.any_rotation, hflip=p.hflip,
                          vflip=p.vflip, scale=tuple(p.crop_scale), translate=p.translate, padding=p.padding,
                          ratio=tuple(p.crop_ratio) if p.crop_ratio is not None else None)
        if p.hed_sigma or p.hed_bias:
            x = hed_jitter(x, sigma=p.hed_sigma, bias=p.hed_bias, g=g)
        if p.brightness or p.contrast or p.saturation or p.hue:
            x = color_jitter(x, p.brightness, p.contrast, p.saturation, p.hue, g)
    elif p.kind == "resize":
        if x.shape[-1] != pre.input_size:
            x = F.interpolate(x, size=(pre.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
    elif p.kind == "eval":
        if x.shape[-1] != pre.input_size or x.shape[-2] != pre.input_size:
            raise ValueError(f"augmentation 'eval' needs crops at the evaluation size {pre.input_size} "
                             f"(load them with load_crops(samples, pre)); got {tuple(x.shape[-2:])}")
    else:
        raise ValueError(f"unknown augmentation kind {p.kind!r}")
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
