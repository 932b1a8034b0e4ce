"""The fast decode path (OpenCV for 8-bit RGB PNGs) gives exactly Pillow's pixels, and hands every
other file to the Pillow path (which words the errors). Skips where OpenCV is not installed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ami.runtime import imageio as I
from ami.runtime.engines import ASSETS
from ami.runtime.infer import prepare_batch
from ami.runtime.preprocess import Preprocess

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed (it comes with ami[openvino])")


@pytest.fixture(autouse=True)
def _fresh_decoder(monkeypatch):
    monkeypatch.delenv("AMI_DECODER", raising=False)
    monkeypatch.setattr(I, "_CV2", None)


def _pillow(path) -> np.ndarray:
    return np.asarray(I.decode_rgb(path))


def test_same_pixels_as_pillow_on_real_and_random_crops(tmp_path):
    samples = sorted((ASSETS / "samples").glob("*.png"))
    rng = np.random.default_rng(0)
    for i, size in enumerate([(128, 128), (97, 131)]):
        p = tmp_path / f"r{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        samples.append(p)
    interlaced = tmp_path / "interlaced.png"
    Image.open(samples[0]).save(interlaced, interlace=1)  # Pillow writes Adam7 only if asked; either way RGB
    samples.append(interlaced)
    assert I.fast_decoder().startswith("opencv")
    for p in samples:
        fast = I.decode_rgb_fast(p)
        assert fast is not None, p
        np.testing.assert_array_equal(fast, _pillow(p), err_msg=str(p))


def test_everything_else_goes_to_pillow(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cases = {
        "grey.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "deep.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "photo.jpg": Image.fromarray(rgb),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        assert I.decode_rgb_fast(tmp_path / name) is None, name
    good = tmp_path / "good.png"
    Image.fromarray(rgb).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.png").write_bytes(b"not a png at all" * 4)
    for name in ("trunc.png", "fake.png", "missing.png"):
        assert I.decode_rgb_fast(tmp_path / name) is None, name
    # too many pixels: refused before decoding, by the Pillow path's rule
    assert I.decode_rgb_fast(good, max_pixels=100) is None


def test_prepare_batch_rows_are_identical_either_way(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    paths = []
    for i, size in enumerate([(128, 128), (64, 80), (128, 128)]):
        p = tmp_path / f"c{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    paths.append(str(tmp_path / "bad.png"))
    pre = Preprocess(128)
    fast = prepare_batch(paths, pre)
    monkeypatch.setenv("AMI_DECODER", "pillow")
    monkeypatch.setattr(I, "_CV2", None)
    assert I.fast_decoder() == "pillow"
    slow = prepare_batch(paths, pre)
    np.testing.assert_array_equal(fast[0], slow[0])
    assert fast[1] == slow[1] and fast[1][1][:2] == (None, True) and fast[1][3][0]  # resized flag, error text
