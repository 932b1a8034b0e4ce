"""``--slides`` and the Python API under hostile use (issue 25): streams, names, side outputs,
hostile detection files, concurrency on a slide with corrupt tiles, and the documented decisions."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openslide", reason="ami[slides] is not installed (pip install -e '.[slides]')")
pytest.importorskip("tifffile", reason="ami[slides] is not installed (pip install -e '.[slides]')")

from ami.runtime.engine import ASSETS, load_engine
from slide_factory import paste, write_slide

SAMPLES = sorted((ASSETS / "samples").glob("*.png"))[:6]
CLI = "import sys\nfrom ami.runtime.cli.infer import main\nsys.argv = ['ami-infer', *sys.argv[1:]]\nmain()\n"


def _ami_infer(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def _detections(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "x", "y", "id"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def engine():
    return load_engine(None, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A small native-resolution slide and its detections (6 crops pasted)."""
    d = tmp_path_factory.mktemp("slide")
    img, placed = paste(SAMPLES, 0.25, cols=3)
    write_slide(d / "s.tif", img, 0.25)
    return {"dir": d, "path": d / "s.tif", "placed": placed, "shape": img.shape}


def _dets_for(slide: dict, where: Path, name: str = "s.tif") -> Path:
    return _detections(where / "d.csv", [(name, p.x, p.y, p.name) for p in slide["placed"]])


# -- class 2: streams -------------------------------------------------------------------------------

def test_slides_to_stdout_exits_0_with_every_row_on_stdout(slide, tmp_path):
    import shutil
    shutil.copy(slide["path"], tmp_path / "s.tif")
    det = _dets_for(slide, tmp_path)
    r = _ami_infer("--slides", det, "-o", "-", "--no-progress", "--threads", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(r.stdout.splitlines()))
    assert [x["id"] for x in rows] == [p.name for p in slide["placed"]] and all(x["status"] == "ok" for x in rows)
    assert "per-slide summary and QuPath GeoJSON: not written" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["d.csv", "s.tif"], "no side files for a stream"
