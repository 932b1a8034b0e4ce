"""Merging a LoRA fold model into plain backbone weights, checked on real crops.

The merge itself is :func:`ami.train.adapt.merge_lora` (PEFT ``merge_and_unload`` in float32);
this module refuses a merge whose output differs from the unmerged model's by more than
``tol`` (max |delta probability|, float32) on real AMi-Br training crops, and says by how much.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from ami.runtime.preprocess import Preprocess

from .errors import CheckFailed, ExportError

MERGE_TOL = 1e-5


def merge_lora_checked(model: nn.Module, pre: Preprocess, images: np.ndarray, tol: float = MERGE_TOL,
                       what: str = "LoRA merge") -> tuple[nn.Module, dict]:
    """(merged LogitModel, report). Raises CheckFailed when merged and unmerged disagree."""
    try:
        from ami.train.adapt import merge_lora
    except ImportError as e:
        raise ExportError(f"exporting a LoRA run needs ami.train.adapt.merge_lora, which is not available ({e})") from None
    from .ensemble import reference_probs

    model = model.float().eval()
    before = reference_probs([model], pre, images)
    merged = merge_lora(model).float().eval()
    leftover = [n for n, _ in merged.named_modules() if "lora_" in n]
    if leftover:
        raise CheckFailed(f"{what}: the merged model still holds LoRA modules ({leftover[:3]} ...)")
    after = reference_probs([merged], pre, images)
    diff = float(np.max(np.abs(after - before))) if before.size else 0.0
    report = {"merged": True, "dtype": "float32", "n_crops": int(before.size), "max_abs_diff": diff, "tolerance": tol}
    if not diff <= tol:
        raise CheckFailed(f"{what}: merged and unmerged models differ by max |delta probability| {diff:.3g} "
                          f"on {before.size} AMi-Br training crops (tolerance {tol:g}); refusing to export")
    return merged, report
