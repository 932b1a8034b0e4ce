"""The machine's matrix-product peaks, one per precision, for ``ami-bench latency``'s "% of peak".

A row of the latency table is compared with the peak of *its own* precision, measured in the same
run: float32 GEMM for fp32 rows, bf16 GEMM for bf16 rows (only on CPUs with bf16 instructions:
AVX-512 BF16 or AMX; elsewhere bf16 has no hardware peak and is not offered), u8*s8 GEMM (the
VNNI / AMX dot-product form int8 engines use) for int8 rows. Each peak is the best of every
implementation installed - PyTorch ``mm`` (fp32, bf16), OpenVINO ``MatMul`` (fp32, bf16, and
u8*s8 through a FakeQuantize, OpenVINO's int8 idiom), ONNX Runtime ``MatMulInteger`` (u8*s8) -
so an engine that beats one library's GEMM is still measured against the best GEMM this machine
was seen to run. FLOPs (or integer ops) of an n x n x n product: 2 n^3.

On a CUDA GPU: float32 (TF32 off) and float16 ``torch.mm`` (:func:`peak_gflops`). Each peak is
measured before and after the engine timings and the best of both kept
(:func:`measure_cpu_peaks`, :func:`measure_gpu_peaks`, :func:`measure_again`): a shared machine drifts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ami.runtime.engines.base import cpu_flags

from .timing import LatencyError, time_fn

PEAK_PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    f = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & f)


def _best(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up (and JIT / first-touch)
    ts = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _torch_mm(n: int, dtype: str, threads: int | None):
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dt)
    b = torch.randn(n, n, generator=g).to(dt)
    return (lambda: torch.mm(a, b)), f"torch {torch.__version__} mm"


def _openvino_mm(n: int, dtype: str, threads: int | None):
    import openvino as ov
    from openvino import opset13 as ops

    from ami.runtime.engines.openvino import core

    rng = np.random.default_rng(0)
    x = ops.parameter([n, n], ov.Type.f32, name="x")
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if dtype == "int8":
        # u8 activations (FakeQuantize to 0..255) times s8 weights: OpenVINO's int8 GEMM (VNNI / AMX)
        lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        xq = ops.fake_quantize(x, lo, hi, ops.constant(np.float32(0.0)), ops.constant(np.float32(8.0)), 256)
        w = ops.constant(rng.integers(-127, 128, (n, n), dtype=np.int8))
        wf = ops.multiply(ops.convert(w, ov.Type.f32), ops.constant(np.float32(0.01)))
        y = ops.matmul(xq, wf, False, False)
        config["INFERENCE_PRECISION_HINT"] = "f32"
        data = rng.uniform(-4, 4, (n, n)).astype(np.float32)
    else:
        w = ops.constant(rng.standard_normal((n, n)).astype(np.float32))
        y = ops.matmul(x, w, False, False)
        config["INFERENCE_PRECISION_HINT"] = {"float32": "f32", "bfloat16": "bf16"}[dtype]
        data = rng.standard_normal((n, n)).astype(np.float32)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    model = ov.Model([y], [x], "gemm")
    compiled = core().compile_model(model, "CPU", config)
    req = compiled.create_infer_request()
    what = {"int8": "u8*s8 MatMul (FakeQuantize u8 activations, s8 weights)", "float32": "f32 MatMul",
            "bfloat16": "bf16 MatMul"}[dtype]
    return (lambda: req.infer({0: data}, share_inputs=True)), f"OpenVINO {ov.__version__.split('-')[0]} {what}"


def _ort_matmul_integer(n: int, dtype: str, threads: int | None):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (n, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or 0)
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(),
                             so, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    return (lambda: s.run(None, {"a": a})), f"onnxruntime {ort.__version__} MatMulInteger (u8*s8)"


IMPLEMENTATIONS = {
    "float32": (_torch_mm, _openvino_mm),
    "bfloat16": (_torch_mm, _openvino_mm),
    "int8": (_ort_matmul_integer, _openvino_mm),
}


def cpu_peak(precision: str, n: int = 2048, reps: int = 5, threads: int | None = None) -> dict | None:
    """The best GOP/s of an n x n x n product at ``precision`` (fp32 | bf16 | int8) on the CPU over
    every installed implementation; None when the precision has no hardware support here (bf16) or
    no implementation is installed. The dict lists each implementation's result."""
    dtype = PEAK_PRECISIONS[precision]
    if precision == "bf16" and not cpu_has_bf16():
        return None
    flops = 2.0 * n ** 3
    tried = []
    for make in IMPLEMENTATIONS[dtype]:
        try:
            fn, lib = make(n, dtype, threads)
        except Exception as e:  # a library that is not installed or cannot build the graph
            tried.append({"impl": make.__name__.strip("_"), "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        best = _best(fn, reps)
        tried.append({"impl": lib, "gflops": flops / best / 1e9, "best_s": best})
    ok = [t for t in tried if "gflops" in t]
    if not ok:
        return None
    top = max(ok, key=lambda t: t["gflops"])
    return {"what": f"{n}x{n}x{n} {dtype} matrix product, best of {reps} per implementation; best: {top['impl']}",
            "device": "cpu", "dtype": dtype, "precision": precision, "n": n, "gflops": top["gflops"],
            "best_s": top["best_s"], "threads": threads, "implementations": tried}


def peak_key(device: str, precision: str) -> str:
    """The peaks-dict key a row of ``device`` and ``precision`` is compared with."""
    dtype = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8", "fp16": "float16"}.get(precision, "float32")
    return f"{device}_{dtype}"


def peak_gflops(n: int = 2048, reps: int = 5, device: str = "cpu", dtype: str = "float32") -> dict:
    """Best-of-``reps`` GFLOP/s of an n x n x n matrix product (2 n^3 FLOPs), torch when present, else numpy."""
    flops = 2.0 * n ** 3
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        dev = torch.device(device)
        dt = getattr(torch, dtype)
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        g = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(n, n, generator=g, device=dev, dtype=dt)
        b = torch.randn(n, n, generator=g, device=dev, dtype=dt)
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

        def fn():
            torch.mm(a, b)
            sync()
        lib = f"torch {torch.__version__} mm"
        threads = torch.get_num_threads() if dev.type == "cpu" else None
    else:
        if device != "cpu":
            raise LatencyError("a GPU peak needs torch")
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n)).astype(dtype)
        b = rng.standard_normal((n, n)).astype(dtype)

        def fn():
            a @ b
        lib, threads = f"numpy {np.__version__} matmul", None
    times, _ = time_fn(fn, rounds=reps, warmup=1)
    best = min(times)
    return {"what": f"{n}x{n} {dtype} matrix product ({lib}), best of {reps}", "device": device, "dtype": dtype,
            "n": n, "gflops": flops / best / 1e9, "best_s": best, "threads": threads}


