"""Deterministic class-stratified subsets of crops: the one rule every layer uses.

Used for the export's self-check, calibration and evaluation crops, the parity suite's per-set
samples and ``ami-train --max-train / --max-eval`` smoke runs. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")  # anything with a ``label`` (0 = Normal, 1 = Atypical), e.g. ami.runtime.datasets.Sample


def stratified_subset(samples: Sequence[T], n: int, seed: int = 0, min_positives: int = 1) -> list[T]:
    """``n`` of ``samples`` (all of them, in order, when n <= 0 or n >= len), drawn per class in
    proportion to the class sizes, each class's picks kept in their original order.

    The Atypical class (label 1) gets at least ``min_positives`` crops (or all it has), Normal the
    rest of ``n``. ``min_positives=2`` is what ``ami-train``'s smoke runs use (a validation subset
    with two atypical crops); everything else takes 1. Same ``seed``, same subset.
    """
    if n <= 0 or n >= len(samples):
        return list(samples)
    rng = np.random.default_rng(seed)
    pos = [s for s in samples if s.label == 1]
    neg = [s for s in samples if s.label == 0]
    k_pos = min(len(pos), max(min_positives, round(n * len(pos) / len(samples))))
    k_neg = max(0, min(len(neg), n - k_pos))
    pick = [pos[i] for i in sorted(rng.choice(len(pos), k_pos, replace=False))]
    pick += [neg[i] for i in sorted(rng.choice(len(neg), k_neg, replace=False))]
    return pick
