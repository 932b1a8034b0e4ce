"""ami-bench latency: model-only latency/throughput per engine and batch size, and end-to-end speed.

Everything is measured in ONE run on one machine, so the ratios between rows mean something even
on a shared machine where absolute times drift:

* **Model-only** (uint8 NHWC pixels in memory -> probabilities): every engine side by side -
  PyTorch eager (CPU; CUDA too when a GPU is present, synchronised inside the timed call), and
  each artefact on every installed engine of the plug-in registry (:mod:`ami.runtime.engines`:
  ONNX Runtime's CPU provider, OpenVINO at every precision it offers here - fp32, bf16 where the
  CPU has it, int8 - and ONNX Runtime's CUDA provider when onnxruntime-gpu has it), TensorRT
  fp16/fp32 plans when a GPU and TensorRT are present (otherwise listed as skipped, with the
  reason). Warm-up rounds are excluded; each (engine, batch) reports p50/p95/p99 latency and
  crops/s. PyTorch gets the same uint8 batch and does the same work as the exported graph (cast,
  normalise, network, sigmoid).
* **FLOPs and hardware fraction**: FLOPs per crop (multiply-adds x 2 of the convolutions and
  matrix products) from ``torch.utils.flop_counter.FlopCounterMode`` on the PyTorch model, or
  from the ONNX graph. Each row's "% of peak" is against the matrix-product peak of its *own*
  precision (:mod:`ami.bench.peaks`: float32, bf16 where supported, u8*s8 int8 GEMM; CUDA
  float32/float16), timed in the same run before and after the engines (best of both).
* **End-to-end** (decode + preprocess + infer) on real crops: the ``ami-infer`` pipeline
  (:func:`ami.runtime.infer.run_inference`) vs the plain reference loop of
  :mod:`ami.bench.reference` (PIL + torchvision + PyTorch + DataLoader) on the same model and the
  same crops, as a ratio, with a check that both give the same labels and close probabilities.

:func:`run_latency` returns a :class:`LatencyReport` (JSON + Markdown).
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import typer

from ami.runtime.artifact import ArtifactError
from ami.runtime.datasets import available_eval_sets, resolve_data_root
from ami.runtime.engines import ASSETS, EngineError, load_engine
from ami.runtime.engines.base import parse_batch_sizes
from ami.runtime.preprocess import Preprocess
from ami.runtime.sampling import stratified_subset
from ami.runtime.tolerances import FP32_PROB_TOL

from .parity import (
    SHIPPED_ENGINES,
    SHIPPED_WEIGHTS,
    ParityError,
    build_run_models,
    build_single_model,
    decode_crops,
    load_variants,
    log_to_stderr,
    machine_info,
)
from .peaks import cpu_peak, peak_key

SCHEMA = "ami-bench-latency/1"
DEFAULT_BATCHES = (1, 8, 32, 64, 128)
E2E_SETS = ("AtNorM-MD", "AMi-Br-test", "AtNorM-Br")  # the first present one gives the end-to-end crops
FP32_E2E_TOL = FP32_PROB_TOL  # ami-infer (fp32 ONNX) vs the reference loop: max |delta p|


class LatencyError(RuntimeError):
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


# -- FLOPs ---------------------------------------------------------------------------------------

def torch_flops_per_crop(models: list, pre: Preprocess, device=None) -> float | None:
    """FLOPs of one crop through the networks (FlopCounterMode: 2 x multiply-adds of conv/matmul)."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    s = pre.input_size
    dev = device or next(models[0].parameters()).device
    x = torch.zeros(1, 3, s, s, device=dev)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        for m in models:
            m(x)
    return float(fc.get_total_flops())


def _conv_flops(out_shape, w_shape) -> float | None:
    if out_shape is None or w_shape is None or len(out_shape) < 3:
        return None
    return 2.0 * float(np.prod(out_shape[1:])) * float(np.prod(w_shape[1:]))


def onnx_flops_per_crop(path: str | Path) -> float | None:
    """FLOPs of one crop counted from an ONNX graph (Conv/Gemm/MatMul and their quantised forms,
    2 x multiply-adds, batch fixed to 1); None when onnx is missing or shapes cannot be inferred."""
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        return None
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # BLE001
        return None
    g = m.graph
    inits = {i.name for i in g.initializer}
    for inp in g.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    del g.value_info[:]
    for o in g.output:
        d = o.type.tensor_type.shape.dim
        if d:
            d[0].ClearField("dim_param")
            d[0].dim_value = 1
    try:
        m = shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # BLE001
        return None
    shapes: dict[str, list | None] = {}

    def add(vi):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims] if dims else None

    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        add(vi)
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)

    def shape(name):
        s = shapes.get(name)
        return None if s is None or any(d is None for d in s) else s

    total, unknown = 0.0, 0
    # operand positions: (activation/output, weight) inputs
    conv_w = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
    mm_ab = {"MatMul": (0, 1), "Gemm": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}
    for node in m.graph.node:
        if node.op_type in conv_w:
            f = _conv_flops(shape(node.output[0]), shape(node.input[conv_w[node.op_type]]))
        elif node.op_type in mm_ab:
            ia, _ = mm_ab[node.op_type]
            a, y = shape(node.input[ia]), shape(node.output[0])
            if a is None or y is None:
                f = None
            else:
                k = a[-1]
                if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
                    k = a[0]
                f = 2.0 * float(np.prod(y)) * float(k)
        else:
            continue
        if f is None:
            unknown += 1
        else:
            total += f
    if unknown:
        return None
    return total


# -- hardware peak -------------------------------------------------------------------------------

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


# -- report --------------------------------------------------------------------------------------

@dataclass
class Row:
    engine: str
    precision: str
    device: str
    provider: str
    model: str
    batch: int
    stats: dict
    flops_per_crop: float | None
    flops_source: str
    achieved_gflops: float | None
    peak_fraction: float | None
    peak_ref: str
    notes: str = ""


