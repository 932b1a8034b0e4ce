"""What an export can be asked to do: the option bundles of :func:`~ami.export.onnx_export.export_onnx`
and their defaults (the ``ami-export`` command's defaults are these).

Torch-free and import-light, so the command line and callers can build options cheaply.
:class:`ExportOptions` holds the general settings and three groups: :class:`CheckOptions` (the
float export and its self-checks), :class:`Int8Options` (``engine="onnx-int8"``) and
:class:`TrtOptions` (``engine="trt"``). :meth:`ExportOptions.with_overrides` takes the fields of
every group by name, which is how ``export_onnx(src, out, engine="trt", batch="1,8,32")`` works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ami.runtime.tolerances import FP32_PROB_TOL, REDUCED_AUROC_TOL, REDUCED_BA_TOL

ENGINES = ("onnx", "onnx-int8", "trt")
MIN_OPSET = 17
CHECK_CROPS = 64
PARITY_TOL = FP32_PROB_TOL  # ONNX Runtime vs PyTorch: max |delta probability|
CALIB_CROPS = 300


@dataclass(frozen=True)
class CheckOptions:
    """The float export and its self-checks (ONNX Runtime vs PyTorch on real AMi-Br training crops)."""

    opset: int = MIN_OPSET  # ONNX opset (>= 17)
    check_crops: int = CHECK_CROPS  # AMi-Br training crops for the self-checks
    check_batch: int = 16  # batch N of the batch-1-vs-N checks (also the int8 and TensorRT check batch)
    tol: float = PARITY_TOL  # max |delta probability| of ONNX Runtime vs PyTorch


@dataclass(frozen=True)
class Int8Options:
    """How ``engine="onnx-int8"`` quantises and when it accepts the result."""

    calib_crops: int = CALIB_CROPS  # AMi-Br training crops for calibration
    eval_crops: int = 0  # cap on the held-apart evaluation crops (0 = all of them)
    per_channel: str | bool = "auto"  # weight scales: auto (the variant closer to float), on, off
    calibration: str = "minmax"  # calibration method: minmax, entropy, percentile
    activations: str = "s8"  # s8 (int8, S8S8) or u8 (uint8, U8S8)
    # weights quantised to 7 bits: no int16 saturation in the u8 x s8 dot products of CPUs without VNNI
    # (AVX2-only x86); ONNX Runtime's `reduce_range`
    reduce_range: bool = False
    ba_tol: float = REDUCED_BA_TOL  # largest accepted |delta balanced accuracy| vs float
    auroc_tol: float = REDUCED_AUROC_TOL  # largest accepted |delta AUROC| vs float
    speed_batch: int = 0  # > 0: also time fp32 vs int8 on this CPU at this batch size


@dataclass(frozen=True)
class TrtOptions:
    """The TensorRT plan (``engine="trt"``)."""

    batch: str | tuple = (1, 32, 128)  # batch sizes of the optimisation profile (min, opt, max)
    precision: str = "fp16"  # fp16 (a float16 network graph) or fp32
    timing_cache: Path | None = None  # None: ~/.cache/ami/tensorrt-timing-VERSION-smXY.cache
    workspace_gb: float = 0.0  # builder workspace limit in GiB (0 = TensorRT's default)


@dataclass(frozen=True)
class ExportOptions:
    """Everything :func:`~ami.export.onnx_export.export_onnx` takes besides the source and the output file."""

    folds: str | list = "all"  # 'all', 'full' (RUN/all) or fold indices like '0,2'
    data_root: Path | None = None  # None: $AMI_DATA_ROOT, else the default data folder
    engine: str = "onnx"  # one of ENGINES
    threshold: float | None = None  # None: 0.5 unless the run's validation predictions show a better one
    force: bool = False  # replace existing output files (only after every check passed)
    threads: int = 0  # CPU threads for ONNX Runtime (0 = its default)
    weights: str | None = None  # backbone weights for runs whose checkpoints hold only the trained tensors
    check: CheckOptions = field(default_factory=CheckOptions)
    int8: Int8Options = field(default_factory=Int8Options)
    trt: TrtOptions = field(default_factory=TrtOptions)
    log: Callable = print

    def with_overrides(self, **kwargs) -> ExportOptions:
        """A copy with fields replaced by name; the fields of the groups (``opset``, ``calib_crops``,
        ``batch`` ...) are named directly, as the keyword arguments of ``export_onnx``."""
        groups = {"check": self.check, "int8": self.int8, "trt": self.trt}
        top, nested = {}, {g: {} for g in groups}
        for k, v in kwargs.items():
            owner = next((g for g, o in groups.items() if k in {f.name for f in fields(o)}), None)
            if owner is not None:
                nested[owner][k] = v
            elif k in {f.name for f in fields(self)} and k not in groups:
                top[k] = v
            else:
                raise TypeError(f"export_onnx() got an unexpected keyword argument {k!r}")
        return replace(self, **top, **{g: replace(groups[g], **kv) for g, kv in nested.items() if kv})
