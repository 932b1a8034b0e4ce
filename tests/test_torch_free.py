"""The base install (`pip install ami`, no extras) runs ami-infer without torch, timm or peft.

Two proofs, each running the real command in a fresh interpreter on real files:

1. An import guard: a meta-path hook that refuses torch / torchvision / timm / peft and records any
   attempt, even one a library would swallow with ``try: import torch``.
2. A minimal environment: a folder holding only the base dependencies declared in pyproject.toml
   and their own requirements (resolved from the installed distributions' metadata), with the
   ``ami.runtime`` source; the interpreter runs with ``-I -S`` so no site-packages are visible.
   torch is then not merely unused but absent, and a missing base dependency would fail here too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import tomllib
from PIL import Image

from onnx_factory import write_model

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "timm", "peft")

GUARD = r"""
import sys, atexit, importlib.abc
BLOCKED = {blocked!r}
attempts = []
class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError("torch-free guard refused " + name)
sys.meta_path.insert(0, Guard())
def report():
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    sys.stderr.write("\nGUARD attempts=%r loaded=%r\n" % (attempts, loaded))
atexit.register(report)
"""

RUN = r"""
from ami.runtime.cli.infer import main
sys.argv = ["ami-infer", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("tf")
    (d / "crops").mkdir()
    rng = __import__("numpy").random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype="uint8")).save(d / "crops" / f"c{i}.png")
    Image.fromarray(rng.integers(0, 256, (90, 90), dtype="uint8")).save(d / "crops" / "grey_small.tif")
    model = write_model(d / "tiny.onnx")
    return d, model


def _args(d: Path, model: Path, out: str) -> list[str]:
    return [str(d / "crops"), "--model", str(model), "-o", str(d / out), "--workers", "2", "--no-progress"]


def _check(r: subprocess.CompletedProcess, out: Path) -> None:
    assert r.returncode == 0, r.stdout + r.stderr
    assert "GUARD attempts=[] loaded=[]" in r.stderr, r.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 7 and all(",ok," in ln for ln in lines[1:])


def test_ami_infer_never_imports_torch(job):
    d, model = job
    code = GUARD.format(blocked=BLOCKED) + RUN
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, *_args(d, model, "guard.csv")],
                       capture_output=True, text=True, timeout=300, env=env)
    _check(r, d / "guard.csv")


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def base_closure() -> dict:
    """The installed distributions a base install needs: pyproject's dependencies, recursively."""
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [Requirement(x).name for x in deps]
    seen: dict = {}
    while todo:
        name = _canon(todo.pop())
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            pytest.skip(f"base dependency {name} is not installed here")
        seen[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra or another platform
            todo.append(req.name)
    return seen


def _farm(root: Path) -> list[str]:
    """Symlink the top-level modules of the base closure, and ami.runtime, into ``root``."""
    names = []
    for name, dist in sorted(base_closure().items()):
        names.append(name)
        tops = set()
        for f in dist.files or []:
            first = f.parts[0]
            if first in ("..", "__pycache__") or first.endswith((".dist-info", ".egg-info", ".pth")):
                continue
            tops.add(first)
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (root / top).exists():
                os.symlink(src, root / top)
    (root / "ami").mkdir()  # PEP 420 namespace, as installed
    os.symlink(REPO / "runtime", root / "ami" / "runtime")
    return names


def test_base_environment_runs_ami_infer_without_torch(job, tmp_path):
    d, model = job
    site = tmp_path / "site"
    site.mkdir()
    dists = _farm(site)
    assert not any(n in dists for n in BLOCKED), f"a base dependency pulls in torch: {dists}"
    code = (f"import sys\nsys.path[:0] = [{str(site)!r}]\n"
            + "import importlib.util\n"
            + "assert importlib.util.find_spec('torch') is None, 'torch visible in the base environment'\n"
            + GUARD.format(blocked=BLOCKED) + RUN)
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code, *_args(d, model, "base.csv")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    _check(r, d / "base.csv")


def test_runtime_sources_do_not_import_torch():
    """A cheap static check on top of the two runs: no runtime module names a forbidden package
    in an import statement (the runs only cover the code paths they execute)."""
    import ast

    offenders = []
    for py in (REPO / "runtime").rglob("*.py"):
        tree = ast.parse(py.read_text(), str(py))
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            offenders += [f"{py.relative_to(REPO)}: {m}" for m in mods if m.split(".")[0] in BLOCKED]
    assert not offenders, offenders