@dataclass
class LatencyReport:
    machine: dict
    settings: dict
    peaks: dict = field(default_factory=dict)  # "cpu_float32" / "cuda_float32" / "cuda_float16" -> peak_gflops()
    rows: list[Row] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"engine", "reason"}
    end_to_end: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": self.machine,
                "settings": self.settings, "peaks": self.peaks, "rows": [asdict(r) for r in self.rows],
                "skipped": self.skipped, "end_to_end": self.end_to_end, "notes": self.notes,
                "seconds": round(self.seconds, 1)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        """The model-only table, the end-to-end table, the notes and the versions."""
        m = self.machine
        lines = self._markdown_model_only() + self._markdown_end_to_end()
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        lines += ["", "Versions: " + ", ".join(f"{k} {m[k]}" for k in ("python", "numpy", "torch", "onnxruntime",
                                                                       "openvino", "tensorrt") if m.get(k))
                  + f". Load average at start: {m.get('load_average', '?')}. Total {self.seconds:.0f} s."]
        return "\n".join(lines) + "\n"

    def _markdown_model_only(self) -> list[str]:
        """The measured peaks, the settings, one table row per (engine, batch) and per skipped
        engine, and how FLOPs and % of peak are counted."""
        m = self.machine
        gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
        lines = [f"## Model-only latency and throughput - {m.get('cpu', '?')} ({m.get('cores', '?')} cores{gpu})", ""]
        for k, p in self.peaks.items():
            unit = "GOP/s" if p.get("dtype") == "int8" else "GFLOP/s"
            lines.append(f"Measured peak ({k.replace('_', ' ')}): **{p['gflops']:.1f} {unit}** ({p['what']}"
                         + (f", threads {p['threads']}" if p.get("threads") else "") + ").")
        s = self.settings
        lines += ["", f"Threads: {s.get('threads')}; warm-up rounds excluded; timed rounds per cell: "
                      f"{'exactly ' + str(s['rounds']) if s.get('rounds') else 'about ' + str(s.get('seconds')) + ' s worth (at least ' + str(s.get('min_rounds')) + ')'}; "
                      "pixels are uint8 crops already in memory.", ""]
        head = ["engine", "precision", "device", "model", "batch", "p50 ms", "p95 ms", "p99 ms", "crops/s",
                "MFLOP/crop", "GFLOP/s", "% of peak", "rounds"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += [_model_only_md_row(r) for r in self.rows]
        for sk in self.skipped:
            lines.append("| " + " | ".join([sk["engine"], "-", "-", f"skipped: {sk['reason']}"] + ["-"] * (len(head) - 4))
                         + " |")
        srcs = sorted({r.flops_source for r in self.rows if r.flops_source})
        if srcs:
            lines += ["", f"FLOPs per crop: {'; '.join(srcs)} (2 x multiply-adds of convolutions and matrix products). "
                          "% of peak = achieved GFLOP/s / the measured matrix-product peak of the row's own precision on "
                          "the same device (fp32 rows: float32 GEMM; bf16 rows: bf16 GEMM; int8 rows: u8*s8 GEMM, "
                          "integer ops counted like FLOPs; layers an int8 artefact keeps in float are counted in too)."]
            over = [r for r in self.rows if r.peak_fraction and r.peak_fraction > 1.0]
            if over:
                lines += ["", f"WARNING: {len(over)} row(s) exceed 100% of their own-precision peak: the peak "
                              "measurement under-read (a busy machine during the GEMM timings); the rows' crops/s "
                              "stand, their % of peak does not."]
        return lines

    def _markdown_end_to_end(self) -> list[str]:
        """The end-to-end table (ami-infer per engine, then the reference loop) and the stages alone."""
        e = self.end_to_end
        if not e:
            return []
        rr = e.get("rounds", 1)
        lines = ["", f"## End-to-end (decode + preprocess + infer) - {e.get('crops', '?')} crops of {e.get('source', '?')}",
                 "", "Wall time of the whole loop (files -> probabilities), after one untimed warm-up batch; "
                 + (f"median of {rr} interleaved rounds." if rr > 1 else "one timed round."), ""]
        if e.get("skipped"):
            return lines + [f"skipped: {e['skipped']}"]
        h = ["pipeline", "engine", "model", "crops", "seconds", "crops/s", "vs reference", "labels identical",
             "max \\|Δp\\|", "engine / waiting for decode", "% of bound"]
        lines += ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        lines += [_e2e_md_row(run) for run in e.get("ami_infer", [])]
        ref = e.get("reference")
        if ref:
            lines.append("| " + " | ".join([
                f"reference loop (PIL + torchvision + DataLoader, {ref['workers']} workers, batch {ref['batch']})",
                "PyTorch eager", f"{ref['model']} (fp32)", str(ref["crops"]), f"{ref['seconds']:.2f}",
                f"{ref['crops_per_s']:.0f}", "1.00x", "-", "-", "-", "-"]) + " |")
        elif e.get("reference_skipped"):
            lines.append(f"| reference loop | skipped: {e['reference_skipped']} |" + " |" * (len(h) - 2))
        dec = e.get("decode_only")
        if dec:
            lines += ["", f"Stages alone, same rounds: decoding {dec['crops_per_s']:.0f} crops/s ({dec['what']}); "
                      + "; ".join(f"{r.get('engine', '?')} {r['model']} ({r['precision']}) "
                                  f"{r['model_only_crops_per_s']:.0f} crops/s" for r in e.get("ami_infer", [])
                                  if r.get("model_only_crops_per_s"))
                      + ". Bound = 1 / (1/model-only + 1/decode-only): both stages share the same cores. "
                      "\"engine / waiting for decode\": the share of ami-infer's wall time spent inside the "
                      "engine, and waiting for decoded batches (decoding is then the bottleneck)."]
        return lines


def _model_only_md_row(r: Row) -> str:
    """One (engine, batch) row of the model-only table."""
    st = r.stats
    return "| " + " | ".join([
        r.engine, r.precision, r.device, r.model, str(r.batch), f"{st['p50_ms']:.2f}", f"{st['p95_ms']:.2f}",
        f"{st['p99_ms']:.2f}", f"{st['crops_per_s']:.0f}",
        "n/a" if r.flops_per_crop is None else f"{r.flops_per_crop / 1e6:.1f}",
        "n/a" if r.achieved_gflops is None else f"{r.achieved_gflops:.1f}",
        "n/a" if r.peak_fraction is None else f"{100 * r.peak_fraction:.1f}%", str(st["rounds"])]) + " |"


def _e2e_md_row(run: dict) -> str:
    """One ami-infer row of the end-to-end table."""
    split = (f"{100 * run['engine_fraction']:.0f}% / {100 * run['wait_fraction']:.0f}%"
             if run.get("engine_fraction") is not None else "n/a")
    bound = (f"{100 * run['fraction_of_bound']:.0f}% of {run['bound_crops_per_s']:.0f}"
             if run.get("bound_crops_per_s") else "n/a")
    labels = ({True: "yes", False: "NO"}.get(run.get("labels_identical"), "n/a") if run["precision"] == "fp32"
              else f"{100 * run['label_agreement']:.1f}% agree (not checked)" if "label_agreement" in run
              else "n/a")
    return "| " + " | ".join([
        f"ami-infer ({run['workers']} {run['pool']} workers, batch {run['batch']})",
        run.get("engine", "ONNX Runtime"),
        f"{run['model']} ({run['precision']})", str(run["crops"]), f"{run['seconds']:.2f}",
        f"{run['crops_per_s']:.0f}", f"{run['ratio_vs_reference']:.2f}x" if run.get("ratio_vs_reference") else "n/a",
        labels, f"{run['max_abs_dp']:.2e}" if run.get("max_abs_dp") is not None else "n/a", split, bound]) + " |"


# -- end to end ----------------------------------------------------------------------------------

def e2e_crops(data_root: Path | None, folder: Path | None, n: int) -> tuple[list[str], str]:
    """(crop paths, description): a folder's crops, or a class-stratified sample of the first present test set."""
    if folder is not None:
        from ami.runtime.infer import iter_inputs

        paths = list(iter_inputs([folder]))
        if not paths:
            raise LatencyError(f"no crops found under {folder}")
        if n > 0:
            paths = paths[:n]
        return paths, str(folder)
    root = resolve_data_root(data_root)
    sets = available_eval_sets(root)
    for name in E2E_SETS:
        found = sets.get(name)
        if isinstance(found, list) and found:
            picked = stratified_subset(found, n)
            return [str(s.path) for s in picked], f"{name} (class-stratified sample, seed 0)" if 0 < n < len(found) else name
    raise LatencyError(f"no test set found under data root {root} for the end-to-end run; pass --data-root D or "
                       "--folder DIR (or --no-e2e)")


def run_ami_infer(paths: list[str], eng, *, batch: int, workers: int, pool: str = "thread") -> tuple[np.ndarray, float, dict]:
    """The ami-infer pipeline on ``paths``: (probabilities in input order, seconds, summary)."""
    from ami.runtime.infer import run_inference

    with tempfile.TemporaryDirectory(prefix="ami-bench-") as d:
        out = Path(d) / "pred.csv"
        summ = run_inference(paths, eng, out, fmt="csv", batch_size=batch, workers=workers, progress=False, pool=pool)
        import csv

        probs = {}
        with open(out, newline="") as f:
            for row in csv.DictReader(f):
                probs[row["path"]] = float(row["prob_atypical"]) if row["status"] == "ok" else math.nan
    if summ.failed:
        raise LatencyError(f"ami-infer could not read {summ.failed} of the crops: {summ.first_errors[:3]}")
    return np.array([probs[p] for p in paths], np.float64), summ.elapsed_s, summ.to_dict()


# -- the benchmark -------------------------------------------------------------------------------

def parse_batches(text: str | Sequence[int]) -> list[int]:
    try:
        return parse_batch_sizes(text)
    except ValueError as e:
        raise LatencyError(f"--batch {e}") from None


def _gpu_state() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU (torch.cuda.is_available() is False)"
    return True, torch.cuda.get_device_name(0)


def _trt_state() -> tuple[bool, str]:
    try:
        from ami.export.tensorrt import require_tensorrt

        require_tensorrt()
        return True, ""
    except ImportError as e:
        return False, f"ami.export.tensorrt is not importable ({e})"
    except Exception as e:  # TensorRTUnavailable and friends carry the reason
        return False, str(e).split("\n")[0]


def _shown(path) -> str:
    """A model path as reports print it: relative to the working folder when inside it (no machine paths)."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.name if p.is_absolute() else p.as_posix()


@dataclass(frozen=True)
class LatencyOptions:
    """What :func:`run_latency` measures and how; each field is one of its keyword arguments.

    ``run`` / ``weights``: where the PyTorch rows' weights come from (the run the first model was
    exported from, or a full state dict). ``threads``: CPU threads of every engine (0 = all cores).
    ``rounds`` > 0: exactly that many timed rounds per cell, else ``seconds`` worth (at least
    ``min_rounds``), after ``warmup`` untimed ones. ``trt``: auto | off. ``runtimes`` /
    ``precisions``: only these engines / precisions (None: every one installed / offered)."""

    run: str | Path | None = None
    weights: str | Path | None = None
    batches: Sequence[int] | str = DEFAULT_BATCHES
    data_root: str | Path | None = None
    folder: str | Path | None = None
    crops: int = 512
    threads: int = 0
    rounds: int = 0
    warmup: int = 2
    seconds: float = 1.5
    min_rounds: int = 5
    e2e: bool = True
    e2e_batch: int = 64
    e2e_rounds: int = 3
    workers: int = 0
    peak_n: int = 2048
    peak_reps: int = 5
    trt: str = "auto"
    torch_cpu: bool = True
    show_progress: bool = True
    runtimes: Sequence[str] | None = None
    precisions: Sequence[str] | None = None
    log: Callable[[str], None] = log_to_stderr


def run_latency(models: Sequence[str | Path] | None = None, options: LatencyOptions | None = None,
                **settings) -> LatencyReport:
    """Measure every engine side by side; see the module docstring.

    ``models``: ONNX files / TensorRT plans (None: the shipped edge.onnx and edge-int8.onnx).
    PyTorch weights: ``run`` (the run the first model was exported from), ``weights`` (a full
    state dict), or by default the shipped ``edge.safetensors`` when the shipped models are used.
    ``options``: a :class:`LatencyOptions`; keyword ``settings`` (its field names, e.g.
    ``batches=[1, 8]``, ``trt="off"``) override its fields.

    The steps: the models and weights (:func:`_models_to_time`), the engines and the PyTorch model
    (:func:`_torch_side`), the matrix-product peaks (:func:`_measure_peaks`), the pixels
    (:func:`_bench_pixels`), the runners (:func:`_runners`) and their timings
    (:func:`_time_runners`), the peaks again (:func:`_measure_peaks_again`), then end to end.
    """
    t_start = time.perf_counter()
    opts = replace(options or LatencyOptions(), **settings)
    threads = int(opts.threads) if opts.threads and opts.threads > 0 else (os.cpu_count() or 1)
    opts = replace(opts, batches=parse_batches(opts.batches), threads=threads)
    paths, weights, notes = _models_to_time(models, opts.run, opts.weights)
    opts = replace(opts, weights=weights)
    has_torch = _torch_threads(opts.threads)

    # engines: each file on every installed engine of the registry, at every precision it offers here
    engines, more = load_variants(paths, runtimes=opts.runtimes, precisions=opts.precisions, provider="cpu",
                                  threads=opts.threads, error=LatencyError)
    notes += more
    pre = _common_preprocess(engines)
    machine = machine_info()
    gpu_ok, gpu_text = _gpu_state()
    machine["gpu"] = gpu_text if gpu_ok else None
    skipped: list[dict] = []
    torch_models, torch_name = _torch_side(has_torch, engines, pre, opts, skipped)
    settings = {"batches": opts.batches, "threads": opts.threads, "rounds": opts.rounds or None,
                "warmup": opts.warmup, "seconds": opts.seconds, "min_rounds": opts.min_rounds, "crops": opts.crops,
                "e2e_batch": opts.e2e_batch, "e2e_rounds": opts.e2e_rounds, "models": [_shown(p) for p in paths],
                "torch_model": torch_name or None, "ort_spinning": False}
    report = LatencyReport(machine=machine, settings=settings, skipped=skipped, notes=notes)
    cpu_precisions = _measure_peaks(report, engines, opts, gpu_ok)
    pix, crop_paths, crop_source = _bench_pixels(report, pre, opts)
    runners = _runners(report, engines, torch_models, torch_name, pre, opts, (gpu_ok, gpu_text))
    _time_runners(report, runners, pix, opts)
    _measure_peaks_again(report, cpu_precisions, opts, gpu_ok)
    if opts.e2e:
        report.end_to_end = _end_to_end(crop_paths, crop_source, e2e_engines(engines), torch_models, pre,
                                        torch_name, batch=opts.e2e_batch, workers=opts.workers,
                                        threads=opts.threads, rounds=opts.e2e_rounds, log=opts.log)
    report.seconds = time.perf_counter() - t_start
    return report


def _models_to_time(models: Sequence[str | Path] | None, run, weights) -> tuple[list[Path], object, list[str]]:
    """(model files, PyTorch weights, notes): the named models, or the shipped ones present (their
    weights, edge.safetensors, by default); notes say which shipped files are missing."""
    if models:
        return [Path(p) for p in models], weights, []
    paths = [p for p in SHIPPED_ENGINES if p.is_file()]
    if not paths:
        raise LatencyError(f"no shipped model found: {', '.join(p.name for p in SHIPPED_ENGINES)} are missing from "
                           f"{ASSETS}; pass --model FILE")
    notes = [f"shipped engine {p.name} is missing from the package: not measured" for p in SHIPPED_ENGINES
             if not p.is_file()]
    if run is None and weights is None:
        if SHIPPED_WEIGHTS.is_file():
            weights = SHIPPED_WEIGHTS
        else:
            notes.append(f"{SHIPPED_WEIGHTS.name} (the shipped model's PyTorch weights) is missing: no PyTorch row, "
                         "no reference loop")
    return paths, weights, notes


def _torch_threads(threads: int) -> bool:
    """Give PyTorch ``threads`` CPU threads; False when torch is not installed."""
    try:
        import torch
    except ImportError:
        return False
    torch.set_num_threads(threads)
    return True


def _common_preprocess(engines: list) -> Preprocess:
    """The preprocessing of the first engine; every engine must take crops of its input size."""
    pre = engines[0].meta.preprocess
    for e in engines[1:]:
        if e.meta.preprocess.input_size != pre.input_size:
            raise LatencyError(f"{e.path.name} takes {e.meta.preprocess.input_size} px crops, {engines[0].path.name} "
                               f"takes {pre.input_size} px: benchmark models of one input size per run")
    return pre


def _torch_side(has_torch: bool, engines: list, pre: Preprocess, opts: LatencyOptions,
                skipped: list[dict]) -> tuple[list | None, str]:
    """(PyTorch networks, their name) of the first engine's model, from ``opts.run`` or
    ``opts.weights``; (None, "") with a skip row when there is no torch or no weights."""
    if not has_torch:
        skipped.append({"engine": "PyTorch eager", "reason": "torch is not installed"})
        return None, ""
    run, weights = opts.run, opts.weights
    torch_models, torch_name, torch_pre = None, "", pre
    first = engines[0].meta
    try:
        if run is not None:
            torch_models, cfg, _src = build_run_models(Path(run), list(first.folds))
            torch_name = f"{Path(run).name} folds {','.join(map(str, first.folds))}"
            torch_pre = cfg.preprocess
        elif weights is not None:
            model, cfg = build_single_model(Path(weights), first.model, first.method)
            torch_models, torch_name, torch_pre = [model], Path(weights).name, cfg.preprocess
        else:
            skipped.append({"engine": "PyTorch eager", "reason": "no PyTorch weights named (--run DIR or --weights FILE)"})
    except ParityError as e:
        raise LatencyError(str(e)) from None
    if torch_models is not None and torch_pre != pre:
        raise LatencyError(f"the PyTorch model's preprocessing {torch_pre} differs from {engines[0].path.name}'s {pre}")
    return torch_models, torch_name


def _measure_peaks(report: LatencyReport, engines: list, opts: LatencyOptions, gpu_ok: bool) -> list[str]:
    """The matrix-product peak of each precision the CPU rows use (and CUDA float32/float16 on a
    GPU) into ``report.peaks``; a note when the machine is busy. Returns those CPU precisions."""
    machine, notes = report.machine, report.notes
    cpu_precisions = ["fp32"] + sorted({e.precision for e in engines if e.device == "cpu"} - {"fp32"})
    for prec in cpu_precisions:
        opts.log(f"latency: timing the {prec} matrix-product peak")
        pk = cpu_peak(prec, opts.peak_n, opts.peak_reps, opts.threads)
        if pk is not None:
            report.peaks[peak_key("cpu", prec)] = pk
        else:
            notes.append(f"no {prec} matrix-product peak on this CPU (no hardware support or no library for it): "
                         f"{prec} rows show no % of peak")
    if machine.get("load_average") and machine["load_average"][0] > 0.5 * (machine.get("cores") or 1):
        notes.append(f"the machine was busy when the run started (load average {machine['load_average'][0]:.2f} on "
                     f"{machine.get('cores')} cores): absolute times are unreliable, compare ratios within this run only")
    if gpu_ok:
        report.peaks["cuda_float32"] = peak_gflops(max(opts.peak_n, 4096), opts.peak_reps, "cuda", "float32")
        report.peaks["cuda_float16"] = peak_gflops(max(opts.peak_n, 4096), opts.peak_reps, "cuda", "float16")
    return cpu_precisions


def _bench_pixels(report: LatencyReport, pre: Preprocess, opts: LatencyOptions) -> tuple[np.ndarray, list[str], str]:
    """(pixels of the largest batch, end-to-end crop paths, their source): real crops when there are
    any (the content does not change the work of a CNN/ViT), repeated to fill the batch; else
    random pixels, with a note."""
    big = max(opts.batches)
    settings = report.settings
    try:
        crop_paths, crop_source = e2e_crops(opts.data_root, Path(opts.folder) if opts.folder else None, opts.crops)
        pix = decode_crops(crop_paths[:big], pre, "decoding", opts.show_progress)
        if len(pix) < big:  # fewer crops than the largest batch: repeat them (the work does not depend on content)
            pix = np.concatenate([pix] * (big // len(pix) + 1))[:big]
        settings["pixels"] = f"{min(big, len(crop_paths))} real crops of {crop_source}" + \
            (f", repeated to fill batch {big}" if len(crop_paths) < big else "")
    except LatencyError as e:
        crop_paths, crop_source = [], ""
        pix = np.random.default_rng(0).integers(0, 256, (big, pre.input_size, pre.input_size, 3), dtype=np.uint8)
        settings["pixels"] = "random uint8 pixels (no crops found)"
        report.notes.append(f"model-only timings ran on random pixels: {e}")
    return pix, crop_paths, crop_source


def _runners(report: LatencyReport, engines: list, torch_models: list | None, torch_name: str, pre: Preprocess,
             opts: LatencyOptions, gpu: tuple[bool, str]) -> list[Runner]:
    """The rows to time, in table order: PyTorch eager (CPU, CUDA), every engine, ONNX Runtime's CUDA
    provider where onnxruntime-gpu has it, TensorRT plans; what cannot run becomes a skip row."""
    gpu_ok, gpu_text = gpu
    skipped = report.skipped
    onnx_flops = {e.path: onnx_flops_per_crop(e.path) for e in engines if e.path.suffix.lower() == ".onnx"}
    runners: list[Runner] = []
    torch_flops = None
    if torch_models is not None and opts.torch_cpu:
        r = torch_runner(torch_models, pre, "cpu", torch_name)
        torch_flops = r.flops_per_crop
        runners.append(r)
    if torch_models is not None and gpu_ok:
        runners.append(torch_runner([_copy(m) for m in torch_models], pre, "cuda", torch_name))
    elif torch_models is not None:
        skipped.append({"engine": "PyTorch eager (CUDA)", "reason": gpu_text})

    def flops_for(e):
        f = onnx_flops.get(e.path)
        if f:
            return f, "ONNX graph (Conv/Gemm/MatMul)"
        if torch_flops and e.meta.folds == engines[0].meta.folds:
            return torch_flops, "FlopCounterMode (PyTorch model)"
        return None, "not countable (no graph shapes, no PyTorch model)"

    for e in engines:
        runners.append(engine_runner(e, *flops_for(e)))
    if _ort_has_cuda():
        for e in engines:
            if e.engine == "onnxruntime":
                try:
                    g = load_engine(e.path, provider="cuda", threads=opts.threads)
                    runners.append(engine_runner(g, *flops_for(e)))
                except (ArtifactError, EngineError) as ex:
                    skipped.append({"engine": f"ONNX Runtime CUDA ({e.path.name})", "reason": str(ex)})
    runners += _tensorrt_runners(engines, opts, gpu, skipped, flops_for)
    return runners


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:  # pragma: no cover
        return False


def _tensorrt_runners(engines: list, opts: LatencyOptions, gpu: tuple[bool, str], skipped: list[dict],
                      flops_for: Callable) -> list[Runner]:
    """TensorRT fp16 and fp32 plans built from the first fp32 ONNX model (``trt`` auto, a GPU and
    TensorRT present, no plan among the models); each one that cannot be built is a skip row."""
    gpu_ok, gpu_text = gpu
    if opts.trt == "off":
        skipped.append({"engine": "TensorRT fp16/fp32", "reason": "--trt off"})
        return []
    if any(e.path.suffix.lower() != ".onnx" for e in engines):
        return []
    ok, why = _trt_state() if gpu_ok else (False, gpu_text)
    fp32 = next((e for e in engines if e.path.suffix.lower() == ".onnx" and e.precision == "fp32"), None)
    if not ok:
        skipped.append({"engine": "TensorRT fp16/fp32", "reason": why})
        return []
    if fp32 is None:
        skipped.append({"engine": "TensorRT fp16/fp32", "reason": "no fp32 ONNX model to build plans from"})
        return []
    big = max(opts.batches)
    runners = []
    plan_dir = Path(tempfile.mkdtemp(prefix="ami-bench-trt-"))
    for precision in ("fp16", "fp32"):
        try:
            from ami.export import export_onnx

            plan = export_onnx(fp32.path, plan_dir / f"{fp32.path.stem}-{precision}.plan", engine="trt",
                               precision=precision, data_root=opts.data_root, batch=(1, min(64, big), big),
                               log=lambda s: opts.log(f"latency: {s}"))
            pe = load_engine(plan)
            runners.append(engine_runner(pe, *flops_for(fp32)))
        except Exception as ex:  # a failed build is a reported skip, not a crash
            skipped.append({"engine": f"TensorRT {precision}", "reason": f"plan build failed: {ex}"})
    return runners


def _time_runners(report: LatencyReport, runners: list[Runner], pix: np.ndarray, opts: LatencyOptions) -> None:
    """One row per (runner, batch): warm-up excluded, latency percentiles, crops/s, GFLOP/s and the
    fraction of the peak of the runner's own precision."""
    for r in runners:
        pkey = peak_key(r.device, r.precision)
        peak = report.peaks.get(pkey)
        for b in opts.batches:
            x = np.ascontiguousarray(pix[:b])
            out = r.predict(x)
            if np.asarray(out).shape != (b,):
                raise LatencyError(f"{r.label} returned shape {np.asarray(out).shape} for a batch of {b}")
            opts.log(f"latency: {r.label} {r.model} batch {b}")
            times, w = time_fn(functools.partial(r.predict, x), rounds=opts.rounds, warmup=opts.warmup, seconds=opts.seconds,
                               min_rounds=opts.min_rounds)
            st = stats_from(times, b, w)
            ach = r.flops_per_crop * st.crops_per_s / 1e9 if r.flops_per_crop else None
            report.rows.append(Row(engine=r.engine, precision=r.precision, device=r.device, provider=r.provider,
                                   model=r.model, batch=b, stats=asdict(st), flops_per_crop=r.flops_per_crop,
                                   flops_source=r.flops_source, achieved_gflops=ach,
                                   peak_fraction=ach / peak["gflops"] if ach and peak else None,
                                   peak_ref=pkey if peak else "", notes=r.notes))


