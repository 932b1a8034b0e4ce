"""ami-infer: classify crops as Atypical / Normal with an exported ami model, without torch."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..artifact import NO_DIGEST_WARNING, ArtifactError
from ..engine import ASSETS, EngineError, load_engine
from ..engines import ENGINE_CHOICES
from ..imageio import fast_decoder
from ..infer import IMAGE_SUFFIXES, InputError, format_for, is_stream, iter_inputs, run_inference

SAMPLES = ASSETS / "samples"
HELP = """Classify mitotic-figure crops as Atypical or Normal, fast, on CPU or GPU, with no PyTorch.

PATH can be a folder (searched recursively for .png .jpg .jpeg .tif .tiff), a single image, or a .txt / .csv
list of image paths (relative paths are relative to the list's folder). The same file given twice (two
spellings, a symlink) is classified once, under the first spelling. One row per input is written as soon
as its batch is done: path, prob_atypical, label, status (ok | error), error, note. Bad inputs (empty,
truncated, not an image, too large, unreadable) become error rows and never stop the run; a crop with
several frames, or a shape or size far from the model's crops, is classified with a note in its row.

\b
What you can rely on (details: README, "Running ami-infer"):
  one writer    a run locks its -o file; a second run on it (even --resume or --overwrite) is
                refused with the holder's pid. An input (crop or list file) is never the output.
  resume        FILE.ami.json records the model file's sha256 and the threshold; --resume refuses
                another model or threshold (--resume-any mixes them knowingly). A row cut by a
                crash is found by parsing the file (a quoted path may hold a newline) and removed.
  model checks  the weights digest in the model's metadata is recomputed at load, a mismatch is
                refused; a probability outside [0, 1] or NaN stops the run (exit 3).
  escaping      JSON Lines is valid UTF-8: name bytes that are not UTF-8 become \\udcXX escapes
                (os.fsencode(row["path"]) gives the name back). CSV keeps names as bytes; a path
                starting with = + - @ tab CR or ' gets one leading ' (no spreadsheet formulas).
  streams       -o - writes rows to standard output (the summary goes to stderr); pipes, FIFOs ok.

Exit code: 0 every input classified; 1 some inputs failed (see their rows); 2 bad usage, model or
output file (incl. one held by another run); 3 the engine failed (incl. probabilities out of range);
130 interrupted (rows so far are kept: rerun with --resume).

\b
Examples:
  ami-infer crops/                          shipped model, writes ./ami-infer.csv
  ami-infer slide1/ slide2/ -o res.jsonl    JSON Lines (format from the extension)
  ami-infer list.txt --model ens.onnx --threshold 0.4 --batch-size 128
  ami-infer crops/ -o out.csv --resume      finish an interrupted run
  ami-infer crops/ -o out.csv --resume --retry-errors   ... and try the failed crops again
  ami-infer crops/ -o - --no-progress | grep Atypical   stream CSV rows to a pipe
  ami-infer crops/ --model edge.plan        a TensorRT plan (ami[trt] and a GPU)
  ami-infer crops/ --model edge-int8.onnx   int8 artefact; with ami[openvino] installed, auto runs it on OpenVINO
  ami-infer crops/ --engine openvino --precision bf16    bf16 on a CPU that has it
  ami-infer --sample                        the real crops shipped with ami
  ami-infer --slides detections.csv -o res.csv    crops cut from whole-slide images (ami[slides]):
                                            rows per detection, res.slides.csv, res.geojson/ for QuPath
