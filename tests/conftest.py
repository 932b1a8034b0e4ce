"""Shared fixtures. The real data is found through the project's own data-root setting:
--data-root is not a pytest option, so tests read $AMI_DATA_ROOT, falling back to the copy
beside a checkout (../shared/data/ami-br-benchmark), which is where CI places it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path | None:
    env = os.environ.get("AMI_DATA_ROOT")
    if env:
        return Path(env)
    cand = REPO.parent / "shared" / "data" / "ami-br-benchmark"
    return cand if cand.is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if root is None or not (root / "AMi-Br").is_dir():
        pytest.skip("real data not found: set AMI_DATA_ROOT to the folder holding AMi-Br/")
    return root