def _measure_peaks_again(report: LatencyReport, cpu_precisions: list[str], opts: LatencyOptions, gpu_ok: bool) -> None:
    """The peaks again after the timings: the best of both is the machine's peak (a shared machine
    drifts); every row's fraction of peak is recomputed against it."""
    for prec in cpu_precisions:
        key = peak_key("cpu", prec)
        if key in report.peaks:
            again = cpu_peak(prec, opts.peak_n, opts.peak_reps, opts.threads)
            first = report.peaks[key]
            best = again if again is not None and again["gflops"] > first["gflops"] else first
            report.peaks[key] = {**best, "what": best["what"] + "; best of a measurement before and one after the "
                                 "engine timings", "gflops_before_after": [first["gflops"],
                                                                           again["gflops"] if again else None]}
    if gpu_ok:
        _repeat_peak(report, "cuda_float32", max(opts.peak_n, 4096), opts.peak_reps, "cuda", "float32")
        _repeat_peak(report, "cuda_float16", max(opts.peak_n, 4096), opts.peak_reps, "cuda", "float16")
    for r in report.rows:
        peak = report.peaks.get(r.peak_ref)
        if r.achieved_gflops and peak:
            r.peak_fraction = r.achieved_gflops / peak["gflops"]


def _repeat_peak(report: LatencyReport, key: str, n: int, reps: int, device: str, dtype: str) -> None:
    first = report.peaks[key]
    again = peak_gflops(n, reps, device, dtype)
    best = again if again["gflops"] > first["gflops"] else first
    report.peaks[key] = {**best, "what": best["what"] + "; best of a measurement before and one after the engine timings",
                         "gflops_before_after": [first["gflops"], again["gflops"]]}


