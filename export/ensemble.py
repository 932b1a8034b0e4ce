"""The exported graph in PyTorch: preprocessing, one or more fold networks, probability.

``DeployGraph(pixels)``: uint8 NHWC ``[N,S,S,3]`` -> float32 ``[N]`` atypical probability, the
mean over the fold networks of sigmoid(logit). Module names fix the ONNX node names, which the
int8 and fp16 steps rely on:

* ``/pre/...``    the preprocessing (cast, /255, (x-mean)/std, NHWC->NCHW), kept in float32;
* ``/folds.K/...`` fold network K (a :class:`~ami.train.models.LogitModel`);
* ``/post/...`` and other top-level nodes: sigmoid and mean, kept in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ami.runtime.preprocess import Preprocess

from .errors import ExportError
from .source import RunSource


class Preprocessing(nn.Module):
    """Exactly :meth:`Preprocess.normalize`: cast, x * (1/255), (x - mean) / std, NHWC -> NCHW."""

    def __init__(self, pre: Preprocess):
        super().__init__()
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 1, 1, 3))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 1, 1, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32) * torch.tensor(1 / 255, dtype=torch.float32)
        x = (x - self.mean) / self.std
        return x.permute(0, 3, 1, 2)


class Postprocessing(nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # [F, N] -> [N]
        return torch.sigmoid(logits.to(torch.float32)).mean(dim=0)


class DeployGraph(nn.Module):
    def __init__(self, pre: Preprocess, models: list[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("no fold model")
        self.pre = Preprocessing(pre)
        self.folds = nn.ModuleList(models)
        self.post = Postprocessing()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.pre(pixels)
        return self.post(torch.stack([m(x) for m in self.folds]))


def build_fold_model(src: RunSource, fold, weights: str | None = None) -> nn.Module:
    """The fold's network as trained (for LoRA: still unmerged), weights loaded, eval mode, float32:
    :func:`ami.train.foldmodel.load_fold_model` in timm's exportable mode (no fused attention), its
    errors as :class:`ExportError`. ``weights``: the frozen backbone of a trainable-only checkpoint
    (a local file or hf-hub id) instead of the run's weight source."""
    from ami.train.foldmodel import FoldModelError, load_fold_model

    try:
        return load_fold_model(src.run, fold, weights, exportable=True)
    except FoldModelError as e:
        raise ExportError(str(e)) from None


def fold_mean_probs(models: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """[N] float32: the mean over the fold networks of sigmoid(logit) on the normalised batch ``x``,
    what :class:`Postprocessing` computes in the graph (every PyTorch reference and runner uses it)."""
    return torch.stack([torch.sigmoid(m(x).float()) for m in models]).mean(0)


@torch.no_grad()
def reference_probs(models: list[nn.Module], pre: Preprocess, images: np.ndarray, batch: int = 32,
                    device=None, progress: Callable[[Iterable], Iterable] | None = None) -> np.ndarray:
    """PyTorch probabilities (float64 [N]) through the *training* preprocessing
    (ami.train.data.eval_batch), mean over folds: the reference an exported engine must reproduce.

    ``images``: uint8 NHWC. ``device``: where the models are (None: the CPU); ``progress`` wraps
    the iteration over the batches (e.g. a progress bar). Float32 on every device: on CUDA with TF32
    off (:func:`ami.train.loop.float32`)."""
    from ami.train import data as D
    from ami.train.loop import float32

    out = []
    steps = range(0, len(images), batch)
    with float32(torch.device(device) if device is not None else torch.device("cpu")):
        for i in (progress(steps) if progress is not None else steps):
            x = D.eval_batch(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])), pre)
            if device is not None:
                x = x.to(device)
            out.append(fold_mean_probs(models, x).cpu().double().numpy())
    return np.concatenate(out) if out else np.zeros(0)
