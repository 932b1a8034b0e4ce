"""ami.export: merge, export and check deployable engines (onnx, onnxruntime, tensorrt).

Entry points:

* :func:`export_onnx` (``ami.export.onnx_export``): a run directory, one fold of it or an ami ONNX
  file -> a checked ONNX model (``engine="onnx"``), an int8 ONNX model (``"onnx-int8"``) or a
  TensorRT plan (``"trt"``). The ``ami-export`` command is a thin layer over it.
* :class:`ExportOptions` (``ami.export.options``): every setting of an export, in groups
  (:class:`CheckOptions`, :class:`Int8Options`, :class:`TrtOptions`).
* :func:`ami.export.source.pick_best`: the run with the best mean *validation* balanced accuracy.

Importing this package is cheap; torch, onnx and onnxruntime are imported by the modules that
need them.
"""

from __future__ import annotations

from .errors import CheckFailed, ExportError, Int8Rejected, TensorRTUnavailable
from .options import CheckOptions, ExportOptions, Int8Options, TrtOptions

__all__ = ["CheckFailed", "CheckOptions", "ExportError", "ExportOptions", "Int8Options", "Int8Rejected",
           "TensorRTUnavailable", "TrtOptions", "export_onnx"]


def __getattr__(name: str):  # lazy: `from ami.export import export_onnx` without importing torch early
    if name == "export_onnx":
        from .onnx_export import export_onnx

        return export_onnx
    raise AttributeError(name)