def _copy(m):
    import copy

    return copy.deepcopy(m)


def e2e_engines(engines: list) -> list:
    """The engines of the end-to-end table: per artefact, ONNX Runtime (the base install) and the
    engine ``--engine auto`` picks for it here (when another), each at the artefact's own precision."""
    from ami.runtime.engines import choose

    out = []
    for path in dict.fromkeys(e.path for e in engines):
        own = [e for e in engines if e.path == path and e.precision == e.meta.precision]
        try:
            auto = choose(path)[0].name
        except EngineError:
            auto = ""
        for e in [next((x for x in own if x.engine == "onnxruntime"), None), next((x for x in own if x.engine == auto), None)]:
            if e is not None and e not in out:
                out.append(e)
    return out or list(engines[:1])


def decode_only(paths: list[str], pre: Preprocess, *, batch: int, workers: int) -> tuple[np.ndarray, float]:
    """ami-infer's decode stage alone (the same prepare_batch, the same thread pool, no engine):
    (uint8 pixels in input order, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from ami.runtime.infer import prepare_batch

    chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="ami-decode") as ex:
        parts = [px for px, _ in ex.map(lambda c: prepare_batch(c, pre), chunks)]
    return np.concatenate(parts), time.perf_counter() - t0


def model_only(eng, pixels: np.ndarray, batch: int) -> float:
    """Seconds for the engine alone over ``pixels`` in batches of ``batch`` (one pass)."""
    t0 = time.perf_counter()
    for i in range(0, len(pixels), batch):
        eng.predict(pixels[i:i + batch])
    return time.perf_counter() - t0


@dataclass
class _E2ETimes:
    """What the timed end-to-end rounds measured, per pipeline (engines in order)."""

    ref: object = None  # the reference loop's last result (probabilities, workers, batch)
    ref_times: list[float] = field(default_factory=list)
    eng_times: list[list[float]] = field(default_factory=list)
    eng_probs: list = field(default_factory=list)
    eng_summ: list = field(default_factory=list)
    dec_times: list[float] = field(default_factory=list)
    mod_times: list[list[float]] = field(default_factory=list)


def _end_to_end(paths: list[str], source: str, engines, torch_models, pre: Preprocess, torch_name: str, *, batch: int,
                workers: int, threads: int, rounds: int = 1, log) -> dict:
    """The ami-infer pipeline (each engine) and the plain reference loop on the same crops.

    One untimed warm-up pass over the first batch each, then ``rounds`` timed passes, interleaved
    (reference, engine 1, engine 2, ... per round) so that drift of a shared machine hits all
    pipelines alike; the median time over rounds is reported."""
    from ami.runtime.infer import default_workers

    if not paths:
        return {"skipped": "no crops (pass --data-root D or --folder DIR)", "source": source, "crops": 0}
    workers = workers if workers > 0 else default_workers()
    rounds = max(1, int(rounds))
    out: dict = {"source": source, "crops": len(paths), "batch": batch, "workers": workers, "rounds": rounds,
                 "what": "wall time of the whole loop: reading files, decoding, preprocessing, batching, inference; "
                         "one untimed warm-up pass over the first batch for each pipeline, then the timed rounds "
                         "(interleaved), median reported",
                 "ami_infer": []}
    t = _e2e_rounds(paths, engines, torch_models, pre, batch=batch, workers=workers, rounds=rounds, log=log)
    dec_s = float(np.median(t.dec_times))
    out["decode_only"] = {"seconds": dec_s, "seconds_per_round": t.dec_times, "crops_per_s": len(paths) / dec_s,
                          "what": f"ami-infer's decode + geometry stage alone (prepare_batch, {workers} threads, "
                                  f"batch {batch}), no engine"}
    ref_s = float(np.median(t.ref_times)) if t.ref_times else None
    if t.ref is not None:
        out["reference"] = {"model": torch_name, "crops": len(paths), "seconds": ref_s,
                            "seconds_per_round": t.ref_times,
                            "crops_per_s": len(paths) / ref_s if ref_s else math.inf, "workers": t.ref.workers,
                            "batch": t.ref.batch_size,
                            "pipeline": "PIL Image.open().convert('RGB') + torchvision Resize/ToTensor/Normalize + "
                                        "torch DataLoader (worker processes) + PyTorch eager"}
    else:
        out["reference_skipped"] = "no PyTorch weights"
    for i, eng in enumerate(engines):
        out["ami_infer"].append(_e2e_record(eng, i, t, out, len(paths), threads))
    return out


def _e2e_rounds(paths: list[str], engines, torch_models, pre: Preprocess, *, batch: int, workers: int, rounds: int,
                log) -> _E2ETimes:
    """The warm-up pass of every pipeline, then the timed rounds: per round the reference loop,
    ami-infer with each engine, and the two stages alone (decoding; each engine on the decoded pixels)."""
    t = _E2ETimes(eng_times=[[] for _ in engines], eng_probs=[None] * len(engines), eng_summ=[None] * len(engines),
                  mod_times=[[] for _ in engines])
    warm = paths[:min(len(paths), batch)]
    if torch_models is not None:
        from .reference import reference_loop

        reference_loop(warm, torch_models, pre, batch_size=batch, workers=workers)
    for eng in engines:
        run_ami_infer(warm, eng, batch=batch, workers=workers)
    for k in range(rounds):
        of = f", round {k + 1}/{rounds}" if rounds > 1 else ""
        if torch_models is not None:
            log(f"latency: end-to-end reference loop (PIL + torchvision + DataLoader + PyTorch) on {len(paths)} crops"
                + of)
            t.ref = reference_loop(paths, torch_models, pre, batch_size=batch, workers=workers)
            t.ref_times.append(t.ref.elapsed_s)
        for i, eng in enumerate(engines):
            log(f"latency: end-to-end ami-infer with {eng.path.name} on {len(paths)} crops" + of)
            t.eng_probs[i], secs, t.eng_summ[i] = run_ami_infer(paths, eng, batch=batch, workers=workers)
            t.eng_times[i].append(secs)
        # the two stages alone, in the same round: what bounds the pipeline on these cores
        log(f"latency: decode stage alone on {len(paths)} crops, and each engine alone on the decoded pixels")
        pixels, dsec = decode_only(paths, pre, batch=batch, workers=workers)
        t.dec_times.append(dsec)
        for i, eng in enumerate(engines):
            eng.predict(pixels[:batch])
            t.mod_times[i].append(model_only(eng, pixels, batch))
    return t


def _e2e_record(eng, i: int, t: _E2ETimes, out: dict, n: int, threads: int) -> dict:
    """The end-to-end row of engine ``i``: its median speed, where its wall time went, the bound the
    two stages set, and (with a reference loop) its agreement with it; fp32 is checked."""
    batch, workers = out["batch"], out["workers"]
    secs = float(np.median(t.eng_times[i]))
    probs, summ = t.eng_probs[i], t.eng_summ[i]
    rec = {"model": eng.path.name, "engine": eng.title or eng.engine, "precision": eng.precision,
           "provider": eng.provider, "crops": n, "seconds": secs, "seconds_per_round": t.eng_times[i],
           "crops_per_s": n / secs if secs > 0 else math.inf, "batch": batch,
           "workers": workers, "pool": summ.get("pool", "thread"), "threads": threads}
    # where the wall time went (ami-infer's own clocks, the median round) and the bound the stages set
    rec["engine_fraction"] = summ.get("engine_s", 0.0) / summ["elapsed_s"] if summ.get("elapsed_s") else None
    rec["wait_fraction"] = summ.get("wait_s", 0.0) / summ["elapsed_s"] if summ.get("elapsed_s") else None
    m_rate = n / float(np.median(t.mod_times[i]))
    d_rate = out["decode_only"]["crops_per_s"]
    rec["model_only_crops_per_s"] = m_rate
    rec["bound_crops_per_s"] = 1.0 / (1.0 / m_rate + 1.0 / d_rate)
    rec["fraction_of_bound"] = rec["crops_per_s"] / rec["bound_crops_per_s"]
    ref = t.ref
    if ref is not None:
        thr = eng.threshold
        diff = np.abs(probs - ref.probs)
        rec["ratio_vs_reference"] = rec["crops_per_s"] / out["reference"]["crops_per_s"]
        rec["labels_identical"] = bool(np.all((probs >= thr) == (ref.probs >= thr)))
        rec["label_agreement"] = float(np.mean((probs >= thr) == (ref.probs >= thr)))
        rec["max_abs_dp"] = float(np.nanmax(diff))
        rec["mean_abs_dp"] = float(np.nanmean(diff))
        if eng.precision == "fp32":
            rec["check"] = ("pass" if rec["labels_identical"] and rec["max_abs_dp"] <= FP32_E2E_TOL else "FAIL") + \
                f" (fp32: labels identical and max |Δp| <= {FP32_E2E_TOL:g})"
        else:
            rec["check"] = f"not checked ({eng.precision}: reported only; see ami-bench parity)"
    return rec


# -- command line --------------------------------------------------------------------------------

EPILOG = """Examples:

