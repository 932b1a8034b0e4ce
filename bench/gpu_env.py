"""The device parts of ``ami-bench gpu-check`` that are not timings: the environment (driver, CUDA,
versions, the ONNX Runtime providers that really load, TensorRT), the PyTorch CUDA path of
``ami-bench latency`` against ONNX Runtime on the CPU, and the TensorRT round trip."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

ROUND_TRIP_BATCHES = (1, 3, 16, 37)
TOL = {"fp32": 1e-4, "fp16": 1e-2}


def short_error(e: BaseException) -> str:
    """``Type: first line`` of an exception, as the check reports a part that failed."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _version(mod: str):
    try:
        m = __import__(mod)
    except Exception as e:  # report, never crash
        return f"not importable ({short_error(e)})"
    return getattr(m, "__version__", "?")


# -- 1. environment ------------------------------------------------------------------------------

def environment(work: Path, device: str) -> dict:
    from ami.runtime import gpu as G

    env: dict = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count()}
    env["nvidia_smi"] = G.nvidia_smi()
    drv = G.driver_cuda_version()
    env["driver_cuda_version"] = f"{drv[0]}.{drv[1]}" if drv else None
    env["trt_extra_for_this_driver"] = G.trt_extra(drv[0]) if drv else None
    try:
        import torch

        t = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
        try:
            t["cudnn"] = torch.backends.cudnn.version()
        except Exception:  # BLE001
            t["cudnn"] = None
        if t["cuda_available"]:
            t["devices"] = []
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                t["devices"].append({"name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                                     "memory_gib": round(p.total_memory / 2**30, 1)})
            t["bf16_supported"] = torch.cuda.is_bf16_supported()
        env["torch"] = t
    except ImportError as e:
        env["torch"] = {"version": f"not installed ({e})"}
    env["versions"] = {m: _version(m) for m in ("numpy", "onnx", "onnxruntime", "timm", "peft", "typer", "tqdm",
                                                 "safetensors")}
    env["tensorrt"] = {"package": G.package_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
                       "import": _version("tensorrt")}
    ok, why = G.tensorrt_libraries()
    env["tensorrt"]["libnvinfer_loads"] = ok
    env["tensorrt"]["libnvinfer"] = why
    cp = {"version": G.cuda_python_version()}
    if cp["version"]:
        try:
            from ami.runtime.engines.tensorrt import gpu_info

            cp["gpu_info"] = gpu_info(0)
        except Exception as e:  # BLE001
            cp["error"] = short_error(e)
            cp["hint"] = G.cuda_python_mismatch()
    env["cuda_python"] = cp
    try:
        from ami.export.tensorrt import gpu_info as export_gpu_info

        env["gpu_facts_for_tensorrt"] = export_gpu_info()
    except Exception as e:  # TensorRTUnavailable on a CPU box
        env["gpu_facts_for_tensorrt"] = {"unavailable": short_error(e)}
    env["onnxruntime_providers"] = ort_providers(work)
    return env


def ort_providers(work: Path) -> dict:
    """Each provider onnxruntime lists -> what a session asked for it really runs on."""
    import onnxruntime as ort

    from ami.export.synthetic import tiny_onnx

    model = work / "probe.onnx"
    if not model.is_file():
        tiny_onnx(model)
    out = {}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for p in ort.get_available_providers():
        if p == "CPUExecutionProvider":
            out[p] = "loads"
            continue
        opts = {"trt_engine_cache_enable": False} if p == "TensorrtExecutionProvider" else {}
        try:
            s = ort.InferenceSession(str(model), sess_options=so, providers=[(p, opts), "CPUExecutionProvider"])
            used = s.get_providers()
            out[p] = "loads" if used and used[0] == p else f"listed, but did not load (the session runs on {used[0]})"
        except Exception as e:  # BLE001
            out[p] = f"listed, but failed: {short_error(e)}"
    return out


# -- 2. the PyTorch CUDA path ------------------------------------------------------------------------------

def pytorch_cuda(work: Path, device: str) -> dict:
    import numpy as np

    from ami.export.checks import session
    from ami.export.synthetic import synthetic_crops, tiny_network, tiny_onnx, tiny_preprocess

    model, _ = tiny_onnx(work / "tiny.onnx") if not (work / "tiny.onnx").is_file() else (work / "tiny.onnx", None)
    pre = tiny_preprocess()
    x = synthetic_crops(37, pre.input_size, seed=11)
    ref = session(model).run(None, {"pixels": x})[0]
    from ami.bench.timing import torch_runner

    r = torch_runner([tiny_network(0)], pre, device, "tiny generated network")
    rows = []
    for b in ROUND_TRIP_BATCHES:
        p = r.predict(x[:b])
        rows.append({"batch": b, "max_abs_dp": float(np.abs(p - ref[:b]).max())})
    worst = max(rw["max_abs_dp"] for rw in rows)
    ok = worst <= TOL["fp32"]
    return {"status": "pass" if ok else "fail", "device": device, "runner": r.label, "provider": r.provider,
            "batches": rows, "max_abs_dp": worst, "tolerance": TOL["fp32"],
            "what": "torch_runner (ami.bench.timing): uint8 batch -> device -> eval_batch -> network -> sigmoid, "
                    "vs the exported ONNX model on ONNX Runtime CPU"}


# -- 3. TensorRT round trip -----------------------------------------------------------------------

def tensorrt_round_trip(work: Path, device: str, log) -> dict:
    """Build fp32 and fp16 plans of a tiny ami model with build_engine, check each against ONNX
    Runtime on batches 1/3/16/37 (and through ami's own TensorRT engine), then check that the
    timing cache is reused by the next build and that a corrupted one is treated as absent."""
    import numpy as np

    from ami.export.checks import session
    from ami.export.synthetic import synthetic_crops, tiny_onnx
    from ami.export.tensorrt import TensorRTUnavailable, require_tensorrt
    from ami.runtime.engines import load_engine

    try:
        trt, _, gpu = require_tensorrt()
    except TensorRTUnavailable as e:
        return {"status": "skipped", "reason": str(e)}
    model = work / "tiny.onnx"
    if not model.is_file():
        tiny_onnx(model)
    meta = load_engine(model, provider="cpu").meta
    x = synthetic_crops(max(ROUND_TRIP_BATCHES), meta.preprocess.input_size, seed=7)
    ref = session(model).run(None, {"pixels": x})[0].astype(np.float64)
    cache = work / "timing.cache"
    cache.unlink(missing_ok=True)
    out: dict = {"tensorrt": trt.__version__, "gpu": gpu, "precisions": {}, "timing_cache": {}}
    failed = []
    batches = (1, 16, max(ROUND_TRIP_BATCHES))
    for precision in ("fp32", "fp16"):
        rec = _plan_round_trip(model, meta, precision, x, ref, work=work, cache=cache, batches=batches, log=log)
        if not all(b["ok"] for b in rec["batches"]) or rec.get("runtime_engine_ok") is False:
            failed.append(precision)
        out["precisions"][precision] = rec
    failed += _timing_cache_round_trip(model, meta, out, work=work, cache=cache, batches=batches, log=log)
    out["status"] = "fail" if failed else "pass"
    if failed:
        out["failed"] = failed
    return out


def _plan_round_trip(model: Path, meta, precision: str, x, ref, *, work: Path, cache: Path, batches: tuple,
                     log) -> dict:
    """Build one plan (fp16: from the fp16 graph of ``model``) with its side file, and compare its
    probabilities with ONNX Runtime's ``ref`` per round-trip batch, and through load_engine."""
    from dataclasses import replace

    import numpy as np
    import onnx

    from ami.export.onnx_export import write_model
    from ami.export.tensorrt import build_engine, fp16_graph, run_plan
    from ami.runtime.engines import load_engine
    from ami.runtime.engines.tensorrt import write_plan_sidecar

    src = model
    if precision == "fp16":
        src = work / "tiny-fp16.onnx"
        write_model(fp16_graph(onnx.load(str(model))), src, meta)
    plan = work / f"tiny-{precision}.plan"
    t0 = time.perf_counter()
    info = build_engine(src, plan, input_size=meta.preprocess.input_size, batches=batches, precision=precision,
                        timing_cache=cache, log=log)
    build_s = time.perf_counter() - t0
    write_plan_sidecar(plan, replace(meta, precision=precision), tensorrt_version=info["version"], gpu_name=info["gpu_name"],
                       compute_capability=info["compute_capability"], profile=dict(info["profile"]))
    rec = {"build_s": round(build_s, 2), "timing_cache_state": info["timing_cache_state"], "batches": []}
    for b in ROUND_TRIP_BATCHES:
        p, _ = run_plan(plan, x[:b], 1, max(batches), log=log)
        d = float(np.abs(p - ref[:b]).max())
        rec["batches"].append({"batch": b, "max_abs_dp": d, "ok": d <= TOL[precision]})
    try:
        eng = load_engine(plan)
        rec["runtime_engine"] = eng.provider
        d = float(np.abs(eng.predict(x) - ref).max())
        rec["runtime_engine_max_abs_dp"] = d
        rec["runtime_engine_ok"] = d <= TOL[precision]
    except Exception as e:  # ami-infer's runner needs cuda-python; report why not
        rec["runtime_engine"] = f"not run: {short_error(e)}"
    rec["tolerance"] = TOL[precision]
    return rec


def _timing_cache_round_trip(model: Path, meta, out: dict, *, work: Path, cache: Path, batches: tuple,
                             log) -> list[str]:
    """The timing cache: reused by the next build, a corrupted one treated as absent. Fills
    ``out["timing_cache"]``; returns what failed."""
    from ami.export.tensorrt import build_engine

    failed = []
    t0 = time.perf_counter()
    again = build_engine(model, work / "again.plan", input_size=meta.preprocess.input_size, batches=batches,
                         precision="fp32", timing_cache=cache, log=log)
    out["timing_cache"]["reuse"] = {"state": again["timing_cache_state"], "build_s": round(time.perf_counter() - t0, 2),
                                    "first_build_s": out["precisions"]["fp32"]["build_s"]}
    cache.write_bytes(b"\x00this is not a TensorRT timing cache\x00" * 32)
    logs: list[str] = []
    t0 = time.perf_counter()
    try:
        bad = build_engine(model, work / "bad.plan", input_size=meta.preprocess.input_size, batches=batches,
                           precision="fp32", timing_cache=cache, log=lambda s: (logs.append(s), log(s)))
        out["timing_cache"]["corrupt"] = {"state": bad["timing_cache_state"], "build_s": round(time.perf_counter() - t0, 2),
                                          "warnings": [m for m in logs if "timing cache" in m],
                                          "plan_bytes": (work / "bad.plan").stat().st_size}
    except Exception as e:  # BLE001
        out["timing_cache"]["corrupt"] = {"error": short_error(e)}
        failed.append("corrupt timing cache")
    if out["timing_cache"]["reuse"]["state"] != "reused":
        failed.append("timing cache not reused")
    return failed


def trt_reason() -> str:
    """Why TensorRT cannot run here, in one line (or that it is installed)."""
    try:
        from ami.export.tensorrt import TensorRTUnavailable, require_tensorrt

        require_tensorrt()
    except TensorRTUnavailable as e:
        return str(e).split(". On a GPU machine")[0]
    except Exception as e:  # BLE001
        return short_error(e)
    return "TensorRT is installed"
