"""A tiny generated ami model and generated crops, for checks that need no dataset and no trained run.

The TensorRT tests and ``ami-bench gpu-check`` use them on machines that have a GPU but not the
benchmark data: :func:`tiny_onnx` exports a small random convolutional network (seeded) through
the same :class:`~ami.export.ensemble.DeployGraph` as a real export - ``/pre/...`` preprocessing,
``/folds.0/...`` network, ``/post/...`` probability - so :func:`~ami.export.tensorrt.fp16_graph`
and :func:`~ami.export.tensorrt.build_engine` see the graph shape they see in production, with
the artefact contract and metadata. :func:`synthetic_crops` makes H&E-coloured uint8 crops.
Neither says anything about accuracy; they exercise the engines.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ami.runtime.artifact import INPUT_NAME, OUTPUT_NAME, ArtifactMeta
from ami.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

TINY_SIZE = 64


def tiny_preprocess(input_size: int = TINY_SIZE) -> Preprocess:
    return Preprocess(input_size=input_size, resize=None, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def tiny_network(seed: int = 0, input_size: int = TINY_SIZE):
    """conv-BN-ReLU x3 (one depthwise), global max pool, linear -> one logit per crop, shape [N]; BatchNorm
    statistics and the head are calibrated on generated crops (fp16 stays within ~1e-3 of fp32)."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 16, 3, stride=1, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.head = nn.Linear(32, 1)

        def forward(self, x):
            return self.head(self.features(x).amax(dim=(2, 3)))[:, 0]

    g = torch.Generator().manual_seed(seed)
    net = Tiny()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim > 1:  # He initialisation: activations keep their scale through the ReLUs
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            elif name.endswith("weight"):  # BatchNorm scale
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        # BatchNorm statistics of generated crops (as after training: normalised activations), then
        # centre and spread the logits so probabilities cover (0, 1) without saturating
        x = torch.from_numpy(synthetic_crops(64, input_size, seed=seed + 1000)).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the calibration pass
        net.train()
        net.features(x)
        net.eval()
        z = net(x)
        net.head.weight.mul_(1.0 / float(z.std().clamp_min(1e-6)))
        net.head.bias.sub_(float(net(x).mean()))
    return net


def tiny_meta(pre: Preprocess, **kw) -> ArtifactMeta:
    return ArtifactMeta(model="tiny-generated", method="full", preprocess=pre, threshold=0.5,
                        threshold_rule="default 0.5 (generated model)", precision="fp32",
                        display="tiny generated network [RANDOM WEIGHTS: engine checks only]", folds=[0],
                        extra={"generated_by": "ami.export.synthetic.tiny_onnx"}, **kw)


def tiny_onnx(path: str | Path, *, input_size: int = TINY_SIZE, seed: int = 0, opset: int = 17) -> tuple[Path, object]:
    """Export the tiny network as a checked ami ONNX model at ``path``; returns (path, torch DeployGraph)."""
    import onnx
    import torch

    from .checks import validate_contract
    from .ensemble import DeployGraph
    from .onnx_file import write_model

    pre = tiny_preprocess(input_size)
    graph = DeployGraph(pre, [tiny_network(seed, input_size)]).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_name(path.name + ".raw")
    x = torch.from_numpy(synthetic_crops(2, input_size, seed=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (x,), str(raw), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                          do_constant_folding=True)
    try:
        write_model(onnx.load(str(raw)), path, tiny_meta(pre, versions={"torch": torch.__version__}))
    finally:
        raw.unlink(missing_ok=True)
    validate_contract(path)
    return path, graph


def synthetic_crops(n: int, size: int = TINY_SIZE, seed: int = 0) -> np.ndarray:
    """``n`` uint8 NHWC RGB crops with H&E colours: pink stroma, purple nuclei-like blobs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, size, size, 3), np.uint8)
    pink = np.array([230, 170, 200], np.float32)
    purple = np.array([90, 50, 140], np.float32)
    for i in range(n):
        w = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(size / 12, size / 4)
            w = np.maximum(w, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
        stain = rng.uniform(0.55, 1.15, 3).astype(np.float32)  # per-crop stain and brightness variation
        img = (pink[None, None] * (1 - w[..., None]) + purple[None, None] * w[..., None]) * stain
        img += rng.normal(0, 12, img.shape).astype(np.float32)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out
