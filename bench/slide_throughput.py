"""Throughput of ami-infer reading crops from a whole-slide image vs from PNG files, in one run.

A measurement to rerun (not part of any command or test). It writes, under OUT:

* a 6144 x 6144 px pyramidal tiled TIFF at 0.25 um/px (256-px tiles; zlib, and JPEG q90 when
  imagecodecs is installed, the compression scanners use) holding 1024 crops: the 32 real crops
  shipped with the package, each pasted 32 times on a 32 x 32 grid (192-px pitch) on a tissue-like
  background, and its detections CSV;
* the same 1024 crops as PNG files;

then times, alternating, twice each: the full pipeline (run_inference / run_slides, shipped edge
model, ONNX Runtime CPU, batch 64, ``--workers`` thread workers) and the reading alone (the
source's ``prepare``, one thread, no model). Prints one JSON document.

    python -m ami.bench.slide_throughput OUT [--workers 2]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ami.runtime import slides as S
from ami.runtime.engines import ASSETS, load_engine
from ami.runtime.infer import CropFiles, run_inference
from ami.runtime.slide_demo import tissue, write_slide

GRID, PITCH = 32, 192


def build(out: Path) -> dict:
    crops = sorted((ASSETS / "samples").glob("*.png"))
    side = GRID * PITCH
    bg = np.tile(tissue(1024, 1024, seed=1), (side // 1024, side // 1024, 1))
    pngs = out / "pngs"
    pngs.mkdir(parents=True, exist_ok=True)
    rows, files = [], []
    arrays = [np.asarray(Image.open(c).convert("RGB")) for c in crops]
    for i in range(GRID * GRID):
        r, k = divmod(i, GRID)
        top, left = r * PITCH + 32, k * PITCH + 32
        bg[top:top + 128, left:left + 128] = arrays[i % len(crops)]
        rows.append((left + 64, top + 64, f"d{i}"))
        dst = pngs / f"{i:04d}_{crops[i % len(crops)].name}"
        shutil.copyfile(crops[i % len(crops)], dst)
        files.append(str(dst))
    made = {"pngs": files}
    comps = ["zlib"]
    try:
        importlib.import_module("imagecodecs")
        comps.append("jpeg")
    except ImportError:
        pass
    for comp in comps:
        name = f"slide-{comp}.tif"
        kw = {"compression": "jpeg", "quality": 90} if comp == "jpeg" else {"compression": "zlib"}
        write_slide(out / name, bg, 0.25, **kw)
        det = out / f"{name}.csv"
        with open(det, "w") as f:
            f.write("slide,x,y,id\n" + "".join(f"{name},{x},{y},{i}\n" for x, y, i in rows))
        made[comp] = det
    return made


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    made = build(a.out)
    eng = load_engine(None, provider="cpu")
    eng.predict(np.zeros((64, 128, 128, 3), np.uint8))  # warm up
    pre = eng.meta.preprocess
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared, noisy)",
                 "crops": len(made["pngs"]), "workers": a.workers, "batch": 64, "model": eng.describe(),
                 "pipeline_crops_per_s": {}, "reading_only_crops_per_s_1_thread": {}}
    kinds = ["png"] + [k for k in ("zlib", "jpeg") if k in made]
    for rep in range(2):
        for kind in kinds:
            out = a.out / f"res-{kind}-{rep}.csv"
            t = time.perf_counter()
            if kind == "png":
                s = run_inference(made["pngs"], eng, out, batch_size=64, workers=a.workers, progress=False, overwrite=True)
            else:
                s, _ = S.run_slides(made[kind], eng, out, batch_size=64, workers=a.workers, progress=False, overwrite=True)
            dt = time.perf_counter() - t
            assert s.ok == len(made["pngs"]), s.errors
            res["pipeline_crops_per_s"].setdefault(kind, []).append(round(s.ok / dt, 1))
            # reading alone
            if kind == "png":
                src, items = CropFiles(), made["pngs"]
            else:
                src, items = S.source_for(eng), S.read_detections(made[kind])
            t = time.perf_counter()
            for i in range(0, len(items), 64):
                px, st = src.prepare(items[i:i + 64], pre)
                assert len(px) == len(st[:64])
            dt = time.perf_counter() - t
            S.close_slides()
            res["reading_only_crops_per_s_1_thread"].setdefault(kind, []).append(round(len(items) / dt, 1))
    # the slide rows' probabilities against the PNG rows' (same crops)
    import csv
    def read_rows(name: str) -> list[dict]:
        with open(a.out / name, newline="") as f:
            return list(csv.DictReader(f))

    png = {Path(r["path"]).name.split("_", 1)[0]: float(r["prob_atypical"]) for r in read_rows("res-png-0.csv")}
    for kind in kinds[1:]:
        sl = {f"{int(r['id'][1:]):04d}": float(r["prob_atypical"]) for r in read_rows(f"res-{kind}-0.csv")}
        res[f"max_abs_dp_{kind}_vs_png"] = float(max(abs(sl[k] - png[k]) for k in png))
    res["python"] = sys.version.split()[0]
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