\b
  ami-bench latency --data-root D                 # shipped edge model, every engine, batch 1..128
  ami-bench latency --data-root D --json latency.json --md latency.md
  ami-bench latency -m edge.onnx -m edge-int8.onnx --weights edge.safetensors --batch 1,32
  ami-bench latency -m uni.onnx --run runs/uni-lora --folder my-crops/ --crops 256
  ami-bench latency --batch 1,8 --crops 64 --seconds 0.5    # a quick smoke run
  ami-bench latency --runtime openvino --batch 64 --no-e2e   # one engine, every precision it offers

Model-only rows time uint8 batches already in memory (warm-up excluded); the end-to-end table
times the ami-infer pipeline and the plain PIL + torchvision + DataLoader loop on the same crops
and model, in the same run. Absolute numbers depend on the machine and its load; the ratios
measured in one run are the figures to compare."""


def register(app: typer.Typer) -> None:
    @app.command("latency", epilog=EPILOG)
    def latency_cmd(
        model: list[Path] | None = typer.Option(None, "--model", "-m", help="Engine file (ONNX or TensorRT plan); "
                                                   "repeat for several. Default: the shipped edge.onnx and edge-int8.onnx."),
        run: Path | None = typer.Option(None, "--run", help="Run the first model was exported from (PyTorch rows and "
                                           "the reference loop use its folds)."),
        weights: Path | None = typer.Option(None, "--weights", help="Instead of --run: a full PyTorch state dict of "
                                               "the network (default with the shipped models: edge.safetensors)."),
        batch: str = typer.Option(",".join(map(str, DEFAULT_BATCHES)), "--batch", "-b", help="Batch sizes, comma-separated."),
        data_root: Path | None = typer.Option(None, "--data-root", help="Folder holding the datasets (default: "
                                                 "$AMI_DATA_ROOT, else ~/.local/share/ami/ami-br-benchmark); the "
                                                 "end-to-end crops come from AtNorM-MD (else the AMi-Br test split)."),
        folder: Path | None = typer.Option(None, "--folder", help="Use the crops of this folder for the end-to-end run."),
        crops: int = typer.Option(512, "--crops", "-n", help="Crops in the end-to-end run (class-stratified sample)."),
        threads: int = typer.Option(0, "--threads", help="CPU threads of every engine (0 = all cores)."),
        seconds: float = typer.Option(1.5, "--seconds", help="Timed seconds per (engine, batch) cell."),
        rounds: int = typer.Option(0, "--rounds", help="Exactly this many timed rounds per cell (overrides --seconds)."),
        min_rounds: int = typer.Option(5, "--min-rounds", help="At least this many timed rounds per cell."),
        warmup: int = typer.Option(2, "--warmup", help="Untimed warm-up rounds per cell."),
        e2e: bool = typer.Option(True, "--e2e/--no-e2e", help="Run the end-to-end comparison."),
        e2e_batch: int = typer.Option(64, "--e2e-batch", help="Batch size of both end-to-end pipelines."),
        e2e_rounds: int = typer.Option(3, "--e2e-rounds", help="Timed end-to-end rounds (interleaved; median reported)."),
        workers: int = typer.Option(0, "--workers", help="Decode workers of both end-to-end pipelines (0 = one per core, "
                                    "at most 8)."),
        peak_n: int = typer.Option(2048, "--peak-n", help="Matrix size of the peak-FLOP/s measurement."),
        trt: str = typer.Option("auto", "--trt", help="auto (build fp16/fp32 plans when a GPU and TensorRT are present) "
                                "| off."),
        runtime: list[str] | None = typer.Option(None, "--runtime", help="Only these engines of the registry (onnxruntime "
                                                    "| openvino | tensorrt); repeat. Default: every installed one."),
        precision: list[str] | None = typer.Option(None, "--precision", help="Only these precisions (fp32 | bf16 | "
                                                      "int8); repeat. Default: every precision each engine offers here."),
        json_out: Path | None = typer.Option(None, "--json", help="Write the full results as JSON here."),
        md_out: Path | None = typer.Option(None, "--md", help="Write the Markdown tables here (also printed)."),
    ):
        """Model-only latency/throughput per engine and batch size, and end-to-end ami-infer vs a plain loop."""
        if trt not in ("auto", "off"):
            raise typer.BadParameter("--trt must be auto or off")
        if run is not None and weights is not None:
            raise typer.BadParameter("pass either --run or --weights, not both")
        try:
            opts = LatencyOptions(run=run, weights=weights, batches=batch, data_root=data_root, folder=folder,
                                  crops=crops, threads=threads, rounds=rounds, warmup=warmup, seconds=seconds,
                                  min_rounds=min_rounds, e2e=e2e, e2e_batch=e2e_batch, e2e_rounds=e2e_rounds,
                                  workers=workers, peak_n=peak_n, trt=trt, runtimes=runtime, precisions=precision,
                                  log=lambda s: typer.echo(s, err=True))
            rep = run_latency(model, opts)
        except (LatencyError, ParityError) as e:
            typer.echo(f"ami-bench latency: {e}", err=True)
            raise typer.Exit(2) from None
        md = rep.to_markdown()
        typer.echo(md, nl=False)
        for path, text in ((json_out, rep.to_json() if json_out else ""), (md_out, md)):
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                typer.echo(f"wrote {path}", err=True)
        bad = [r for r in rep.end_to_end.get("ami_infer", []) if str(r.get("check", "")).startswith("FAIL")]
        if bad:
            typer.echo("END-TO-END CHECK FAILED: ami-infer and the reference loop disagree ("
                       + "; ".join(f"{r['model']}: labels identical {r['labels_identical']}, max |Δp| "
                                   f"{r['max_abs_dp']:.2e}" for r in bad) + ")", err=True)
            raise typer.Exit(1)
