"""The exported graph in PyTorch: preprocessing, one or more fold networks, probability.

``DeployGraph(pixels)``: uint8 NHWC ``[N,S,S,3]`` -> float32 ``[N]`` atypical probability, the
mean over the fold networks of sigmoid(logit). Module names fix the ONNX node names, which the
int8 and fp16 steps rely on:

* ``/pre/...``    the preprocessing (cast, /255, (x-mean)/std, NHWC->NCHW), kept in float32;
* ``/folds.K/...`` fold network K (a :class:`~ami.train.models.LogitModel`);
* ``/post/...`` and other top-level nodes: sigmoid and mean, kept in float32.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ami.runtime.preprocess import Preprocess

from . import ExportError
from .source import RunSource

NETWORK_PREFIX = "/folds."


def is_network_node(name: str) -> bool:
    return name.startswith(NETWORK_PREFIX)


def is_io_node(name: str) -> bool:
    """Pre-/post-processing nodes (top-level scope), which stay float32 in int8 and fp16 graphs."""
    return name.startswith("/") and not name.startswith(NETWORK_PREFIX)


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


def _is_partial(path) -> bool:
    """True when the checkpoint holds only the trained tensors (linear/LoRA on pretrained weights)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("contents") == "trainable"
    except Exception as e:  # safetensors raises its own errors for corrupt files
        raise ExportError(f"{path}: unreadable weights ({type(e).__name__}: {e})") from None


def build_fold_model(src: RunSource, fold, weights: str | None = None, log=print) -> nn.Module:
    """The fold's network as trained (for LoRA: still unmerged), weights loaded, eval mode, float32.

    Built in timm's exportable mode (no fused attention). A complete checkpoint needs no weight
    source (random init, then every tensor from best.safetensors); a trainable-only checkpoint
    (linear/LoRA on pretrained weights) gets its frozen backbone from the run's weight source,
    or from ``weights`` (a local file or hf-hub id) when given.
    """
    from timm.layers import set_layer_config

    from ami.train.fit import load_weights
    from ami.train.models import WeightsUnavailable, create

    cfg = src.cfg
    c = src.config
    r = c.get("recipe") or {}
    lora_kw = {k: r[k] for k in ("lora_rank", "lora_alpha", "lora_dropout") if k in r}
    path = src.weights(fold)
    partial = _is_partial(path)
    if partial:
        random_init = bool(c.get("random_init"))
        ws = c.get("weights_source")
        w = weights or (ws if ws and ws != cfg.hub_id and not str(ws).startswith("random init") else None)
    else:
        random_init, w = True, None
    try:
        with set_layer_config(exportable=True):
            model = create(cfg, src.method, weights=w, random_init=random_init, tiny=src.tiny, **lora_kw)
    except WeightsUnavailable as e:
        raise ExportError(f"{path} holds only the trained tensors; the frozen backbone must come from its weight "
                          f"source, which is not reachable here: {e} (pass --weights LOCAL_FILE)") from None
    except ImportError as e:
        raise ExportError(f"cannot build {cfg.name}/{src.method}: {e}") from None
    try:
        load_weights(model, path)
    except (RuntimeError, KeyError) as e:
        first = "; ".join(str(e).splitlines()[:3])
        raise ExportError(f"{path}: these weights do not fit {cfg.name}/{src.method}"
                          f"{' (tiny stand-in)' if src.tiny else ''} as config.json describes it: {first[:400]}") from None
    except Exception as e:  # safetensors raises its own errors for corrupt files
        raise ExportError(f"{path}: unreadable weights ({type(e).__name__}: {e})") from None
    return model.float().eval()


@torch.no_grad()
def reference_probs(models: list[nn.Module], pre: Preprocess, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """PyTorch probabilities through the *training* preprocessing (ami.train.data.eval_batch),
    mean over folds: the reference the exported graph must reproduce."""
    from ami.train import data as D

    out = []
    for i in range(0, len(images), batch):
        x = D.eval_batch(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])), pre)
        p = torch.stack([torch.sigmoid(m(x).float()) for m in models]).mean(0)
        out.append(p)
    return torch.cat(out).double().numpy() if out else np.zeros(0)
