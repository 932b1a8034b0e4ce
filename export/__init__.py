"""ami.export: merge, export and check deployable engines (onnx, onnxruntime, tensorrt).

Entry points:

* :func:`export_onnx` (``ami.export.onnx_export``): a run directory, one fold of it or an ami ONNX
  file -> a checked ONNX model (``engine="onnx"``), an int8 ONNX model (``"onnx-int8"``) or a
  TensorRT plan (``"trt"``). The ``ami-export`` command is a thin layer over it.
* :func:`ami.export.source.pick_best`: the run with the best mean *validation* balanced accuracy.

Importing this package is cheap; torch, onnx and onnxruntime are imported by the modules that
need them.
"""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export could not be made or did not pass its checks; str(e) says why."""


def __getattr__(name: str):  # lazy: `from ami.export import export_onnx` without importing torch early
    if name == "export_onnx":
        from .onnx_export import export_onnx

        return export_onnx
    raise AttributeError(name)
