"""Decoding crops into RGB, robustly and without torch.

Handles RGB, RGBA (composited on white), greyscale, 16-bit, palette and CMYK images, guards
against decompression bombs, and turns every failure into an :class:`ImageError` with a reason
a person can act on.

:func:`decode_rgb_fast` is the fast path for the common crop (an 8-bit RGB PNG): OpenCV's PNG
decoder when ``opencv-python-headless`` is installed (it comes with ``ami-mitosis[openvino]``; about a
third faster than Pillow here, and the same pixels: PNG is lossless and neither applies gamma),
straight into a uint8 array. Anything else - another format or PNG colour type, a file OpenCV
refuses - returns None and goes through :func:`decode_rgb`, which also words the errors.
``AMI_DECODER=pillow`` turns the fast path off.
"""

from __future__ import annotations

import os
import stat
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import BadInput

# A crop is ~128x128; anything over this many pixels is refused before decoding.
# the crop files ami-infer reads, by suffix (what the decoders here open)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MAX_PIXELS = 64_000_000
# Formats a crop may come in. Pillow would otherwise try every plugin it has (EPS, for one, hands
# the file to Ghostscript): a file named .png that is something else is refused, not interpreted.
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")


class ImageError(BadInput):
    """A crop could not be turned into an RGB image; str(e) says why."""


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def _file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a crop file, or None. One stat() on the common path."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "file not found"
    except PermissionError:
        return "permission denied"
    except OSError as e:  # e.g. a symlink loop, a name too long
        return f"cannot read file ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        unlisted = not os.access(path, os.R_OK | os.X_OK)
        return "is a directory" + ("; permission denied, its crops could not be listed" if unlisted else "")
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (device, pipe or socket)"
    if st.st_size == 0:
        return "empty file"
    return None


def decode_rgb(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, info: dict | None = None) -> Image.Image:
    """Open, fully decode and convert one crop to RGB. Raises ImageError with the reason.

    A file with several frames (animated PNG / WebP, multi-page TIFF) gives its first frame;
    pass ``info`` (a dict) to learn ``frames`` (how many there were) and ``size`` (width, height)."""
    p = os.fspath(path)
    try:
        problem = _file_problem(p)
        if problem:
            raise ImageError(problem)
        with Image.open(p, formats=FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"image too large ({w}x{h} pixels > {max_pixels}); refusing to decode")
            if info is not None:
                info["size"] = (w, h)
                info["frames"] = int(getattr(im, "n_frames", 1) or 1)
            im.load()
            return _to_rgb(im)
    except ImageError:
        raise
    except PermissionError:
        raise ImageError("permission denied") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (not a PNG, JPEG, TIFF, BMP or WebP file)") from None
    except Image.DecompressionBombError:
        raise ImageError("image too large: refused as a possible decompression bomb "
                         f"(over {Image.MAX_IMAGE_PIXELS * 2} pixels)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt or truncated image ({e})") from None


# -- the fast path ---------------------------------------------------------------------------------

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_CV2 = None  # the cv2 module, False when it is not installed or turned off


def _cv2():
    global _CV2
    if _CV2 is None:
        if os.environ.get("AMI_DECODER", "auto").lower() == "pillow":
            _CV2 = False
        else:
            try:
                import cv2

                _CV2 = cv2
            except ImportError:
                _CV2 = False
    return _CV2


def fast_decoder() -> str:
    """Which decoder :func:`decode_rgb_fast` uses for 8-bit RGB PNGs: 'opencv X' or 'pillow'."""
    cv2 = _cv2()
    return f"opencv {cv2.__version__}" if cv2 else "pillow"


def decode_rgb_fast(path: str | os.PathLike, max_pixels: int = MAX_PIXELS):
    """An 8-bit RGB PNG as a uint8 HxWx3 RGB array, decoded by OpenCV; None when the file is anything
    else (or OpenCV is not installed, or refuses it): then use :func:`decode_rgb`."""
    cv2 = _cv2()
    if not cv2:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None  # decode_rgb says why
    # IHDR: signature, length, "IHDR", width, height, bit depth, colour type (2 = RGB)
    if len(data) < 33 or data[:8] != _PNG_SIG or data[12:16] != b"IHDR":
        return None
    w, h, depth, ctype = struct.unpack(">IIBB", data[16:26])
    if depth != 8 or ctype != 2 or w * h > max_pixels or w == 0 or h == 0:
        return None
    idat = data.find(b"IDAT")
    if b"acTL" in data[:idat if idat > 0 else len(data)]:  # an animated PNG: decode_rgb notes its frames
        return None
    import numpy as np

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if bgr is None or bgr.shape != (h, w, 3) or bgr.dtype != np.uint8:
        return None  # corrupt or truncated: decode_rgb words the error
    return bgr[:, :, ::-1]
