"""The report of ``ami-bench gpu-check``: its parts in order, their titles, and ``gpu-check.md``
rendered from the JSON record (one renderer per part)."""

from __future__ import annotations

import json

from .gpu_train import ALL_CROPS, EPOCHS, FINAL_EVAL_CROPS, STEPS_PER_EPOCH, TRAIN_BATCH, VAL_CROPS, WARMUP_STEPS

SECTIONS = ("environment", "pytorch_cuda", "tensorrt_round_trip", "latency", "end_to_end", "training_steps")
TITLES = {"environment": "1. Environment", "pytorch_cuda": "2. PyTorch eager on CUDA (ami-bench latency's CUDA rows)",
          "tensorrt_round_trip": "3. TensorRT round trip (build_engine, batches 1/3/16/37, timing cache)",
          "latency": "4. ami-bench latency on the shipped model",
          "end_to_end": "5. End to end: ami-infer on crops against this box's decode bound",
          "training_steps": "6. Training steps of the 17 Table-3 configurations: the loop against a bare step"}


def dur(s: float | None) -> str:
    """Seconds as a report prints a duration: s, min or h."""
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
        L += [f"## {TITLES[key]}", "", f"Status: **{sec['status']}**"
              + (f" - {sec['reason']}" if sec.get("reason") else "")
              + (f" ({sec['seconds']:.1f} s)" if sec.get("seconds") is not None else ""), ""]
        if sec.get("error"):
            L += [f"Error: `{sec['error']}`", ""]
        L += RENDERERS[key](sec)
    return "\n".join(L) + "\n"


def _environment(sec: dict) -> list[str]:
    if "data" not in sec:
        return []
    d = sec["data"]
    smi = d.get("nvidia_smi") or {}
    t = d.get("torch", {})
    trt = d["tensorrt"]
    gpus = "; ".join(f"{g['name']} (sm {g['compute_capability']}, {g['memory_total']}, driver {g['driver_version']})"
                     for g in smi.get("gpus", []))
    rows = [("GPU(s) (nvidia-smi)", gpus or "nvidia-smi not found"),
            ("CUDA supported by the driver", d.get("driver_cuda_version") or "no NVIDIA driver"),
            ("TensorRT extra for this driver", d.get("trt_extra_for_this_driver") or "n/a"),
            ("torch", f"{t.get('version')} (CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')}, "
                      f"cuda available: {t.get('cuda_available')})"),
            ("torch devices", "; ".join(f"{x['name']} sm {x['compute_capability']} {x['memory_gib']} GiB"
                                        for x in t.get("devices", [])) or "none"),
            ("TensorRT", f"package {trt['package']}, import {trt['import']}, libnvinfer "
                         f"{'loads' if trt['libnvinfer_loads'] else 'does not load'} ({trt['libnvinfer']})"),
            ("cuda-python", json.dumps(d.get("cuda_python"), ensure_ascii=False)),
            ("GPU facts for TensorRT (export)", json.dumps(d.get("gpu_facts_for_tensorrt"), ensure_ascii=False)),
            ("ONNX Runtime providers", "; ".join(f"{k}: {v}" for k, v in d.get("onnxruntime_providers", {}).items())),
            ("versions", ", ".join(f"{k} {v}" for k, v in d.get("versions", {}).items()))]
    return ["| fact | value |", "|---|---|"] + [f"| {a} | {str(b).replace('|', '/')} |" for a, b in rows] + [""]


def _pytorch_cuda(sec: dict) -> list[str]:
    if not sec.get("batches"):
        return []
    L = [f"{sec['what']}; {sec['provider']}.", "", "| batch | max \\|Δp\\| vs ORT CPU |", "|---|---|"]
    L += [f"| {b['batch']} | {b['max_abs_dp']:.2e} |" for b in sec["batches"]]
    return L + ["", f"Tolerance {sec['tolerance']:g}.", ""]


def _tensorrt_round_trip(sec: dict) -> list[str]:
    if not sec.get("precisions"):
        return []
    L = [f"TensorRT {sec['tensorrt']} on {sec['gpu'].get('gpu_name')} (sm {sec['gpu'].get('compute_capability')}).",
         "", "| precision | build s | batch | max \\|Δp\\| vs ORT CPU fp32 | ok |", "|---|---|---|---|---|"]
    for p, rec in sec["precisions"].items():
        for b in rec["batches"]:
            L.append(f"| {p} | {rec['build_s']} | {b['batch']} | {b['max_abs_dp']:.2e} | {'yes' if b['ok'] else 'NO'} |")
        L.append(f"| {p} | | all 37 (ami.runtime TrtPlanEngine) | "
                 f"{rec.get('runtime_engine_max_abs_dp', float('nan')):.2e} | {rec.get('runtime_engine')} |")
    tc = sec["timing_cache"]
    return L + ["", f"Timing cache: second build {tc['reuse']['state']} it ({tc['reuse']['build_s']} s vs "
                    f"{tc['reuse']['first_build_s']} s); corrupted cache: "
                    f"{json.dumps(tc.get('corrupt'), ensure_ascii=False)}", ""]


