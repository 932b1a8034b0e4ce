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


# -- class 3: slide handles under concurrency -------------------------------------------------------

def _corrupt_copy(slide: dict, dest: Path, every: int = 2) -> Path:
    """``slide`` with every ``every``-th level-0 tile overwritten with garbage."""
    import tifffile

    data = bytearray(slide["path"].read_bytes())
    with tifffile.TiffFile(slide["path"]) as tf:
        page = tf.pages[0]
        for k, (off, n) in enumerate(zip(page.dataoffsets, page.databytecounts)):
            if k % every == 0:
                data[off:off + n] = b"\xff" * n
    dest.write_bytes(bytes(data))
    return dest


def _many_detections(slide: dict, where: Path, name: str, n: int = 240) -> Path:
    h, w = slide["shape"][:2]
    pts = [(name, 40 + (i * 37) % (w - 80), 40 + (i * 53) % (h - 80), f"d{i}") for i in range(n)]
    return _detections(where / "many.csv", pts)


def test_corrupt_tiles_read_by_many_workers_never_crash_the_process(slide, tmp_path):
    _corrupt_copy(slide, tmp_path / "c.tif")
    det = _many_detections(slide, tmp_path, "c.tif")
    out = tmp_path / "o.csv"
    r = _ami_infer("--slides", det, "-o", out, "--no-progress", "--threads", "1", "--workers", "6",
                   "--batch-size", "4")
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # some detections failed, none crashed
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 240 and {x["status"] for x in rows} == {"ok", "error"}
    assert all("unreadable slide region" in x["error"] for x in rows if x["status"] == "error")


API_THREADS = """
import sys, threading
from ami.runtime.api import Classifier
clf = Classifier(provider="cpu", threads=1, workers=3, batch_size=4)
slide, n = sys.argv[1], int(sys.argv[2])
pts = [(40 + (i * 37) % 300, 40 + (i * 53) % 300) for i in range(n)]
out = {}
def go(k):
    out[k] = clf.classify_slide(slide, pts)
ts = [threading.Thread(target=go, args=(k,)) for k in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print(sorted(len(v) for v in out.values()), sorted({r["status"] for v in out.values() for r in v}))
"""


def test_api_threads_classifying_slides_do_not_close_each_others_handles(slide, tmp_path):
    c = _corrupt_copy(slide, tmp_path / "c.tif")
    r = subprocess.run([sys.executable, "-c", API_THREADS, str(c), "60"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[60, 60, 60, 60] ['error', 'ok']"
