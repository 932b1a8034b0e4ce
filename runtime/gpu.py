"""Facts about this machine's NVIDIA stack, without torch: what a GPU user needs to pick the right
install and what the GPU engines need to say when a library does not fit.

* :func:`driver_cuda_version` - the newest CUDA the installed *driver* supports (``libcuda``'s
  ``cuDriverGetVersion``, the "CUDA Version" that ``nvidia-smi`` prints); None without a driver.
* :func:`nvidia_smi` - GPU names, driver version and compute capability as ``nvidia-smi`` reports them.
* :func:`tensorrt_libraries` - whether the TensorRT runtime library (``libnvinfer``) really loads
  in this process. onnxruntime-gpu lists ``TensorrtExecutionProvider`` whether or not it does, and
  then silently runs on CUDA; :mod:`ami.runtime.engines` asks here before claiming the provider.
* :func:`trt_extra` / :func:`cuda_python_mismatch` - which ``ami-mitosis[trt-cuXX]`` extra fits the
  driver, and a sentence for a person when the installed cuda-python needs a newer driver
  (cuda-python 13 on a CUDA 12 driver fails every call with cudaErrorInsufficientDriver).

* :func:`nvidia_gpu` - whether this machine has an NVIDIA GPU at all (``nvidia-smi`` or the
  driver's ``/proc/driver/nvidia``), with its name and the driver's CUDA version: ``--engine auto``
  says once what to install when it has to run an ONNX model on the CPU of such a machine.

Nothing here raises: every probe returns None / (False, reason) when the thing is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import DIST_NAME

CUDA_MAJORS = (12, 13)  # the CUDA majors ami has a TensorRT extra for: ami-mitosis[trt-cu12], ami-mitosis[trt-cu13]
TRT_MAJORS = (10, 11)  # the TensorRT majors ami builds plans with (ami-export) and runs them with (ami-infer)
PROC_NVIDIA = Path("/proc/driver/nvidia/gpus")  # one folder per GPU while the NVIDIA driver is loaded (Linux)


def _load(names: list[str]):
    last = ""
    for n in names:
        try:
            return ctypes.CDLL(n), ""
        except OSError as e:
            last = str(e)
    return None, last or "not found"


def driver_cuda_version() -> tuple[int, int] | None:
    """(major, minor) of the CUDA version the NVIDIA driver supports, e.g. (12, 4); None without a driver."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    found = ctypes.util.find_library("cuda")
    if found:
        names.append(found)
    lib, _ = _load(names)
    if lib is None:
        return None
    v = ctypes.c_int(0)
    try:
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0 or v.value <= 0:
            return None
    except (AttributeError, OSError):
        return None
    return v.value // 1000, (v.value % 1000) // 10


def nvidia_smi(timeout: float = 10.0) -> dict | None:
    """{'gpus': [{'name', 'driver_version', 'compute_capability', 'memory_total'}], 'cuda_version'}
    from ``nvidia-smi``; None when it is not installed or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        q = subprocess.run([exe, "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=timeout)
        plain = subprocess.run([exe], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if q.returncode != 0:
        return {"error": (q.stderr or q.stdout).strip().splitlines()[:1], "gpus": []}
    gpus = []
    for line in q.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            gpus.append({"name": parts[0], "driver_version": parts[1], "compute_capability": parts[2],
                         "memory_total": parts[3]})
    m = re.search(r"CUDA Version:\s*([0-9.]+)", plain.stdout or "")
    return {"gpus": gpus, "cuda_version": m.group(1) if m else None}


def package_version(*names: str) -> str | None:
    """Installed version of the first distribution found among ``names``."""
    for n in names:
        try:
            return version(n)
        except PackageNotFoundError:
            continue
    return None


def tensorrt_major(tensorrt_version: str) -> int | None:
    """The major of a TensorRT version string ('10.9.0.34' -> 10); None when it is not a version."""
    try:
        return int(str(tensorrt_version).split(".")[0])
    except ValueError:
        return None


def cuda_python_version() -> str | None:
    return package_version("cuda-bindings", "cuda-python")


@functools.lru_cache(maxsize=1)
def tensorrt_libraries() -> tuple[bool, str]:
    """(True, which library) when TensorRT's runtime library loads in this process, else (False, why).

    The tensorrt Python package (``tensorrt-cuXX``) ships libnvinfer in its own folder; importing
    it loads the library, after which ONNX Runtime's TensorRT provider finds it by its soname."""
    if sys.platform == "win32":
        names = [f"nvinfer_{m}.dll" for m in TRT_MAJORS]
    else:
        names = [f"libnvinfer.so.{m}" for m in TRT_MAJORS]
    lib, why = _load(names)
    if lib is not None:
        return True, getattr(lib, "_name", names[0])
    try:
        importlib.import_module("tensorrt")  # loads libnvinfer from the wheel's folder
    except Exception as e:  # a broken install raises anything
        return False, f"libnvinfer cannot be loaded ({why.splitlines()[0] if why else 'not found'}) and the tensorrt " \
                      f"Python package is not importable ({type(e).__name__}: {e})"
    lib, why2 = _load(names)
    if lib is not None:
        return True, getattr(lib, "_name", names[0]) + " (from the tensorrt Python package)"
    return False, f"libnvinfer cannot be loaded ({why2.splitlines()[0] if why2 else why})"


