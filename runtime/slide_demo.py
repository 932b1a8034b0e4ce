"""A demo whole-slide image to try ``ami-infer --slides`` on, made from the real crops shipped in the
package: a real pyramidal tiled TIFF (tifffile, part of ``ami-mitosis[slides]``) with the crops pasted at
known positions on a tissue-like background, and the detections CSV that points at them::

    python -m ami.runtime.slide_demo demo/            # demo/demo-slide.tif + demo/detections.csv
    ami-infer --slides demo/detections.csv -o demo/results.csv

The resolution goes into TIFF resolution tags (generic tiled TIFF) or an Aperio-style description,
where OpenSlide finds it as on scanner files. Tiles are lossless (zlib): at the crops' own
0.25 um/px the slide holds their exact pixels, so the slide's probabilities equal the crops'.
The tests build their slides with the same functions.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import DIST_NAME

CROP_MPP = 0.25  # the AMi-Br / AtNorM-MD crops
CROP = 128


def tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An H&E-like background: pink stroma with purple nuclei-ish blobs and white gaps, smooth noise."""
    rng = np.random.default_rng(seed)

    def smooth(scale: int) -> np.ndarray:
        small = rng.random((max(2, h // scale), max(2, w // scale))).astype(np.float32)
        return np.asarray(Image.fromarray(small, "F").resize((w, h), Image.Resampling.BICUBIC), np.float32)

    stroma = np.array([232, 170, 205], np.float32)
    nuclei = np.array([120, 80, 160], np.float32)
    white = np.array([245, 243, 246], np.float32)
    a, b = smooth(64), smooth(12)
    img = stroma * (1 - 0.6 * (b > 0.7)[..., None]) + nuclei * 0.6 * (b > 0.7)[..., None]
    img = np.where((a > 0.8)[..., None], white, img)
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class Placed:
    name: str  # the crop's file name
    x: float  # level-0 centre, continuous coordinates (the crop's centre column 64 -> x)
    y: float


def paste(crops: list[Path], mpp: float, *, cols: int = 6, gap: int = 96, seed: int = 0,
          nearest: bool = False) -> tuple[np.ndarray, list[Placed]]:
    """Paste the crops (0.25 um/px, 128 px) on a tissue background of a slide at ``mpp`` um/px: each crop is
    scaled by 0.25 / mpp (Lanczos; ``nearest`` for an exact 2x) to an integer size. Returns the image
    and where each crop's centre is."""
    scale = CROP_MPP / mpp
    side = round(CROP * scale)
    if abs(side - CROP * scale) > 1e-6:
        raise ValueError(f"choose mpp so that 128 * 0.25 / mpp is a whole number of pixels (got {CROP * scale:g})")
    step = side + int(gap * scale)
    rows = (len(crops) + cols - 1) // cols
    h, w = rows * step + step // 2, cols * step + step // 2
    img = tissue(h, w, seed)
    placed = []
    for i, c in enumerate(crops):
        im = Image.open(c).convert("RGB")
        if side != CROP:
            im = im.resize((side, side), Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS)
        r, k = divmod(i, cols)
        top, left = step // 2 + r * step, step // 2 + k * step
        img[top:top + side, left:left + side] = np.asarray(im)
        placed.append(Placed(c.name, left + side / 2, top + side / 2))
    return img, placed


def write_slide(path: Path, img: np.ndarray, mpp: float | None, *, style: str = "tiff", levels: int = 3,
                tile: int = 256, compression: str = "zlib", quality: int | None = None) -> Path:
    """A pyramidal tiled TIFF: level k is level 0 box-reduced by 2**k. ``style``: "tiff" (resolution in
    the TIFF tags, centimetre unit), "aperio" (an Aperio SVS-style description with MPP), or "none"
    (no resolution at all; ``mpp`` ignored)."""
    import tifffile

    pyramid = [img]
    for _ in range(1, levels):
        prev = pyramid[-1]
        if min(prev.shape[:2]) < 2 * tile:
            break
        pyramid.append(np.asarray(Image.fromarray(prev).reduce(2)))
    h0, w0 = img.shape[:2]
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for k, lv in enumerate(pyramid):
            d = 2 ** k
            kw: dict = dict(tile=(tile, tile), photometric="rgb", compression=compression, metadata=None,
                            subfiletype=0 if k == 0 else 1)
            if quality is not None:  # lossy compression (e.g. "jpeg", needs imagecodecs)
                kw["compressionargs"] = {"level": quality}
            if style == "tiff" and mpp:
                ppcm = 1e4 / (mpp * d)
                kw.update(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            elif style == "aperio" and mpp:
                hk, wk = lv.shape[:2]
                first = f"{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile})" if k == 0 else f"{w0}x{h0} -> {wk}x{hk}"
                kw.update(description=f"Aperio Image Library v12.0.15\n{first} RAW/RGB|AppMag = 40|MPP = {mpp:.5f}")
            tw.write(lv, **kw)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse
    import csv

    from .engines import ASSETS

    ap = argparse.ArgumentParser(prog="python -m ami.runtime.slide_demo", description=__doc__.split("::")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for demo-slide.tif and detections.csv")
    ap.add_argument("--mpp", type=float, default=CROP_MPP, help="the slide's um/px (default 0.25, the crops' own; "
                    "another value rescales the crops, so the reader has to resample them back)")
    a = ap.parse_args(argv)
    crops = sorted((ASSETS / "samples").glob("*.png"))
    if not crops:
        ap.error(f"no sample crops shipped at {ASSETS / 'samples'}")
    try:
        importlib.import_module("tifffile")
    except ImportError:
        ap.error(f"writing the demo slide needs tifffile: pip install '{DIST_NAME}[slides]'")
    scale = CROP_MPP / a.mpp
    if abs(CROP * scale - round(CROP * scale)) > 1e-6:
        # keep the pasted crops an integer number of pixels wide
        a.mpp = CROP_MPP * CROP / round(CROP * scale)
    a.out.mkdir(parents=True, exist_ok=True)
    img, placed = paste(crops, a.mpp)
    slide = write_slide(a.out / "demo-slide.tif", img, a.mpp)
    with open(a.out / "detections.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "x", "y", "id"])
        for p in placed:
            w.writerow([slide.name, p.x, p.y, p.name])
    print(f"{slide}: {img.shape[1]}x{img.shape[0]} px at {a.mpp:.4g} um/px, {len(placed)} crops pasted")
    print(f"{a.out / 'detections.csv'}: {len(placed)} detections (slide, x, y, id = the crop's file name)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
