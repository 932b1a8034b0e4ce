"""The linter holds: ``ruff check`` over the whole checkout (rules in pyproject.toml's [tool.ruff]) is clean.

ruff comes with the dev extra (``pip install -e '.[dev]'``); without it this test skips and says so.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed: pip install -e '.[dev]' (or pip install 'ruff>=0.17,<0.18')")
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode != 2, f"ruff could not run (configuration in pyproject.toml?):\n{res.stderr}{res.stdout}"
    assert res.returncode == 0, (f"ruff found problems; fix them (`python -m ruff check --fix .` repairs the "
                                 f"[*] ones):\n{res.stdout}{res.stderr}")
    assert "All checks passed" in res.stdout, res.stdout
