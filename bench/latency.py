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

:func:`run_latency` returns a :class:`~ami.bench.latency_report.LatencyReport` (JSON + Markdown).
The parts live by concept: :mod:`~ami.bench.timing` (statistics, timed calls, the rows to time),
:mod:`~ami.bench.flops`, :mod:`~ami.bench.peaks`, :mod:`~ami.bench.e2e`,
:mod:`~ami.bench.latency_report`; this module holds the options, the run that composes them and
the command.
"""


from __future__ import annotations

import copy
import functools
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import typer

from ami.runtime.artifact import ArtifactError
from ami.runtime.engines import ASSETS, EngineError, load_engine
from ami.runtime.engines.base import parse_batch_sizes
from ami.runtime.preprocess import Preprocess

from .common import (
    SHIPPED_ENGINES,
    SHIPPED_WEIGHTS,
    BenchError,
    build_run_models,
    build_single_model,
    decode_crops,
    engine_choices,
    is_base_engine,
    load_variants,
    log_to_stderr,
    machine_info,
)
from .e2e import e2e_crops, e2e_engines, end_to_end
from .flops import onnx_flops_per_crop
from .latency_report import LatencyReport, Row
from .peaks import measure_again, measure_cpu_peaks, measure_gpu_peaks, peak_key
from .timing import LatencyError, Runner, engine_runner, stats_from, time_fn, torch_runner

DEFAULT_BATCHES = (1, 8, 32, 64, 128)
RUNTIME_HELP = f"Only these engines of the registry ({engine_choices()}); repeat. Default: every installed one."


# -- the benchmark -------------------------------------------------------------------------------

def parse_batches(text: str | Sequence[int]) -> list[int]:
    try:
        return parse_batch_sizes(text)
    except ValueError as e:
        raise LatencyError(f"--batch-size {e}") from None


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
        report.end_to_end = end_to_end(crop_paths, crop_source, e2e_engines(engines), torch_models, pre,
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
    if run is not None:
        torch_models, cfg, _src = build_run_models(Path(run), list(first.folds), error=LatencyError)
        torch_name = f"{Path(run).name} folds {','.join(map(str, first.folds))}"
        torch_pre = cfg.preprocess
    elif weights is not None:
        model, cfg = build_single_model(Path(weights), first.model, first.method, error=LatencyError)
        torch_models, torch_name, torch_pre = [model], Path(weights).name, cfg.preprocess
    else:
        skipped.append({"engine": "PyTorch eager", "reason": "no PyTorch weights named (--run DIR or --weights FILE)"})
    if torch_models is not None and torch_pre != pre:
        raise LatencyError(f"the PyTorch model's preprocessing {torch_pre} differs from {engines[0].path.name}'s {pre}")
    return torch_models, torch_name


def _measure_peaks(report: LatencyReport, engines: list, opts: LatencyOptions, gpu_ok: bool) -> list[str]:
    """The matrix-product peak of each precision the CPU rows use (and CUDA float32/float16 on a
    GPU) into ``report.peaks``; a note when the machine is busy. Returns those CPU precisions."""
    machine, notes = report.machine, report.notes
    cpu_precisions = ["fp32"] + sorted({e.precision for e in engines if e.device == "cpu"} - {"fp32"})
    notes += measure_cpu_peaks(report.peaks, cpu_precisions, n=opts.peak_n, reps=opts.peak_reps,
                               threads=opts.threads, log=opts.log)
    if machine.get("load_average") and machine["load_average"][0] > 0.5 * (machine.get("cores") or 1):
        notes.append(f"the machine was busy when the run started (load average {machine['load_average'][0]:.2f} on "
                     f"{machine.get('cores')} cores): absolute times are unreliable, compare ratios within this run only")
    if gpu_ok:
        measure_gpu_peaks(report.peaks, n=opts.peak_n, reps=opts.peak_reps)
    return cpu_precisions


def _bench_pixels(report: LatencyReport, pre: Preprocess, opts: LatencyOptions) -> tuple[np.ndarray, list[str], str]:
    """(pixels of the largest batch, end-to-end crop paths, their source): real crops when there are
    any (the content does not change the work of a CNN/ViT), repeated to fill the batch; else
    random pixels, with a note."""
    big = max(opts.batches)
    settings = report.settings
    try:
        crop_paths, crop_source = e2e_crops(opts.data_root, Path(opts.folder) if opts.folder else None, opts.crops)
        pix = decode_crops(crop_paths[:big], pre, "decoding", opts.show_progress)  # BenchError: not caught below
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
            if is_base_engine(e):
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
    measure_again(report.peaks, cpu_precisions, n=opts.peak_n, reps=opts.peak_reps, threads=opts.threads, gpu=gpu_ok)
    for r in report.rows:
        peak = report.peaks.get(r.peak_ref)
        if r.achieved_gflops and peak:
            r.peak_fraction = r.achieved_gflops / peak["gflops"]


def _copy(m):
    return copy.deepcopy(m)



# -- command line --------------------------------------------------------------------------------

EPILOG = """Examples:

\b
  ami-bench latency --data-root D                 # shipped edge model, every engine, batch 1..128
  ami-bench latency --data-root D --json latency.json --md latency.md
  ami-bench latency -m edge.onnx -m edge-int8.onnx --weights edge.safetensors --batch-size 1,32
  ami-bench latency -m uni.onnx --run runs/uni-lora --folder my-crops/ --crops 256
  ami-bench latency --batch-size 1,8 --crops 64 --seconds 0.5    # a quick smoke run
  ami-bench latency --engine openvino --batch-size 64 --no-e2e   # one engine, every precision it offers

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
        batch: str = typer.Option(",".join(map(str, DEFAULT_BATCHES)), "--batch-size", "-b", help="Batch sizes, comma-separated."),
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
        runtime: list[str] | None = typer.Option(None, "--engine", help=RUNTIME_HELP),
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
        except BenchError as e:  # LatencyError, or a crop that cannot be decoded
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
