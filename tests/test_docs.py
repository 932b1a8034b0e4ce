"""The documentation: the site builds strictly, README.md is current and is the front door, CI runs
exactly the README's test command, user docs carry no build history, and the install name is one.

The examples themselves are run by tests/test_docs_examples.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# The pages this layer writes (the others' owners keep their own: architecture, guarantees,
# evaluate, reproduce); checked for issue numbers, build-history wording and machine paths.
USER_PAGES = [README] + [REPO / "docs" / f"{n}.md" for n in (
    "index", "getting-started", "install", "engines", "slides", "api", "exit-codes", "edge-model",
    "benchmarks", "export", "gpu", "naming", "changelog", "contributing-docs")]


def load_hooks():
    spec = importlib.util.spec_from_file_location("ami_docs_hooks", REPO / "docs" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_site_builds_strictly(tmp_path):
    for mod in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "pymdownx"):
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            pytest.skip(f"{mod} is not installed (pip install -e '.[docs]')")
    got = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert got.returncode == 0, f"mkdocs build --strict failed:\n{got.stdout[-3000:]}\n{got.stderr[-3000:]}"
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "classify_arrays" in api and "load_engine" in api, "the API reference lost ami.runtime.api or engines"
    codes = (tmp_path / "site" / "exit-codes" / "index.html").read_text(encoding="utf-8")
    from ami.runtime.errors import EXIT_CODES
    for code in EXIT_CODES:
        assert f"<td>{code}</td>" in codes, f"exit code {code} is missing from the generated exit-code page"


def test_readme_generated_blocks_are_current():
    hooks = load_hooks()
    text = README.read_text(encoding="utf-8")
    names = {m[1] for m in hooks.README_BLOCK.findall(text)}
    assert names >= {"headline", "install-sizes"}, f"README.md lost a generated block; it has {sorted(names)}"
    assert hooks.render_readme(text) == text, "README.md is out of date with the results files: run python docs/hooks.py"


def test_headline_names_the_machine_and_comes_from_the_records():
    hooks = load_hooks()
    table = hooks.headline()
    lat = hooks._json(hooks.LATENCY)
    assert hooks.machine_name(lat) in table and lat["machine"]["cpu"] in table
    ort = hooks._row(lat, "ONNX Runtime", "edge.onnx", "fp32", 64)["stats"]["crops_per_s"]
    assert f"{ort:,.0f}" in table


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines; move detail to docs/"
    for section in ("## Two commands", "## Install", "## What you can do", "## Headline numbers", "## Documentation"):
        assert section in text, f"README.md lost its section {section!r}"
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        page = REPO / link
        owned_elsewhere = page.name in load_hooks().PENDING
        assert page.is_file() or owned_elsewhere, f"README.md links to {link}, which does not exist"


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    cmd = [ln for ln in ci.splitlines() if ln.strip() and not ln.startswith(("#", "set ", "cd ", "export AMI_DATA_ROOT="))]
    assert len(cmd) == 1, f".ci/run should run one command line, found {cmd}"
    shown = cmd[0].replace("pip install -q ", "pip install ")
    assert f"\n{shown}\n" in README.read_text(encoding="utf-8"), (
        f"README.md does not show .ci/run's command as a line of its own: {shown}")


@pytest.mark.parametrize("page", USER_PAGES, ids=lambda p: p.name)
def test_user_page_has_no_build_history(page):
    text = page.read_text(encoding="utf-8")
    bad = {
        "an issue number": r"\bissues? #?\d+",
        "'here' (name the machine instead)": r"\bhere\b",
        "a path of the build machine": r"/work/|\.\./shared|/root/|/home/",
        "the old install name": r"pip install (?:-e )?'?ami(?:\[|\s|$)",
    }
    if page.name == "naming.md":  # the page that explains the old name
        del bad["the old install name"]
    for what, rx in bad.items():
        m = re.search(rx, text, flags=re.I | re.M)
        assert m is None, f"{page.relative_to(REPO)} has {what}: {text[max(0, m.start() - 60):m.end() + 60]!r}"


def test_distribution_name_is_one_name():
    tomllib = pytest.importorskip("tomllib", reason="tomllib comes with Python 3.11")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    from ami.runtime import DIST_NAME

    assert meta["project"]["name"] == DIST_NAME
    code = [p for layer in ("runtime", "train", "export", "bench") for p in (REPO / layer).rglob("*.py")]
    for p in code:
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            assert not re.search(r"pip install '?ami\[", line), f"{p.relative_to(REPO)}:{n} hard-codes the old name: {line}"


def test_wheel_leaves_out_the_pytorch_weights(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel", reason="building a wheel needs the wheel package")
    got = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assets = {n.rsplit("/", 1)[-1] for n in names if "/runtime/assets/" in n}
    assert {"edge.onnx", "edge-int8.onnx", "edge-card.json"} <= assets, sorted(assets)
    assert "edge.safetensors" not in assets, "the base wheel carries the PyTorch weights (19 MB) again"