def _latency(sec: dict) -> list[str]:
    if not sec.get("markdown"):
        return []
    return [sec["markdown"].replace("\n## ", "\n### ").replace("## Model-only", "### Model-only", 1), ""]


def _end_to_end(sec: dict) -> list[str]:
    if not sec.get("rows"):
        return []
    L = [f"{sec['crops']} crops of {sec['source']}; ami-infer's pipeline (files -> probabilities), batch "
         f"{sec['batch']}, {sec['workers']} decode workers, median of {sec['rounds']} round(s) after a warm-up. "
         f"Decode bound: ami-infer's decode stage alone, {sec['decode_crops_per_s']:.0f} crops/s on this box's "
         f"{sec['cores']} cores; bound with the engine = 1 / (1/model-only + 1/decode-only).", "",
         "| engine | model (precision) | provider | crops/s | decode bound crops/s | model only crops/s "
         "| bound crops/s | % of bound | engine / waiting for decode |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sec["rows"]:
        split = (f"{100 * r['engine_fraction']:.0f}% / {100 * r['wait_fraction']:.0f}%"
                 if r.get("engine_fraction") is not None else "n/a")
        L.append(f"| {r['engine']} | {r['model']} ({r['precision']}) | {r['provider']} | {r['crops_per_s']:.0f} "
                 f"| {sec['decode_crops_per_s']:.0f} | {r['model_only_crops_per_s']:.0f} | {r['bound_crops_per_s']:.0f} "
                 f"| {100 * r['fraction_of_bound']:.0f}% | {split} |")
    return L + [""]


def _training_intro(sec: dict) -> str:
    return (f"{sec['steps']} timed steps at batch {sec['batch']} after {sec.get('warmup', WARMUP_STEPS)} warm-up steps, "
            f"--amp {sec['amp']}, random initialisation"
            + (" - TINY STAND-INS on the CPU: these numbers say nothing about a GPU" if sec.get("tiny_stand_ins") else "")
            + ". Loop: ami-train's step (full/LoRA: gather from crops in memory + augmentation (CPU) + copy + "
              "forward/backward + optimizer step; linear: one embedding batch of the frozen backbone); host: the "
              "gather, augmentation and copy alone; device = loop - host. Bare: the same timm network, inputs "
              "already on the device, no augmentation or loader, AdamW (LoRA: PEFT on qkv/proj/fc1/fc2); "
              "loop / bare = the loop's overhead. Projections use docs/reproduce.md's work per fold "
              f"({STEPS_PER_EPOCH} steps and {VAL_CROPS} validation crops per epoch, {EPOCHS} epochs at most, "
              f"{FINAL_EVAL_CROPS} crops of final evaluation; linear: all {ALL_CROPS} crops embedded once at batch "
              f"{TRAIN_BATCH}, an upper bound since ami-train embeds at batch 64).")


def _training_row(r: dict) -> str:
    label = f"{r.get('display', r['model'])} ({r['method']})"
    if r["status"] != "pass":
        return f"| {label} | {r['status']}: {r.get('reason') or r.get('error')} |" + " |" * 9
    mem = r.get("peak_memory_gib", "n/a")
    timing = (f"| {label} | {r['step_s_median']:.3f} ({r['step_s_p90']:.3f}) | {r['bare_step_s_median']:.3f} "
              f"| {r['loop_overhead']:.2f}x | {r['host_s_median']:.3f} | {r['device_s_median']:.3f} "
              f"| {r['eval_batch_s']:.3f} | {mem} ")
    if r["method"] == "linear":
        return timing + (f"| head: < 1 s (CPU) | embeddings once: {dur(r['embeddings_once_s'])}; head ≤ 15 s "
                         f"| {dur(r['five_folds_s'] + 5 * 15)} |")
    return timing + f"| {dur(r['epoch_s'])} | {dur(r['fold_100_epochs_s'])} | {dur(r['five_folds_s'])} |"


def _training(sec: dict) -> list[str]:
    if not sec.get("rows"):
        return []
    L = [_training_intro(sec), "",
         "| configuration | loop s / step (median, p90) | bare s / step | loop / bare | host s | device s "
         "| eval batch s | peak GiB | per epoch | one fold, 100 epochs (ceiling) | 5 folds, ceiling |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    L += [_training_row(r) for r in sec["rows"]]
    tot = sum(r.get("five_folds_s", 0) for r in sec["rows"] if r["status"] == "pass")
    return L + ["", f"Sum of the measured configurations, 5 folds at the 100-epoch ceiling: {dur(tot)} of GPU time "
                    "(early stopping ends most folds earlier).", ""]


RENDERERS = {"environment": _environment, "pytorch_cuda": _pytorch_cuda, "tensorrt_round_trip": _tensorrt_round_trip,
             "latency": _latency, "end_to_end": _end_to_end, "training_steps": _training}