def trt_extra(cuda_major: int | None) -> str:
    """The ami extra whose TensorRT and cuda-python builds fit a driver of this CUDA major."""
    if cuda_major is None:
        return f"{DIST_NAME}[trt-cu{CUDA_MAJORS[0]}]"
    m = max([c for c in CUDA_MAJORS if c <= cuda_major] or [CUDA_MAJORS[0]])
    return f"{DIST_NAME}[trt-cu{m}]"


def cuda_python_mismatch() -> str:
    """A sentence when the installed cuda-python is built for a newer CUDA than the driver supports
    (the usual cause of cudaErrorInsufficientDriver), else ''."""
    v = cuda_python_version()
    drv = driver_cuda_version()
    if not v or drv is None:
        return ""
    try:
        major = int(v.split(".")[0])
    except ValueError:
        return ""
    if major <= drv[0]:
        return ""
    return (f"cuda-python {v} is built for CUDA {major}, but this driver supports CUDA {drv[0]}.{drv[1]}: "
            f"pip install '{trt_extra(drv[0])}' (or update the NVIDIA driver)")


def trt_install_hint() -> str:
    """`pip install 'ami-mitosis[trt-cuXX]'` for this driver, or both choices when no driver is visible."""
    drv = driver_cuda_version()
    if drv is None:
        return (f"pip install '{DIST_NAME}[trt-cu12]' or '{DIST_NAME}[trt-cu13]' (the major of the \"CUDA Version\" "
                "that nvidia-smi prints)")
    return f"pip install '{trt_extra(drv[0])}' (this driver supports CUDA {drv[0]}.{drv[1]})"


@functools.lru_cache(maxsize=1)
def nvidia_gpu() -> dict | None:
    """{'name', 'cuda_version', 'cuda_major'} when this machine has an NVIDIA GPU with its driver
    loaded (``nvidia-smi`` lists one, or ``/proc/driver/nvidia/gpus`` has one), else None. The
    CUDA version is the driver's (``libcuda``, else what nvidia-smi prints; None when neither says).
    Torch-free; asked once per process."""
    smi = nvidia_smi(timeout=5.0) if shutil.which("nvidia-smi") else None
    listed = bool(smi and smi.get("gpus"))
    try:
        in_proc = PROC_NVIDIA.is_dir() and any(PROC_NVIDIA.iterdir())
    except OSError:
        in_proc = False
    if not (listed or in_proc):
        return None
    drv = driver_cuda_version()
    cuda = f"{drv[0]}.{drv[1]}" if drv else (smi or {}).get("cuda_version")
    try:
        major = int(str(cuda).split(".")[0]) if cuda else None
    except ValueError:
        major = None
    name = smi["gpus"][0]["name"] if listed else "an NVIDIA GPU"
    return {"name": name, "cuda_version": cuda, "cuda_major": major}


def no_gpu_engine_note(gpu: dict, installs: list[str]) -> str:
    """The sentence ``--engine auto`` adds when it runs an ONNX model on the CPU of a machine
    with an NVIDIA GPU: which GPU, the driver's CUDA, and what to install for it."""
    cuda = f"driver CUDA {gpu['cuda_version']}" if gpu.get("cuda_version") else "driver CUDA version unknown"
    todo = " or ".join(f"`{i}`" for i in dict.fromkeys(installs) if i)
    return (f"this machine has an NVIDIA GPU ({gpu['name']}, {cuda}) but no GPU engine is installed, so the model "
            f"runs on the CPU" + (f"; to run it on the GPU: {todo}" if todo else ""))
