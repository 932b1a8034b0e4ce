"""Test slides: the package's demo-slide writer (real pyramidal tiled TIFF, real crops pasted on a
tissue-like background, resolution in TIFF tags or an Aperio description), one owner for both."""

from ami.runtime.slide_demo import CROP, CROP_MPP, Placed, paste, tissue, write_slide

__all__ = ["CROP", "CROP_MPP", "Placed", "paste", "tissue", "write_slide"]
