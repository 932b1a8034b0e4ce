"""ami-export: a trained run (or an ami ONNX file) -> a checked, self-describing engine."""

from __future__ import annotations

from pathlib import Path

import typer

from ami.runtime.cli import DATA_ROOT_HELP
from ami.runtime.cli.contract import AmiTyper, run
from ami.runtime.models import SHIPPED, resolve_model, shipped_model

from .errors import ExportError
from .options import CALIB_CROPS, CHECK_CROPS, MIN_OPSET, CheckOptions, ExportOptions, Int8Options, TrtOptions

_INT8 = Int8Options()

app = AmiTyper(prog="ami-export", rich_markup_mode=None)

EPILOG = """\b
Examples:
  ami-export runs/edge -o ami-edge.onnx                     # all finished folds as ONE graph (mean probability)
  ami-export runs/edge/fold0 -o edge-fold0.onnx             # a single fold
  ami-export runs/edge --folds 0,2 -o edge-f02.onnx         # some folds
  ami-export runs/edge --folds full -o edge-all.onnx        # the model trained on all training crops (RUN/all)
  ami-export ami-edge.onnx --engine onnx-int8 -o ami-edge-int8.onnx --measure-speed 64
  ami-export edge --engine onnx-int8 -o my-edge-int8.onnx  # the shipped edge model (by name) -> int8
  ami-export --best runs/ --method lora -o best-lora.onnx   # highest mean VALIDATION balanced accuracy
  ami-export runs/uni-lora --engine trt --batch-size 1,32,128 -o uni-lora.plan  # CUDA GPU + TensorRT 10/11

Every export is checked before it is written: ONNX checker, the artefact contract (uint8 NHWC
'pixels' in, float32 'prob_atypical' out, metadata), ONNX Runtime vs PyTorch on real AMi-Br
training crops (max |delta p| <= 1e-4, same labels) at batch 1 and N. int8 is accepted only if
balanced accuracy and AUROC stay within 0.01 / 0.005 of the float model on training crops held
apart from calibration. Files appear only when every check passed.

For ami-export, exit 1 means a check failed or int8 was refused (nothing written), 2 a bad source,
run directory or data root, 3 that TensorRT or a CUDA GPU is missing."""


def _threshold(text: str) -> float | None:
    if text in ("", "auto"):
        return None
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"--threshold takes 'auto' or a probability, got {text!r}") from None


