"""The plain reference loop that ``ami-infer`` is measured against.

This is how the public benchmark scripts (and most research code) classify a folder of crops:
``PIL.Image.open(path).convert("RGB")``, torchvision ``Resize`` / ``ToTensor`` / ``Normalize``, a
``torch.utils.data.DataLoader`` with worker processes, and the PyTorch model in eager mode. It is
deliberately *not* optimised: it is the baseline of the end-to-end ratio in
``ami-bench latency``. The transforms follow the model's own :class:`Preprocess` (size,
interpolation, mean, std), so both pipelines compute the same function and their predictions are
compared crop by crop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ami.runtime.preprocess import Preprocess


def reference_transform(pre: Preprocess):
    """torchvision transforms equivalent to ``pre``: Resize (+ CenterCrop), ToTensor, Normalize."""
    from torchvision import transforms as T

    interp = T.InterpolationMode[pre.interpolation.upper()]
    s = pre.input_size
    if pre.resize is None:
        geometry = [T.Resize((s, s), interpolation=interp)]
    else:
        geometry = [T.Resize(pre.resize, interpolation=interp), T.CenterCrop(s)]
    return T.Compose(geometry + [T.ToTensor(), T.Normalize(list(pre.mean), list(pre.std))])


class CropFolder(torch.utils.data.Dataset):
    """A list of crop files read with PIL, as the public scripts do."""

    def __init__(self, paths: Sequence[str | Path], transform):
        self.paths = [str(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), i


@dataclass
class ReferenceResult:
    paths: list[str]
    probs: np.ndarray  # float64 [N], P(Atypical), in the order of ``paths``
    elapsed_s: float
    batch_size: int
    workers: int
    device: str

    @property
    def crops_per_s(self) -> float:
        return len(self.paths) / self.elapsed_s if self.elapsed_s > 0 else 0.0


def reference_loop(paths: Sequence[str | Path], models: list[torch.nn.Module], pre: Preprocess, *, batch_size: int = 64,
                   workers: int = 2, device: str = "cpu") -> ReferenceResult:
    """Classify ``paths`` the plain way; a fold ensemble is the mean of the fold probabilities.

    The time covers the whole loop: DataLoader start-up (its worker processes), decoding,
    transforms, batching, the forward passes and the copy of the results to numpy.
    """
    from ami.export.ensemble import fold_mean_probs

    dev = torch.device(device)
    models = [m.eval().to(dev) for m in models]
    loader = torch.utils.data.DataLoader(CropFolder(paths, reference_transform(pre)), batch_size=batch_size,
                                         shuffle=False, num_workers=max(0, int(workers)))
    out = np.empty(len(paths), np.float64)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, idx in loader:
            x = x.to(dev, non_blocking=True)
            out[idx.numpy()] = fold_mean_probs(models, x).cpu().double().numpy()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - t0
    return ReferenceResult([str(p) for p in paths], out, elapsed, batch_size, max(0, int(workers)), str(dev))
