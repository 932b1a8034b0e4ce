"""Decoding crops into RGB, robustly and without torch.

Handles RGB, RGBA (composited on white), greyscale, 16-bit, palette and CMYK images, guards
against decompression bombs, and turns every failure into an :class:`ImageError` with a reason
a person can act on.
"""

from __future__ import annotations

import os
import stat

import numpy as np
from PIL import Image, UnidentifiedImageError

# A crop is ~128x128; anything over this many pixels is refused before decoding.
MAX_PIXELS = 64_000_000
# Formats a crop may come in. Pillow would otherwise try every plugin it has (EPS, for one, hands
# the file to Ghostscript): a file named .png that is something else is refused, not interpreted.
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")


class ImageError(Exception):
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