@app.command(epilog=EPILOG)
def export(
    source: str | None = typer.Argument(None, help="Run directory, one fold directory of it (RUN/fold2, RUN/all), "
                                           "or an ami ONNX file (for --engine onnx-int8 / trt): a path, or a "
                                           f"shipped model by name ({', '.join(SHIPPED)})."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (.onnx, or .plan for --engine trt; the plan's "
                             "metadata goes to OUT.json)."),
    engine: str = typer.Option("onnx", help="onnx (float32), onnx-int8 (static QDQ for CPUs) or trt (TensorRT plan)."),
    folds: str = typer.Option("all", help="'all' = every finished fold as one ensemble graph, '0,2' = those folds, "
                              "'full' = RUN/all (trained on all training crops)."),
    best: Path | None = typer.Option(None, "--best", help="Instead of SOURCE: the run under this folder with the "
                                        "highest mean validation balanced accuracy over its folds."),
    method: str | None = typer.Option(None, help="With --best: only runs of this method (full, linear, lora)."),
    model: str | None = typer.Option(None, help="With --best: only runs of this registry model."),
    min_folds: int = typer.Option(5, help="With --best: runs with fewer finished folds are not eligible."),
    data_root: Path | None = typer.Option(None, "--data-root", help=DATA_ROOT_HELP),
    threshold: str = typer.Option("auto", help="Decision threshold to ship: 'auto' = 0.5 unless the run's validation "
                                  "predictions show a better one; or a number (recorded as user-specified)."),
    opset: int = typer.Option(MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET})."),
    check_crops: int = typer.Option(CHECK_CROPS, help="AMi-Br training crops for the self-checks."),
    calib_crops: int = typer.Option(CALIB_CROPS, help="int8: calibration crops (AMi-Br training crops)."),
    eval_crops: int = typer.Option(0, help="int8: cap on the held-apart evaluation crops (0 = all of them)."),
    per_channel: str = typer.Option("auto", help="int8: per-channel weight scales: auto (keep whichever is closer to "
                                    "float on the calibration crops), on, off."),
    calibration: str = typer.Option("minmax", help="int8: calibration method: minmax, entropy, percentile."),
    activations: str = typer.Option("s8", help="int8: activation type: s8 (int8, portable default) or u8 (uint8: "
                                    "faster on x86-64 CPUs with VNNI; may saturate on AVX2-only CPUs)."),
    reduce_range: bool = typer.Option(False, "--reduce-range/--full-range", help="int8: quantise weights to 7 bits, "
                                      "so that x86 CPUs without VNNI (AVX2 only) do not saturate."),
    ba_tol: float = typer.Option(_INT8.ba_tol, help="int8: largest accepted |delta balanced accuracy| vs float."),
    auroc_tol: float = typer.Option(_INT8.auroc_tol, help="int8: largest accepted |delta AUROC| vs float."),
    measure_speed: int = typer.Option(0, "--measure-speed", help="int8: also time fp32 vs int8 on this CPU at this "
                                      "batch size (e.g. 64)."),
    batch: str = typer.Option("1,32,128", "--batch-size", help="trt: batch sizes of the optimisation profile "
                              "(min,opt,max)."),
    precision: str = typer.Option("fp16", help="trt: fp16 (a float16 network graph) or fp32."),
    timing_cache: Path | None = typer.Option(None, help="trt: timing cache file (default ~/.cache/ami/tensorrt-timing-VERSION-smXY.cache)."),
    workspace_gb: float = typer.Option(0.0, help="trt: builder workspace limit in GiB (0 = TensorRT's default)."),
    weights: str | None = typer.Option(None, help="Backbone weights (local file or hf-hub:ID) for linear/LoRA runs "
                                          "whose checkpoints hold only the trained tensors. Default: the run's source."),
    threads: int = typer.Option(0, help="CPU threads for ONNX Runtime (0 = its default)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists (only after every check "
                                   "passed)."),
):
    """Export a trained run to a self-describing ONNX model, an int8 ONNX model or a TensorRT plan."""
    if (source is None) == (best is None):
        raise ExportError("give either SOURCE or --best RUNS_ROOT (see --help)")
    thr = _threshold(threshold)
    if best is not None:
        from .source import pick_best

        chosen, scores = pick_best(best, method=method, model=model, min_folds=min_folds)
        typer.echo("runs by mean validation balanced accuracy (test metrics are never read):")
        for s in scores:
            val = f"{s.mean_ba:.4f}" if s.mean_ba is not None else "   -  "
            typer.echo(f"  {'*' if s.run_dir == chosen else ' '} {val}  {s.run_dir}  ({s.model}/{s.method}, "
                       f"{len(s.folds)} folds){'  - ' + s.reason if s.reason else ''}")
        source = str(chosen)
    source = _source_path(source)
    from .onnx_export import export_onnx

    options = ExportOptions(
        folds=folds, data_root=data_root, engine=engine, threshold=thr, force=overwrite, threads=threads, weights=weights,
        check=CheckOptions(opset=opset, check_crops=check_crops),
        int8=Int8Options(calib_crops=calib_crops, eval_crops=eval_crops, per_channel=per_channel,
                         calibration=calibration, activations=activations, reduce_range=reduce_range, ba_tol=ba_tol, auroc_tol=auroc_tol,
                         speed_batch=measure_speed),
        trt=TrtOptions(batch=batch, precision=precision, timing_cache=timing_cache, workspace_gb=workspace_gb),
        log=typer.echo)
    export_onnx(source, out, options)  # ExportError and its kinds end the command (exit 1, 2 or 3)


def _source_path(source: str) -> str:
    """SOURCE as a path: an existing file or folder as is, else a shipped model by name (``edge``)."""
    if Path(source).exists() or shipped_model(source) is None:
        if not Path(source).exists():
            raise ExportError(f"{source} does not exist (give a run directory, a fold directory of one, an ami "
                              f"ONNX file or a shipped model: {', '.join(SHIPPED)})")
        return source
    return str(resolve_model(source))


def main() -> None:
    run(app, "ami-export")
