"""The Python API (ami.runtime.api): the rows of the command line, for arrays, files and slides;
bad items are error rows; and the README's slide example runs as written and prints what it shows."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ami.runtime.api import ARRAY_COLUMNS, Classifier
from ami.runtime.cli.infer import app
from ami.runtime.engines import ASSETS
from ami.runtime.infer import COLUMNS, InputError

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ASSETS / "samples").glob("*.png"))


@pytest.fixture(scope="module")
def clf():
    return Classifier(provider="cpu", threads=1, workers=2)


def test_arrays_and_files_give_the_same_rows_as_the_command_line(clf, tmp_path):
    files = clf.classify_files([str(p) for p in SAMPLES])
    assert [tuple(r) for r in files] == [COLUMNS] * len(SAMPLES)
    assert [r["path"] for r in files] == [str(p) for p in SAMPLES] and all(r["status"] == "ok" for r in files)
    # the command line, on the same files, writes the same rows
    out = tmp_path / "cli.jsonl"
    r = CliRunner().invoke(app, [*map(str, SAMPLES), "-o", str(out), "--no-progress", "--threads", "1",
                                      "--provider", "cpu"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == files
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in SAMPLES])
    rows = clf.classify_arrays(arrays, ids=[p.name for p in SAMPLES])
    assert [tuple(r) for r in rows] == [ARRAY_COLUMNS] * len(SAMPLES)
    assert [(r["prob_atypical"], r["label"]) for r in rows] == [(r["prob_atypical"], r["label"]) for r in files]
    assert [r["id"] for r in rows] == [p.name for p in SAMPLES]


def test_bad_arrays_are_error_rows_and_other_sizes_are_resized(clf):
    good = np.asarray(Image.open(SAMPLES[0]).convert("RGB"))
    big = np.asarray(Image.fromarray(good).resize((256, 256), Image.Resampling.BICUBIC))
    rows = clf.classify_arrays([good, good.astype(np.float32), good[..., 0], big, np.zeros((0, 5, 3), np.uint8)])
    assert [r["status"] for r in rows] == ["ok", "error", "error", "ok", "error"]
    assert "uint8 [H, W, 3]" in rows[1]["error"] and "uint8 [H, W, 3]" in rows[2]["error"]
    assert rows[1]["prob_atypical"] is None and rows[1]["label"] is None
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert clf.classify_arrays([]) == []
    with pytest.raises(InputError, match=r"^2 ids for 1 crops$"):
        clf.classify_arrays([good], ids=["a", "b"])


def _block(kind: str) -> str:
    text = (REPO / "docs" / "slides.md").read_text()
    m = re.search(rf"<!-- slide-example:{kind} -->\n```{kind}\n(.*?)```", text, re.S)
    assert m, f"the README's slide example ({kind}) is missing"
    return m.group(1)


def test_readme_slide_example_runs_as_written(tmp_path):
    pytest.importorskip("openslide", reason="the slides extra is not installed (pip install -e '.[slides]')")
    pytest.importorskip("tifffile", reason="the slides extra is not installed (pip install -e '.[slides]')")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    printed = []
    for line in _block("bash").splitlines():
        cmd = line.split("#")[0].strip()
        if not cmd or cmd.startswith("pip install"):  # installed already (this is the test environment)
            continue
        argv = shlex.split(cmd)
        if argv[0] == "python":
            argv[0] = sys.executable
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        printed.append(r.stdout)
    # what the README shows it prints (all but the timing line) is what it prints
    text = (REPO / "docs" / "slides.md").read_text()
    shown = re.search(r"<!-- slide-example:bash -->\n```bash\n.*?```\n.*?```console\n(.*?)```", text, re.S).group(1)
    for want in shown.splitlines()[1:]:  # after the `$ ` command line; `...` stands for the timing lines
        assert want == "..." or want in printed[-1], (want, printed[-1])
    # and the Python example, in the same folder
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ns: dict = {}
        exec(compile(_block("python"), "README.md (slide example)", "exec"), ns)
    finally:
        os.chdir(cwd)
    assert ns["rows"][0]["status"] == "ok" and ns["rows"][0]["id"] == "a"
    assert ns["arrays"][0]["prob_atypical"] == ns["rows"][0]["prob_atypical"]


def test_one_classifier_shared_by_four_threads_gives_each_call_its_own_rows(clf):
    """Thread safety (the module docstring, docs/guarantees.md): concurrent calls on one Classifier
    neither fail nor mix rows; each gets what a call alone gets."""
    import threading

    crops = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in SAMPLES])
    alone = clf.classify_arrays(crops, ids=[p.name for p in SAMPLES])
    got, errors = {}, []

    def call(k: int) -> None:
        try:
            order = list(range(len(SAMPLES)))[k:] + list(range(len(SAMPLES)))[:k]
            got[k] = clf.classify_arrays(crops[order], ids=[SAMPLES[i].name for i in order])
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and sorted(got) == [0, 1, 2, 3]
    for rows in got.values():
        assert sorted(rows, key=lambda r: r["id"]) == sorted(alone, key=lambda r: r["id"])
