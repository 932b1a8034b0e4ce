"""Shared fixtures.

Data, in two kinds:

- ``synthetic_root`` / ``synthetic_folds_root``: generated crops in the real folder layout
  (tests/synthetic_data.py), for the tests that only need *some* crops; they run everywhere.
- ``data_root``: the real benchmark data, for the tests that need it (real counts and content
  fingerprints, the pinned folds against the real crops, the shipped model on real crops). It is
  found through the project's own data-root setting: --data-root is not a pytest option, so tests
  read $AMI_DATA_ROOT, falling back to the copy beside a checkout (../shared/data/ami-br-benchmark),
  which is where CI places it. Without it those tests skip, naming the folder they looked for.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from synthetic_data import PINNED, SMALL, make_dataset

REPO = Path(__file__).resolve().parents[1]
CI_DATA = Path("..") / "shared" / "data" / "ami-br-benchmark"  # beside the checkout


def _data_root() -> Path | None:
    env = os.environ.get("AMI_DATA_ROOT")
    if env:
        return Path(env)
    cand = REPO.parent / "shared" / "data" / "ami-br-benchmark"
    return cand if cand.is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data (AMi-Br/, AtNorM-MD/, amibr_train_split.csv); skips with where it looked."""
    root = _data_root()
    if root is None:
        where = f"AMI_DATA_ROOT is unset and there is no {CI_DATA} beside the checkout"
    elif not (root / "AMi-Br").is_dir():
        where = f"{root / 'AMi-Br'} does not exist (AMI_DATA_ROOT={os.environ.get('AMI_DATA_ROOT', '(unset)')})"
    else:
        return root
    pytest.skip(f"needs the real benchmark data: {where}; set AMI_DATA_ROOT to the folder holding AMi-Br/ "
                "(`ami-data download --data-root DIR` fetches it)")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A few dozen generated crops in the real layout: AMi-Br (training part listed in its own
    amibr_train_split.csv, 10 slides) and AtNorM-MD; AtNorM-Br absent, as in the CI copy. Counts:
    synthetic_data.SMALL. Not the pinned folds' crops: ``ami-train`` refuses it (use synthetic_folds_root)."""
    return make_dataset(tmp_path_factory.mktemp("synthetic-data"), SMALL)


@pytest.fixture(scope="session")
def synthetic_folds_root(tmp_path_factory) -> Path:
    """Generated crops whose AMi-Br training part is exactly the pinned folds' 2894 crops (names,
    labels, slides), so the training, export and parity code runs on it without the real data;
    AMi-Br test and AtNorM-MD of 80 and 96 crops (synthetic_data.PINNED), AtNorM-Br absent."""
    return make_dataset(tmp_path_factory.mktemp("synthetic-folds-data"), PINNED)


@pytest.fixture(params=["synthetic", "real"])
def folds_root(request) -> Path:
    """Both trees that hold the pinned folds' training crops: the generated one (always) and the
    real data (skips without it)."""
    return request.getfixturevalue("synthetic_folds_root" if request.param == "synthetic" else "data_root")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (the machine is shared; the results do not depend on it),
    restored afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
