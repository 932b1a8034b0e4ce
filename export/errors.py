"""The export layer's errors, in one leaf module every other module of :mod:`ami.export` imports.

``ExportError`` and its subclasses are re-exported where callers have always found them
(``ami.export.ExportError``, ``ami.export.checks.CheckFailed``, ``ami.export.quantize.Int8Rejected``,
``ami.export.tensorrt.TensorRTUnavailable``); importing this module imports nothing heavy.

Each is also one of :mod:`ami.runtime.errors`' kinds, which gives ``ami-export`` its exit code: a
source or setting that cannot be exported is bad input (2), a failed self-check or a refused int8
model a failed check (1), a missing TensorRT or GPU something this machine lacks (3).
"""

from __future__ import annotations

from ami.runtime import errors


class ExportError(errors.BadInput, RuntimeError):
    """An export could not be made or did not pass its checks; str(e) says why."""


class CheckFailed(errors.CheckFailed, ExportError):
    """An exported artefact did not pass a self-check; nothing was written."""

    exit_code = errors.EXIT_CHECK_FAILED


class Int8Rejected(errors.CheckFailed, ExportError):
    """The int8 model lost too much balanced accuracy or AUROC against the float model."""

    exit_code = errors.EXIT_CHECK_FAILED


class TensorRTUnavailable(errors.Unavailable, ExportError):
    """No usable TensorRT or no CUDA GPU on this machine."""

    exit_code = errors.EXIT_UNAVAILABLE