GPU_PEAK_DTYPES = ("float32", "float16")  # the CUDA peaks: rows of fp32 and fp16 engines
GPU_PEAK_MIN_N = 4096  # a GPU needs a larger product than a CPU to reach its peak


def measure_cpu_peaks(peaks: dict, precisions: list[str], *, n: int, reps: int, threads: int | None,
                      log) -> list[str]:
    """The CPU peak of each precision into ``peaks``; returns notes for precisions without one."""
    notes = []
    for prec in precisions:
        log(f"latency: timing the {prec} matrix-product peak")
        pk = cpu_peak(prec, n, reps, threads)
        if pk is not None:
            peaks[peak_key("cpu", prec)] = pk
        else:
            notes.append(f"no {prec} matrix-product peak on this CPU (no hardware support or no library for it): "
                         f"{prec} rows show no % of peak")
    return notes


def measure_gpu_peaks(peaks: dict, *, n: int, reps: int) -> None:
    """The CUDA float32 and float16 peaks into ``peaks``."""
    for dtype in GPU_PEAK_DTYPES:
        peaks[f"cuda_{dtype}"] = peak_gflops(max(n, GPU_PEAK_MIN_N), reps, "cuda", dtype)


def _best_of(first: dict, again: dict | None) -> dict:
    best = again if again is not None and again["gflops"] > first["gflops"] else first
    return {**best, "what": best["what"] + "; best of a measurement before and one after the engine timings",
            "gflops_before_after": [first["gflops"], again["gflops"] if again else None]}


def measure_again(peaks: dict, cpu_precisions: list[str], *, n: int, reps: int, threads: int | None,
                  gpu: bool) -> None:
    """Each peak in ``peaks`` measured once more: the best of both is the machine's peak."""
    for prec in cpu_precisions:
        key = peak_key("cpu", prec)
        if key in peaks:
            peaks[key] = _best_of(peaks[key], cpu_peak(prec, n, reps, threads))
    if gpu:
        for dtype in GPU_PEAK_DTYPES:
            key = f"cuda_{dtype}"
            peaks[key] = _best_of(peaks[key], peak_gflops(max(n, GPU_PEAK_MIN_N), reps, "cuda", dtype))