"""


class Fmt(str, Enum):
    csv = "csv"
    jsonl = "jsonl"


class Provider(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    tensorrt = "tensorrt"


# Engine names come from the plug-in registry (ami.runtime.engines.REGISTRY).
EngineName = Enum("EngineName", {n: n for n in ENGINE_CHOICES}, type=str)


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    int8 = "int8"


class Pool(str, Enum):
    thread = "thread"
    process = "process"


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, rich_markup_mode=None)


def _err(msg: str, code: int = 2) -> typer.Exit:
    typer.echo(f"ami-infer: error: {msg}", err=True)
    return typer.Exit(code)


def sample_inputs() -> list[str]:
    if not SAMPLES.is_dir():
        raise _err(f"no sample crops shipped at {SAMPLES} (this install lacks them); run ami-infer on your own crops")
    crops = list(iter_inputs([str(SAMPLES)]))
    if not crops:
        raise _err(f"the sample folder {SAMPLES} holds no crops yet (this install lacks them); "
                   "run ami-infer on your own crops")
    return crops


@app.command(help=HELP, no_args_is_help=False)
def infer(
    paths: Optional[list[str]] = typer.Argument(None, metavar="PATH...", show_default=False,
                                                help="Folders, images or .txt/.csv lists of image paths."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="FILE",
                                          help="Result file, or - for standard output. Default: ./ami-infer.csv "
                                               "(./ami-infer.jsonl with --format jsonl)."),
    fmt: Optional[Fmt] = typer.Option(None, "--format", case_sensitive=False,
                                      help="csv or jsonl. Default: from the output's extension, else csv."),
    model: Optional[Path] = typer.Option(None, "--model", metavar="FILE",
                                         help="An exported ami ONNX model or TensorRT plan. Default: the edge model shipped in the package."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0,
                                              help="Decision threshold on prob_atypical. Default: the model's (from its metadata)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Crops per engine call."),
    workers: int = typer.Option(0, "--workers", min=0, help="Decoding workers (0 = one per CPU core, at most 8)."),
    threads: int = typer.Option(0, "--threads", min=0, help="Engine CPU threads (0 = the engine's default: one per physical "
                                "core; more than the machine's cores are capped to them)."),
    engine_name: EngineName = typer.Option("auto", "--engine", case_sensitive=False,
                                           help="Inference engine: auto = the fastest installed for the model and this "
                                                "machine (TensorRT plan > ONNX Runtime GPU > OpenVINO > ONNX Runtime CPU; "
                                                "it prints what it picked and why), or force one by name."),
    precision: Precision = typer.Option(Precision.auto, "--precision", case_sensitive=False,
                                        help="auto = the model's own (fp32 or int8); bf16 = an fp32 model in bf16 on "
                                             "OpenVINO, on a CPU with bf16 instructions (faster, within the fp16 parity "
                                             "tolerances)."),
    provider: Provider = typer.Option(Provider.auto, "--provider", case_sensitive=False,
                                      help="ONNX Runtime provider: auto = TensorRT > CUDA > CPU, whichever is installed "
                                           "(a value other than auto selects --engine onnxruntime)."),
    resume: bool = typer.Option(False, "--resume", help="Skip inputs already in the output file and append the rest "
                                "(refused if its record names another model file or threshold)."),
    resume_any: bool = typer.Option(False, "--resume-any", help="Resume even with another model or threshold than the "
                                    "rows already written (the summary and the record say the file is mixed)."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="With --resume: try inputs whose row is an error "
                                      "again; the new row replaces the old one when the run completes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file (never one another run "
                                   "holds, never an input)."),
    sample: bool = typer.Option(False, "--sample", help="Run on the sample crops shipped with the package."),
    pool: Pool = typer.Option(Pool.thread, "--pool", case_sensitive=False,
                              help="Decoding pool: threads (default, fastest here) or processes."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress line with crops/s on stderr."),
    slides: Optional[Path] = typer.Option(None, "--slides", metavar="CSV",
                                          help="Detections on whole-slide images: a CSV with slide, x, y (level-0 px of the "
                                               "figure's centre) and optional id. Crops are cut at the model's training "
                                               "resolution (needs ami[slides]). Instead of PATH."),
    mpp: Optional[float] = typer.Option(None, "--mpp", metavar="UM_PER_PX",
                                        help="With --slides: the um/px of slides whose metadata has none (refused otherwise)."),
    border: str = typer.Option("pad", "--border", metavar="pad|refuse",
                               help="With --slides: crops reaching past the slide's edge are padded black as in training "
                                    "and flagged in the 'padded' column (pad), or become error rows (refuse)."),
):
    resume = resume or resume_any
    if resume and overwrite:
        raise _err("--resume and --overwrite exclude each other")
    if retry_errors and not resume:
        raise _err("--retry-errors goes with --resume (it retries the error rows of an existing output file)")
    cores = os.cpu_count() or 1
    if threads > cores:
        typer.echo(f"ami-infer: note: --threads {threads} capped to this machine's {cores} cores", err=True)
        threads = cores
    if slides is not None and (paths or sample):
        raise _err("--slides replaces PATH and --sample; give one of them")
    if slides is None and (mpp is not None or border != "pad"):
        raise _err("--mpp and --border apply to --slides only")
    if not paths and not sample and slides is None:
        raise _err("give at least one PATH (a folder, an image or a list of paths), or --sample; see --help")
    ext = "jsonl" if fmt == Fmt.jsonl else "csv"
    if sample and not paths and output is None and not resume:
        # the demo is repeatable: its own output file, replaced on every run
        output, overwrite = Path(f"ami-sample.{ext}"), True
    out = output or Path(f"ami-infer.{ext}")
    stream = is_stream(out)
    try:
        out_fmt = format_for(out, fmt.value if fmt else None)
    except InputError as e:
        raise _err(str(e)) from None

    if out.is_dir():
        raise _err(f"output {out} is a directory; give a file name with -o")
    if stream and resume:
        raise _err(f"cannot --resume {out}: it is a stream (standard output, a pipe or a device), not a file")
    if not stream and out.is_file() and out.stat().st_size > 0 and not (resume or overwrite):
        raise _err(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")

    try:
        engine = load_engine(model, provider=provider.value, threads=threads, engine=engine_name.value,
                             precision=precision.value)
    except (ArtifactError, EngineError) as e:
        raise _err(str(e)) from None
    typer.echo(f"model: {engine.describe()}", err=True)
    if getattr(engine, "weights_verified", False):
        typer.echo(f"model: weights match their digest ({engine.meta.weights_digest[:19]}...)", err=True)
    else:
        typer.echo(f"ami-infer: warning: {NO_DIGEST_WARNING.format(name=engine.path.name)}", err=True)
    if engine.choice:
        typer.echo(f"engine: {engine.choice}", err=True)
    if getattr(engine, "cache_dir", None):
        typer.echo(f"compiled-model cache: {engine.cache_dir}", err=True)
    if slides is not None:
        from .infer_slides import run_slides_cli

        run_slides_cli(slides, engine, out, out_fmt, mpp=mpp, border=border, batch_size=batch_size, workers=workers,
                       threshold=threshold, resume=resume, progress=progress, pool=pool.value, overwrite=overwrite)

    try:
        crops = sample_inputs() if sample else []
        if paths:
            crops += list(iter_inputs(paths))
    except InputError as e:
        raise _err(str(e)) from None
    if not crops:
        where = ", ".join(paths or [])
        raise _err(f"no crops found in {where} (looked for {' '.join(IMAGE_SUFFIXES)} files, recursively)")
    where = "standard output" if str(out) == "-" else out
    typer.echo(f"inputs: {len(crops)} crops -> {where} ({out_fmt}); PNG decoder: {fast_decoder()}", err=True)
    protect = [p for p in (paths or []) if os.path.isfile(p)]  # list files (and single crops) are inputs too

    try:
        summary = run_inference(crops, engine, "-" if str(out) == "-" else out, out_fmt, batch_size=batch_size,
                                workers=workers, threshold=threshold, resume=resume, progress=progress,
                                pool=pool.value, overwrite=overwrite, resume_any=resume_any,
                                retry_errors=retry_errors, protect=protect)
    except InputError as e:
        raise _err(str(e)) from None
    except EngineError as e:
        kept = "" if stream else f"\nrows written so far are kept in {out}; rerun with --resume"
        raise _err(f"{e}{kept}", 3) from None
    except OSError as e:
        raise _err(f"cannot write {where}: {e.strerror or e}") from None

    for line in summary.lines():
        typer.echo(line, err=stream)  # a stream may be our own stdout: the summary must not mix into it
    if sample and not paths and out_fmt == "csv" and not stream:
        _sample_agreement(out)
    if summary.interrupted:
        raise typer.Exit(summary.exit_code)
    if summary.any_failed:
        n = summary.failed + summary.skipped_failed
        typer.echo(f"exit code 1: {n} of {summary.found} inputs failed", err=True)
    raise typer.Exit(summary.exit_code)


def _sample_agreement(out: Path) -> None:
    """The sample crops come with their experts' labels (SOURCES.csv): say how many agree."""
    import csv

    src = SAMPLES / "SOURCES.csv"
    if not src.is_file():
        return
    with src.open(newline="") as f:
        truth = {r["file"]: r["label"] for r in csv.DictReader(f)}
    with out.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok" and Path(r["path"]).name in truth]
    agree = sum(truth[Path(r["path"]).name] == r["label"] for r in rows)
    atyp = [r for r in rows if truth[Path(r["path"]).name] == "Atypical"]
    typer.echo(f"agreement with the experts' labels (samples/SOURCES.csv): {agree}/{len(rows)} crops; "
               f"atypical found {sum(r['label'] == 'Atypical' for r in atyp)}/{len(atyp)}")


def main() -> None:
    # Never leave half a line on the terminal after a broken pipe (e.g. `ami-infer ... | head`).
    try:
        app()
    except BrokenPipeError:  # pragma: no cover
        os._exit(1)
