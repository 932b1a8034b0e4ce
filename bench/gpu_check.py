"""ami-bench gpu-check: one prepared device check for a GPU workstation (at most ~7 minutes).

It writes ``DIR/gpu-check.md`` and ``DIR/gpu-check.json`` (plus the latency tables it ran) with,
in this order:

1. **environment** - NVIDIA driver and the CUDA version it supports, GPU name, compute capability
   and memory; torch (and its CUDA / cuDNN), TensorRT, cuda-python, ONNX Runtime, timm, PEFT, onnx
   versions; the ONNX Runtime providers that *really* load (a session is created with each listed
   one and asked what it runs on), whether TensorRT's library loads, and which ``ami-mitosis[trt-cuXX]``
   extra fits the driver;
2. **PyTorch eager on CUDA** - the path of ``ami-bench latency``'s CUDA rows (uint8 batch to the
   GPU, ``ami.train.data.eval_batch`` there, network, sigmoid) on a tiny generated model, against
   ONNX Runtime on the CPU;
3. **TensorRT round trip** - ``build_engine`` on a tiny generated ami model at fp32 and fp16, the
   plan run at batches 1, 3, 16 and 37 against ONNX Runtime on the CPU, then the timing cache
   reused by a second build and a corrupted one treated as absent by a third;
4. **ami-bench latency** on the shipped model, with the PyTorch CUDA rows (model-only; no end-to-end);
5. **training steps** - for each of the 17 Table-3 configurations (random initialisation: speed
   only needs the shape), 20 timed steps at batch 8 in the documented precision (``--amp bf16``),
   and the GPU hours they imply, in the layout of docs/reproduce.md section 3.

Every part that cannot run here is *skipped with its reason* (no CUDA GPU, TensorRT not installed,
out of time budget); a failed part is reported and the command exits 1. ``--device cpu`` runs the
same code on the CPU with tiny stand-ins (a rehearsal that proves the check works, not a measurement).

Runs without typer too: ``python -m ami.bench.gpu_check --out DIR``, and from a checkout that is
not installed at all: ``python bench/gpu_check.py --out DIR`` (that checkout's code is used).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

SCHEMA = "ami-bench-gpu-check/1"
BUDGET_S = 400.0  # the whole check; each part gets what is left
ROUND_TRIP_BATCHES = (1, 3, 16, 37)
TRAIN_STEPS, TRAIN_BATCH, WARMUP_STEPS = 20, 8, 3
EVAL_BATCH = 128  # ami.train.fit.predict's batch
AMP = "bf16"  # the precision docs/reproduce.md's 17 commands use (--amp bf16)
# The work of one fold (docs/reproduce.md section 3): 2 312 training crops = 289 steps of 8, 579
# validation crops, a final evaluation of 579 + 3 679 test crops; linear probes embed all 6 573 crops once.
STEPS_PER_EPOCH, VAL_CROPS, FINAL_EVAL_CROPS, ALL_CROPS, EPOCHS = 289, 579, 579 + 3679, 6573, 100
TOL = {"fp32": 1e-4, "fp16": 1e-2}
SECTIONS = ("environment", "pytorch_cuda", "tensorrt_round_trip", "latency", "training_steps")
TITLES = {"environment": "1. Environment", "pytorch_cuda": "2. PyTorch eager on CUDA (ami-bench latency's CUDA rows)",
          "tensorrt_round_trip": "3. TensorRT round trip (build_engine, batches 1/3/16/37, timing cache)",
          "latency": "4. ami-bench latency on the shipped model",
          "training_steps": "5. Training steps of the 17 Table-3 configurations"}


class Deadline:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _version(mod: str):
    try:
        m = __import__(mod)
    except Exception as e:  # report, never crash
        return f"not importable ({_first(e)})"
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
            cp["error"] = _first(e)
            cp["hint"] = G.cuda_python_mismatch()
    env["cuda_python"] = cp
    try:
        from ami.export.tensorrt import gpu_info as export_gpu_info

        env["gpu_facts_for_tensorrt"] = export_gpu_info()
    except Exception as e:  # TensorRTUnavailable on a CPU box
        env["gpu_facts_for_tensorrt"] = {"unavailable": _first(e)}
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
            out[p] = f"listed, but failed: {_first(e)}"
    return out


# -- 2. bug 1's path ------------------------------------------------------------------------------

def pytorch_cuda(work: Path, device: str) -> dict:
    import numpy as np

    from ami.export.checks import session
    from ami.export.synthetic import synthetic_crops, tiny_network, tiny_onnx, tiny_preprocess

    model, _ = tiny_onnx(work / "tiny.onnx") if not (work / "tiny.onnx").is_file() else (work / "tiny.onnx", None)
    pre = tiny_preprocess()
    x = synthetic_crops(37, pre.input_size, seed=11)
    ref = session(model).run(None, {"pixels": x})[0]
    from ami.bench.latency import torch_runner

    r = torch_runner([tiny_network(0)], pre, device, "tiny generated network")
    rows = []
    for b in ROUND_TRIP_BATCHES:
        p = r.predict(x[:b])
        rows.append({"batch": b, "max_abs_dp": float(np.abs(p - ref[:b]).max())})
    worst = max(rw["max_abs_dp"] for rw in rows)
    ok = worst <= TOL["fp32"]
    return {"status": "pass" if ok else "fail", "device": device, "runner": r.label, "provider": r.provider,
            "batches": rows, "max_abs_dp": worst, "tolerance": TOL["fp32"],
            "what": "torch_runner (ami.bench.latency): uint8 batch -> device -> eval_batch -> network -> sigmoid, "
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
    from ami.runtime.engine import load_engine

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
    from ami.runtime.engine import load_engine
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
        rec["runtime_engine"] = f"not run: {_first(e)}"
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
        out["timing_cache"]["corrupt"] = {"error": _first(e)}
        failed.append("corrupt timing cache")
    if out["timing_cache"]["reuse"]["state"] != "reused":
        failed.append("timing cache not reused")
    return failed


def _trt_reason() -> str:
    try:
        from ami.export.tensorrt import TensorRTUnavailable, require_tensorrt

        require_tensorrt()
    except TensorRTUnavailable as e:
        return str(e).split(". On a GPU machine")[0]
    except Exception as e:  # BLE001
        return _first(e)
    return "TensorRT is installed"


# -- 4. ami-bench latency -------------------------------------------------------------------------

def latency(out_dir: Path, device: str, data_root, log, rehearsal: bool) -> dict:
    import torch

    from ami.bench.latency import run_latency

    if device == "cuda" and not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA GPU (torch.cuda.is_available() is False)"}
    kw = dict(batches=(1, 8, 32, 128), seconds=0.5, min_rounds=5, warmup=2, e2e=False, peak_reps=3)
    if rehearsal:
        kw = dict(batches=(1,), rounds=1, warmup=0, e2e=False, peak_n=64, peak_reps=1)
    rep = run_latency(None, data_root=data_root, show_progress=False, log=log, **kw)
    (out_dir / "latency.json").write_text(rep.to_json())
    (out_dir / "latency.md").write_text(rep.to_markdown())
    cuda_rows = [r for r in rep.rows if r.device == "cuda" and r.engine == "PyTorch eager"]
    res = {"rows": len(rep.rows), "cuda_rows": len([r for r in rep.rows if r.device == "cuda"]),
           "pytorch_cuda_rows": [{"batch": r.batch, "p50_ms": r.stats["p50_ms"], "crops_per_s": r.stats["crops_per_s"]}
                                 for r in cuda_rows],
           "skipped": rep.skipped, "files": ["latency.json", "latency.md"], "seconds": round(rep.seconds, 1),
           "markdown": rep.to_markdown()}
    if device == "cuda":
        res["status"] = "pass" if cuda_rows else "fail"
        if not cuda_rows:
            res["reason"] = "no PyTorch CUDA rows: " + "; ".join(f"{s['engine']}: {s['reason']}" for s in rep.skipped)
    else:
        res["status"] = "pass" if rep.rows else "fail"
    return res


# -- 5. training steps ----------------------------------------------------------------------------

def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train_steps(model_name: str, method: str, dev, *, steps: int, batch: int, tiny: bool, amp: str) -> dict:
    """Median seconds of one training step (linear: one embedding batch) and of one evaluation batch.
    The step is ami-train's own (:class:`ami.train.loop.TrainStep`: the recipe's augmentation, loss,
    optimiser, mixed precision), without EMA and learning-rate schedule."""
    import numpy as np
    import torch

    from ami.export.synthetic import synthetic_crops
    from ami.train import data as D
    from ami.train.loop import TrainStep, autocast, grad_scaler, make_optimizer
    from ami.train.models import count_params, create
    from ami.train.registry import get

    cfg = get(model_name)
    r = cfg.recipe_for(method)
    pre = cfg.preprocess
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    with torch.device(dev):  # random init on the device itself: seconds, not minutes, for a 1.1 B ViT-g
        model = create(cfg, method, random_init=True, tiny=tiny, drop_rate=r.drop_rate, drop_path_rate=r.drop_path_rate,
                       **({k: getattr(r, k) for k in ("lora_rank", "lora_alpha", "lora_dropout")} if method == "lora" else {}))
    model.to(dev)
    build_s = time.perf_counter() - t0
    use_amp = amp in ("bf16", "fp16") and (dev.type == "cuda" or amp == "bf16")
    crops = torch.from_numpy(synthetic_crops(batch, pre.input_size, seed=3))
    y = torch.tensor([i % 2 for i in range(batch)], dtype=torch.float32, device=dev)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], r)
    train_step = TrainStep(model, opt, r, pre, r.policy(), dev, amp, torch.Generator().manual_seed(0),
                           scaler=grad_scaler(dev, amp))

    def step():
        if method == "linear":  # the frozen backbone's GPU work: embeddings of evaluation tensors
            model.eval()
            with torch.no_grad(), autocast(dev, amp):
                model(D.eval_batch(crops, pre).to(dev))
        else:
            model.train()
            train_step(crops, y)
        _sync(dev)

    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    # evaluation batches (validation each epoch, the final test evaluation) at fit.predict's batch
    eb = min(EVAL_BATCH, 16) if tiny else EVAL_BATCH
    xe = torch.from_numpy(synthetic_crops(eb, pre.input_size, seed=4))
    model.eval()
    etimes = []
    for i in range(3):
        t = time.perf_counter()
        with torch.no_grad(), autocast(dev, amp):
            model(D.eval_batch(xe, pre).to(dev))
        _sync(dev)
        if i:
            etimes.append(time.perf_counter() - t)
    rec = {"model": model_name, "method": method, "arch": cfg.arch, "display": cfg.display,
           "params_trainable": count_params(model, True), "params": count_params(model),
           "build_s": round(build_s, 2), "steps": steps, "batch": batch, "amp": amp if use_amp else "none",
           "step_s_median": float(np.median(times)), "step_s_p90": float(np.percentile(times, 90)),
           "step_s_all": [round(t, 5) for t in times], "eval_batch": eb, "eval_batch_s": float(np.median(etimes)),
           "what": "embedding batch (no_grad forward of the frozen backbone)" if method == "linear"
           else "augment (CPU) + copy + forward/backward + optimizer step"}
    if dev.type == "cuda":
        rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    model = opt = train_step = None  # release the network (the step closure holds it) before emptying the cache
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def projections(rec: dict) -> dict:
    """GPU time of one fold / five folds implied by the measured step (docs/reproduce.md section 3's work)."""
    s, e = rec["step_s_median"], rec["eval_batch_s"]
    eb = rec["eval_batch"]
    if rec["method"] == "linear":
        emb = math.ceil(ALL_CROPS / rec["batch"]) * s
        return {"embeddings_once_s": emb, "five_folds_s": emb}
    epoch = STEPS_PER_EPOCH * s + math.ceil(VAL_CROPS / eb) * e
    fold = EPOCHS * epoch + math.ceil(FINAL_EVAL_CROPS / eb) * e
    return {"epoch_s": epoch, "fold_100_epochs_s": fold, "five_folds_s": 5 * fold}


def training_section(device: str, deadline: Deadline, *, models: list[tuple[str, str]] | None, steps: int,
                     tiny: bool, log) -> dict:
    import torch

    from ami.train.registry import table3_configs

    if device == "cuda" and not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA GPU (torch.cuda.is_available() is False)"}
    dev = torch.device(device)
    if dev.type == "cuda":  # PyTorch's defaults, what ami-train runs (the latency part changed them)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False
    todo = models or table3_configs()
    rows, failed = [], []
    for name, method in todo:
        if deadline.left() < 15:
            rows.append({"model": name, "method": method, "status": "skipped",
                         "reason": "time budget of the check used up (rerun with --only training_steps)"})
            continue
        log(f"gpu-check: training steps {name}/{method} ({'tiny stand-in, ' if tiny else ''}{device})")
        try:
            # the CPU rehearsal runs float32: bf16 autocast is emulated (and very slow) on most CPUs
            rec = train_steps(name, method, dev, steps=steps, batch=TRAIN_BATCH, tiny=tiny,
                              amp=AMP if dev.type == "cuda" else "none")
            rec.update(projections(rec), status="pass")
        except Exception as e:  # one architecture failing must not hide the others
            rec = {"model": name, "method": method, "status": "fail", "error": _first(e),
                   "trace": traceback.format_exc(limit=3)}
            failed.append(f"{name}/{method}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(rec)
    out = {"status": "fail" if failed else "pass", "rows": rows, "tiny_stand_ins": tiny, "device": device,
           "amp": AMP if dev.type == "cuda" else "none", "steps": steps, "batch": TRAIN_BATCH}
    if failed:
        out["failed"] = failed
    return out


# -- report ---------------------------------------------------------------------------------------

def _dur(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def to_markdown(rep: dict) -> str:
    L = ["# ami-bench gpu-check", "",
         f"Created {rep['created']} on {rep['machine']}; device {rep['device']}"
         + (" - **CPU REHEARSAL with tiny stand-ins: no GPU numbers**" if rep.get("rehearsal") else "")
         + f"; total {rep['seconds']:.0f} s (budget {rep['budget_s']:.0f} s). Overall: **{rep['status']}**.", ""]
    for key in SECTIONS:
        sec = rep["sections"].get(key, {"status": "skipped", "reason": "not run"})
        L += [f"## {TITLES[key]}", "", f"Status: **{sec['status']}**" + (f" - {sec['reason']}" if sec.get("reason") else "")
              + (f" ({sec['seconds']:.1f} s)" if sec.get("seconds") is not None else ""), ""]
        if sec.get("error"):
            L += [f"Error: `{sec['error']}`", ""]
        if key == "environment" and "data" in sec:
            d = sec["data"]
            smi = d.get("nvidia_smi") or {}
            t = d.get("torch", {})
            L += ["| fact | value |", "|---|---|"]
            rows = [("GPU(s) (nvidia-smi)", "; ".join(f"{g['name']} (sm {g['compute_capability']}, {g['memory_total']}, "
                                                       f"driver {g['driver_version']})" for g in smi.get("gpus", []))
                     or "nvidia-smi not found"),
                    ("CUDA supported by the driver", d.get("driver_cuda_version") or "no NVIDIA driver"),
                    ("TensorRT extra for this driver", d.get("trt_extra_for_this_driver") or "n/a"),
                    ("torch", f"{t.get('version')} (CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')}, "
                              f"cuda available: {t.get('cuda_available')})"),
                    ("torch devices", "; ".join(f"{x['name']} sm {x['compute_capability']} {x['memory_gib']} GiB"
                                                for x in t.get("devices", [])) or "none"),
                    ("TensorRT", f"package {d['tensorrt']['package']}, import {d['tensorrt']['import']}, libnvinfer "
                                 f"{'loads' if d['tensorrt']['libnvinfer_loads'] else 'does not load'} "
                                 f"({d['tensorrt']['libnvinfer']})"),
                    ("cuda-python", json.dumps(d.get("cuda_python"), ensure_ascii=False)),
                    ("GPU facts for TensorRT (export)", json.dumps(d.get("gpu_facts_for_tensorrt"), ensure_ascii=False)),
                    ("ONNX Runtime providers", "; ".join(f"{k}: {v}" for k, v in d.get("onnxruntime_providers", {}).items())),
                    ("versions", ", ".join(f"{k} {v}" for k, v in d.get("versions", {}).items()))]
            L += [f"| {a} | {str(b).replace('|', '/')} |" for a, b in rows] + [""]
        elif key == "pytorch_cuda" and sec.get("batches"):
            L += [f"{sec['what']}; {sec['provider']}.", "", "| batch | max \\|Δp\\| vs ORT CPU |", "|---|---|"]
            L += [f"| {b['batch']} | {b['max_abs_dp']:.2e} |" for b in sec["batches"]]
            L += ["", f"Tolerance {sec['tolerance']:g}.", ""]
        elif key == "tensorrt_round_trip" and sec.get("precisions"):
            L += [f"TensorRT {sec['tensorrt']} on {sec['gpu'].get('gpu_name')} (sm {sec['gpu'].get('compute_capability')}).", "",
                  "| precision | build s | batch | max \\|Δp\\| vs ORT CPU fp32 | ok |", "|---|---|---|---|---|"]
            for p, rec in sec["precisions"].items():
                for b in rec["batches"]:
                    L.append(f"| {p} | {rec['build_s']} | {b['batch']} | {b['max_abs_dp']:.2e} | {'yes' if b['ok'] else 'NO'} |")
                L.append(f"| {p} | | all 37 (ami.runtime TrtPlanEngine) | {rec.get('runtime_engine_max_abs_dp', float('nan')):.2e} "
                         f"| {rec.get('runtime_engine')} |")
            tc = sec["timing_cache"]
            L += ["", f"Timing cache: second build {tc['reuse']['state']} it ({tc['reuse']['build_s']} s vs "
                      f"{tc['reuse']['first_build_s']} s); corrupted cache: {json.dumps(tc.get('corrupt'), ensure_ascii=False)}", ""]
        elif key == "latency" and sec.get("markdown"):
            L += [sec["markdown"].replace("\n## ", "\n### ").replace("## Model-only", "### Model-only", 1), ""]
        elif key == "training_steps" and sec.get("rows"):
            L += [f"{sec['steps']} timed steps at batch {sec['batch']} after {WARMUP_STEPS} warm-up steps, "
                  f"--amp {sec['amp']}, random initialisation"
                  + (" - TINY STAND-INS on the CPU: these numbers say nothing about a GPU" if sec.get("tiny_stand_ins") else "")
                  + ". Full/LoRA: a step is augmentation (CPU) + copy + forward/backward + optimizer step; linear: "
                    "one embedding batch of the frozen backbone. Projections use docs/reproduce.md's work per fold "
                    f"({STEPS_PER_EPOCH} steps and {VAL_CROPS} validation crops per epoch, {EPOCHS} epochs at most, "
                    f"{FINAL_EVAL_CROPS} crops of final evaluation; linear: all {ALL_CROPS} crops embedded once at batch "
                    f"{TRAIN_BATCH}, an upper bound since ami-train embeds at batch 64).", "",
                  "| configuration | s / step (median, p90) | eval batch s | peak GiB | per epoch | one fold, 100 epochs (ceiling) | 5 folds, ceiling |",
                  "|---|---|---|---|---|---|---|"]
            for r in sec["rows"]:
                label = f"{r.get('display', r['model'])} ({r['method']})"
                if r["status"] != "pass":
                    L.append(f"| {label} | {r['status']}: {r.get('reason') or r.get('error')} | | | | | |")
                    continue
                mem = r.get("peak_memory_gib", "n/a")
                if r["method"] == "linear":
                    L.append(f"| {label} | {r['step_s_median']:.3f} ({r['step_s_p90']:.3f}) | {r['eval_batch_s']:.3f} | {mem} "
                             f"| head: < 1 s (CPU) | embeddings once: {_dur(r['embeddings_once_s'])}; head ≤ 15 s "
                             f"| {_dur(r['five_folds_s'] + 5 * 15)} |")
                else:
                    L.append(f"| {label} | {r['step_s_median']:.3f} ({r['step_s_p90']:.3f}) | {r['eval_batch_s']:.3f} | {mem} "
                             f"| {_dur(r['epoch_s'])} | {_dur(r['fold_100_epochs_s'])} | {_dur(r['five_folds_s'])} |")
            tot = sum(r.get("five_folds_s", 0) for r in sec["rows"] if r["status"] == "pass")
            L += ["", f"Sum of the measured configurations, 5 folds at the 100-epoch ceiling: {_dur(tot)} of GPU time "
                      "(early stopping ends most folds earlier).", ""]
    return "\n".join(L) + "\n"


# -- the check ------------------------------------------------------------------------------------

def run_check(out: str | Path, *, device: str = "auto", budget_s: float = BUDGET_S, only: list[str] | None = None,
              models: list[tuple[str, str]] | None = None, steps: int = TRAIN_STEPS, data_root=None,
              log=lambda s: print(s, file=sys.stderr)) -> dict:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(budget_s)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if device == "auto":
        device = "cuda" if has_cuda else "none"
    rehearsal = device == "cpu"
    gpu_dev = "cpu" if rehearsal else "cuda"
    no_gpu = "no CUDA GPU on this machine (torch.cuda.is_available() is False); rerun on a GPU box, or --device cpu " \
             "for a CPU rehearsal"
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    if has_cuda:
        machine += f", {torch.cuda.get_device_name(0)}"
    rep: dict = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device,
                 "rehearsal": rehearsal, "budget_s": budget_s, "machine": machine,
                 "settings": {"only": only, "models": models, "steps": steps}, "sections": {}}
    with tempfile.TemporaryDirectory(prefix="ami-gpu-check-") as tmp:
        work = Path(tmp)
        for key in SECTIONS:
            if only and key not in only:
                rep["sections"][key] = {"status": "skipped", "reason": "not selected (--only)"}
                continue
            if key != "environment" and device == "none":
                reason = no_gpu
                if key == "tensorrt_round_trip":
                    reason += f"; {_trt_reason()}"
                rep["sections"][key] = {"status": "skipped", "reason": reason}
                continue
            if key != "environment" and deadline.left() < 10:
                rep["sections"][key] = {"status": "skipped", "reason": f"time budget ({budget_s:.0f} s) used up"}
                continue
            log(f"gpu-check: {TITLES[key]}")
            t0 = time.perf_counter()
            try:
                if key == "environment":
                    sec = {"status": "info", "data": environment(work, device)}
                elif key == "pytorch_cuda":
                    sec = pytorch_cuda(work, gpu_dev)
                elif key == "tensorrt_round_trip":
                    sec = tensorrt_round_trip(work, gpu_dev, log)
                elif key == "latency":
                    sec = latency(out_dir, gpu_dev, data_root, log, rehearsal)
                else:
                    sec = training_section(gpu_dev, deadline, models=models, steps=2 if rehearsal else steps,
                                           tiny=rehearsal, log=log)
            except Exception as e:  # a part that crashes is a failed part, the rest still runs
                sec = {"status": "fail", "error": _first(e), "trace": traceback.format_exc(limit=6)}
            sec["seconds"] = round(time.perf_counter() - t0, 2)
            rep["sections"][key] = sec
    rep["seconds"] = round(deadline.seconds - deadline.left(), 1)
    states = [s["status"] for s in rep["sections"].values()]
    rep["status"] = "fail" if "fail" in states else "pass"
    (out_dir / "gpu-check.json").write_text(json.dumps(rep, indent=1, ensure_ascii=False, default=str) + "\n")
    (out_dir / "gpu-check.md").write_text(to_markdown(rep))
    return rep


def parse_models(text: str | None) -> list[tuple[str, str]] | None:
    """'uni:lora,edge:full' -> [(uni, lora), (edge, full)]; None/'' -> the 17 Table-3 configurations."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        name, _, method = part.strip().partition(":")
        out.append((name, method or "full"))
    return out


EPILOG = """Examples:

\b
  ami-bench gpu-check --out results/gpu-check            # on a GPU box: at most ~7 minutes
  python -m ami.bench.gpu_check --out results/gpu-check  # the same, without typer
  ami-bench gpu-check --out /tmp/rehearsal --device cpu --models efficientnetv2_m:full,uni:lora

Writes DIR/gpu-check.md and DIR/gpu-check.json (and DIR/latency.{json,md}); exit code 1 when a part
failed, 0 when every part passed or was skipped with its reason."""


def _args(argv=None):
    ap = argparse.ArgumentParser(prog="ami-bench gpu-check", description=__doc__.split("\n\n")[0],
                                 epilog=EPILOG.replace("\b\n", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu-check.md / gpu-check.json")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                    help="auto: the GPU when there is one (else every GPU part is skipped); cpu: a rehearsal with tiny models")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    ap.add_argument("--only", default="", help=f"comma-separated parts: {', '.join(SECTIONS)}")
    ap.add_argument("--models", default="", help="MODEL:METHOD,... instead of the 17 Table-3 configurations")
    ap.add_argument("--steps", type=int, default=TRAIN_STEPS, help="timed training steps per configuration")
    ap.add_argument("--data-root", type=Path, default=None, help="only used by the latency part (real crops as pixels)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = _args(argv)
    rep = run_check(a.out, device=a.device, budget_s=a.budget, only=[s for s in a.only.split(",") if s] or None,
                    models=parse_models(a.models), steps=a.steps, data_root=a.data_root)
    print(f"gpu-check: {rep['status']} in {rep['seconds']:.0f} s; wrote {a.out / 'gpu-check.md'} and "
          f"{a.out / 'gpu-check.json'}", file=sys.stderr)
    for k, s in rep["sections"].items():
        print(f"  {k}: {s['status']}" + (f" - {s.get('reason') or s.get('error')}" if s.get("reason") or s.get("error") else ""),
              file=sys.stderr)
    return 1 if rep["status"] == "fail" else 0


def register(app) -> None:
    import typer

    @app.command("gpu-check", epilog=EPILOG)
    def gpu_check_cmd(
        out: Path = typer.Option(..., "--out", help="Folder for gpu-check.md and gpu-check.json."),
        device: str = typer.Option("auto", "--device", help="auto (the GPU when there is one; else every GPU part is "
                                   "skipped with its reason) | cuda | cpu (a rehearsal with tiny stand-ins)."),
        budget: float = typer.Option(BUDGET_S, "--budget", help="Seconds for the whole check (each part gets what is left)."),
        only: str = typer.Option("", "--only", help=f"Comma-separated parts: {', '.join(SECTIONS)}."),
        models: str = typer.Option("", "--models", help="MODEL:METHOD,... instead of the 17 Table-3 configurations."),
        steps: int = typer.Option(TRAIN_STEPS, "--steps", help="Timed training steps per configuration."),
        data_root: Path | None = typer.Option(None, "--data-root", help="Used by the latency part only (real crops)."),
    ):
        """One prepared device check: environment, PyTorch on CUDA, TensorRT round trip, latency, training steps."""
        if device not in ("auto", "cuda", "cpu"):
            raise typer.BadParameter("--device must be auto, cuda or cpu")
        argv = ["--out", str(out), "--device", device, "--budget", str(budget), "--only", only, "--models", models,
                "--steps", str(steps)] + (["--data-root", str(data_root)] if data_root else [])
        raise typer.Exit(main(argv))


def _bootstrap_checkout() -> None:
    """Run from a checkout that is not installed (``python bench/gpu_check.py``): make ``ami``
    importable by pointing a temporary ``ami/`` namespace folder at the checkout's layer folders."""
    import atexit
    import shutil

    repo = Path(__file__).resolve().parents[1]
    root = Path(tempfile.mkdtemp(prefix="ami-checkout-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "ami").mkdir()
    for layer in ("runtime", "train", "export", "bench"):
        (root / "ami" / layer).symlink_to(repo / layer, target_is_directory=True)
    sys.path.insert(0, str(root))


if __name__ == "__main__":
    if __spec__ is None:  # run as a file of a checkout: that checkout's code, installed or not
        _bootstrap_checkout()
    sys.exit(main())
