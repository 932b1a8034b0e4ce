"""The export layer's errors, in one leaf module every other module of :mod:`ami.export` imports.

``ExportError`` and its subclasses are re-exported where callers have always found them
(``ami.export.ExportError``, ``ami.export.checks.CheckFailed``, ``ami.export.quantize.Int8Rejected``,
``ami.export.tensorrt.TensorRTUnavailable``); importing this module imports nothing heavy.
"""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export could not be made or did not pass its checks; str(e) says why."""


class CheckFailed(ExportError):
    """An exported artefact did not pass a self-check; nothing was written."""


class Int8Rejected(ExportError):
    """The int8 model lost too much balanced accuracy or AUROC against the float model."""


class TensorRTUnavailable(ExportError):
    """No usable TensorRT or no CUDA GPU on this machine."""
