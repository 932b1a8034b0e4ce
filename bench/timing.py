"""Timing primitives of the bench: latency statistics of timed rounds, a timed-call loop, and the
engines to time as :class:`Runner` rows (PyTorch eager on CPU/CUDA, any loaded engine)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ami.runtime.preprocess import Preprocess

from .common import BenchError
from .flops import torch_flops_per_crop


class LatencyError(BenchError):
    """The benchmark cannot be set up (no model, unreadable files); the message says why."""


# -- statistics ----------------------------------------------------------------------------------

@dataclass
class Stats:
    rounds: int
    warmup: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    crops_per_s: float  # batch * rounds / total timed seconds


def stats_from(times_s: Sequence[float], batch: int, warmup: int = 0) -> Stats:
    """Latency percentiles (linear interpolation, numpy's default) and throughput of timed rounds."""
    t = np.asarray(times_s, np.float64)
    if t.size == 0:
        raise ValueError("no timed rounds")
    ms = t * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return Stats(rounds=int(t.size), warmup=int(warmup), p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99),
                 mean_ms=float(ms.mean()), min_ms=float(ms.min()), max_ms=float(ms.max()),
                 crops_per_s=float(batch * t.size / t.sum()) if t.sum() > 0 else math.inf)


def time_fn(fn: Callable[[], object], *, rounds: int = 0, warmup: int = 2, seconds: float = 1.5,
            min_rounds: int = 5, max_rounds: int = 1000) -> tuple[list[float], int]:
    """Call ``fn`` ``warmup`` times (untimed), then time each call. ``rounds`` > 0: exactly that
    many; else as many as fit in ``seconds`` (estimated from the warm-up), within min..max rounds."""
    t_warm = []
    for _ in range(max(0, warmup)):
        t0 = time.perf_counter()
        fn()
        t_warm.append(time.perf_counter() - t0)
    if rounds <= 0:
        est = min(t_warm) if t_warm else 0.0
        rounds = int(seconds / est) if est > 0 else min_rounds
        rounds = max(min_rounds, min(max_rounds, rounds))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, max(0, warmup)


# -- engines -------------------------------------------------------------------------------------

@dataclass
class Runner:
    """One engine to time: ``predict(uint8 NHWC) -> probabilities`` (finished when it returns)."""

    engine: str  # e.g. "PyTorch eager", "ONNX Runtime", "TensorRT"
    precision: str
    device: str  # cpu | cuda
    provider: str
    model: str  # file the weights/graph come from
    predict: Callable[[np.ndarray], np.ndarray]
    flops_per_crop: float | None = None
    flops_source: str = ""
    notes: str = ""

    @property
    def label(self) -> str:
        return f"{self.engine} {self.precision} ({self.device})"


def torch_runner(models: list, pre: Preprocess, device: str = "cpu", model_name: str = "") -> Runner:
    """PyTorch eager: uint8 batch -> (to device) -> eval_batch -> networks -> mean sigmoid; CUDA synchronised."""
    import torch

    from ami.export.ensemble import fold_mean_probs
    from ami.train.data import eval_batch

    dev = torch.device(device)
    fmt = torch.channels_last if dev.type == "cpu" else torch.contiguous_format
    nets = [m.float().eval().to(dev).to(memory_format=fmt) for m in models]
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True

    def predict(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(dev, non_blocking=False)
            x = eval_batch(x, pre).contiguous(memory_format=fmt)
            out = fold_mean_probs(nets, x).cpu().numpy()  # a device->host copy: synchronises CUDA
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out

    flops = torch_flops_per_crop(nets, pre, dev)
    return Runner("PyTorch eager", "fp32", dev.type, f"torch {torch.__version__}"
                  + (f", {torch.get_num_threads()} threads" if dev.type == "cpu" else f", {torch.cuda.get_device_name(dev)}"),
                  model_name, predict, flops, "FlopCounterMode (PyTorch model)",
                  notes=("channels_last" if dev.type == "cpu" else "float32, TF32 off, cudnn.benchmark")
                  + "; time includes the host->device copy of the uint8 batch" * (dev.type == "cuda"))


def engine_runner(eng, flops: float | None = None, flops_source: str = "") -> Runner:
    """A loaded engine (any plug-in) as a row of the table: its name, device and precision come from the engine."""
    device = eng.device
    note = "host uint8 in, host float32 out (copies included)" if device == "cuda" else ""
    if eng.precision != eng.meta.precision:
        note = "; ".join(x for x in (note, f"{eng.meta.precision} artefact run in {eng.precision}") if x)
    return Runner(eng.title or eng.engine, eng.precision, device, eng.provider, eng.path.name, eng.predict, flops,
                  flops_source, note)

