"""Shared fixtures.

Data, in two kinds:

- ``synthetic_root`` / ``synthetic_folds_root``: generated crops in the real folder layout
  (tests/synthetic_data.py), for the tests that only need *some* crops; they run everywhere.
- ``data_root``: the real benchmark data, for the tests that need it (real counts and content
  fingerprints, the pinned folds against the real crops, the shipped model on real crops). It is
  found as every ami command finds it without --data-root: $AMI_DATA_ROOT, else the per-user
  default (``ami.runtime.datasets.resolve_data_root``). Without it those tests skip, saying where
  they looked.

Test modules whose top-level imports need a library this install lacks (torch, timm, onnx,
scikit-learn: the train, export and dev extras) are skipped whole, with the missing library named,
so the torch-free subset runs on a base install (``pip install ami-mitosis pytest``).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from ami.runtime.datasets import describe_data_root, resolve_data_root
from synthetic_data import PINNED, SMALL, make_dataset

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# what importing a package of the project needs (its extra), beyond the base install
PROJECT_NEEDS = {"ami.train": ("torch", "timm", "peft"), "ami.export": ("onnx",)}


def _data_root() -> Path | None:
    root = resolve_data_root(None)
    return root if (root / "AMi-Br").is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data (AMi-Br/, AtNorM-MD/, amibr_train_split.csv); skips with where it looked."""
    root = _data_root()
    if root is not None:
        return root
    pytest.skip(f"needs the real benchmark data: {describe_data_root(None)} holds no AMi-Br/; set AMI_DATA_ROOT "
                "to the folder holding AMi-Br/ (`ami-data download --data-root DIR` fetches it)")


def _top_level_imports(path: Path) -> list[str]:
    """Module names imported at the top level of ``path`` (not inside functions)."""
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def missing_libraries(path: Path, seen: frozenset = frozenset()) -> list[str]:
    """The libraries a test module's top-level imports need and this install lacks (following the
    tests' own helper modules, e.g. onnx_factory)."""
    out: list[str] = []
    for name in _top_level_imports(path):
        top = name.split(".")[0]
        local = TESTS / f"{top}.py"
        if local.is_file() and local not in seen:
            out += missing_libraries(local, seen | {path})
        elif top == "ami":
            needs = next((v for k, v in PROJECT_NEEDS.items() if name == k or name.startswith(k + ".")), ())
            out += [lib for lib in needs if importlib.util.find_spec(lib) is None]
        elif not local.is_file() and importlib.util.find_spec(top) is None:
            out.append(top)
    return sorted(set(out))


class _SkippedModule(pytest.Module):
    """A test module that cannot be imported on this install: one skip naming what is missing."""

    reason = ""

    def collect(self):
        pytest.skip(self.reason, allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    missing = missing_libraries(Path(module_path))
    if missing:
        mod = _SkippedModule.from_parent(parent, path=module_path)
        mod.reason = (f"{Path(module_path).name} needs {', '.join(missing)}, not installed (the train / export / dev extras: "
                      "pip install -e '.[train,export,dev]')")
        return mod
    return None


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
