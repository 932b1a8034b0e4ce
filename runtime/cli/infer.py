"""ami-infer: classify crops as Atypical / Normal with an exported ami model, without torch.

The command line is turned into one options object (:class:`InferArgs`, checked once by
:func:`checked_args`, whose :meth:`~InferArgs.options` are the pipeline's
:class:`~ami.runtime.infer.InferenceOptions`); every refusal is an :class:`~ami.runtime.errors.AmiError`
raised where it is checked, and becomes one line and its exit code.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

import typer

from ..artifact import NO_DIGEST_WARNING
from ..engines import ASSETS, engine_choices, load_engine, precision_choices, provider_choices
from ..errors import first_line
from ..imageio import fast_decoder
from ..infer import (
    DEFAULT_FORMAT,
    FORMAT_NAMES,
    IMAGE_SUFFIXES,
    InferenceFault,
    InferenceOptions,
    InputError,
    RowTap,
    check_output,
    format_for,
    iter_inputs,
)
from ..infer import run as run_pipeline
from ..models import model_lines
from .contract import guard, run

PROG = "ami-infer"
SAMPLES = ASSETS / "samples"
HELP = """Classify mitotic-figure crops as Atypical or Normal, fast, on CPU or GPU, with no PyTorch.

PATH can be a folder (searched recursively for .png .jpg .jpeg .tif .tiff), a single image, or a .txt / .csv
list of image paths (relative paths are relative to the list's folder). The same file given twice (two
spellings, a symlink) is classified once, under the first spelling. One row per input is written as soon
as its batch is done: path, prob_atypical, label, status (ok | error), error, note. Bad inputs (empty,
truncated, not an image, too large, unreadable) become error rows and never stop the run; a crop with
several frames, or a shape or size far from the model's crops, is classified with a note in its row.

\b
What you can rely on (details: docs/guarantees.md):
  one writer    a run locks its -o file; a second run on it (even --resume or --overwrite) is
                refused with the holder's pid. An input (crop or list file) is never the output.
  resume        FILE.ami.json records the model file's sha256, the threshold, the engine and its
                precision; --resume refuses another one (--resume-any mixes them knowingly). A row cut by a
                crash is found by parsing the file (a quoted path may hold a newline) and removed.
  model checks  the weights digest in the model's metadata is recomputed at load, a mismatch is
                refused; a probability outside [0, 1] or NaN stops the run (exit 4).
  escaping      JSON Lines is valid UTF-8: name bytes that are not UTF-8 become \\udcXX escapes
                (os.fsencode(row["path"]) gives the name back). CSV keeps names as bytes; a path
                starting with = + - @ tab CR or ' gets one leading ' (no spreadsheet formulas).
  streams       -o - writes rows to standard output (the summary goes to stderr); pipes, FIFOs ok.

Exit code: 0 every input classified; 1 some inputs failed (see their rows); 2 bad usage, model or
output file (incl. one held by another run); 3 something this machine lacks (an engine, a library);
4 the engine failed while running (incl. probabilities out of range); 130 interrupted (rows so far
are kept: rerun with --resume).

\b
Examples:
  ami-infer crops/                          shipped model, writes ./ami-infer.csv
  ami-infer slide1/ slide2/ -o res.jsonl    JSON Lines (format from the extension)
  ami-infer list.txt --model ens.onnx --threshold 0.4 --batch-size 128
  ami-infer crops/ -o out.csv --resume      finish an interrupted run
  ami-infer crops/ -o out.csv --resume --retry-errors   ... and try the failed crops again
  ami-infer crops/ -o - --no-progress | grep Atypical   stream CSV rows to a pipe
  ami-infer crops/ --model edge.plan        a TensorRT plan (ami-mitosis[trt] and a GPU)
  ami-infer crops/ --model edge-int8        the shipped int8 model; with ami-mitosis[openvino] installed, auto runs it on OpenVINO
  ami-infer --list-models                   the shipped models by name
  ami-infer crops/ --engine openvino --precision bf16    bf16 on a CPU that has it
  ami-infer --sample                        the real crops shipped with ami
  ami-infer --slides detections.csv -o res.csv    crops cut from whole-slide images (ami-mitosis[slides]):
                                            rows per detection, res.slides.csv, res.geojson/ for QuPath
"""


# Format names come from the output-format registry (ami.runtime.infer.FORMATS).
Fmt = Enum("Fmt", {n: n for n in FORMAT_NAMES}, type=str)


# Engine, provider and precision names come from the engines' plug-ins (ami.runtime.engines).
Provider = Enum("Provider", {n: n for n in provider_choices()}, type=str)
EngineName = Enum("EngineName", {n: n for n in engine_choices()}, type=str)
Precision = Enum("Precision", {n: n for n in precision_choices()}, type=str)


class Pool(str, Enum):
    thread = "thread"
    process = "process"


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, rich_markup_mode=None)


def sample_inputs() -> list[str]:
    if not SAMPLES.is_dir():
        raise InputError(f"no sample crops shipped at {SAMPLES} (this install lacks them); "
                         "run ami-infer on your own crops")
    crops = list(iter_inputs([str(SAMPLES)]))
    if not crops:
        raise InputError(f"the sample folder {SAMPLES} holds no crops yet (this install lacks them); "
                         "run ami-infer on your own crops")
    return crops


@app.command(help=HELP, no_args_is_help=False)
@guard(PROG)  # the CLI contract: an AmiError is one line and its exit code
def infer(
    paths: list[str] | None = typer.Argument(None, metavar="PATH...", show_default=False,
                                                help="Folders, images or .txt/.csv lists of image paths."),
    output: Path | None = typer.Option(None, "-o", "--out", metavar="FILE",
                                          help="Result file, or - for standard output. Default: ./ami-infer.csv "
                                               "(./ami-infer.jsonl with --format jsonl)."),
    fmt: Fmt | None = typer.Option(None, "--format", case_sensitive=False,
                                      help="csv or jsonl. Default: from the output's extension, else csv."),
    model: Path | None = typer.Option(None, "--model", metavar="FILE|NAME",
                                         help="An exported ami ONNX model or TensorRT plan, or a shipped model by name "
                                              "(edge, edge-int8; see --list-models). Default: edge."),
    threshold: float | None = typer.Option(None, "--threshold", min=0.0, max=1.0,
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
    list_models: bool = typer.Option(False, "--list-models", help="List the shipped models (name, file, size) and exit."),
    pool: Pool = typer.Option(Pool.thread, "--pool", case_sensitive=False,
                              help="Decoding pool: threads (default, fastest here) or processes."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress line with crops/s on stderr."),
    slides: Path | None = typer.Option(None, "--slides", metavar="CSV",
                                          help="Detections on whole-slide images: a CSV with slide, x, y (level-0 px of the "
                                               "figure's centre) and optional id. Crops are cut at the model's training "
                                               "resolution (needs ami-mitosis[slides]). Instead of PATH."),
    mpp: float | None = typer.Option(None, "--mpp", metavar="UM_PER_PX",
                                        help="With --slides: the um/px of slides whose metadata has none (refused otherwise)."),
    border: str = typer.Option("pad", "--border", metavar="pad|refuse",
                               help="With --slides: crops reaching past the slide's edge are padded black as in training "
                                    "and flagged in the 'padded' column (pad), or become error rows (refuse)."),
):
    if list_models:
        for line in model_lines():
            typer.echo(line)
        raise typer.Exit(0)
    args = InferArgs(paths=tuple(paths or ()), output=output, fmt=fmt.value if fmt else None, model=model,
                     threshold=threshold, batch_size=batch_size, workers=workers, threads=threads,
                     engine=engine_name.value, precision=precision.value, provider=provider.value, resume=resume,
                     resume_any=resume_any, retry_errors=retry_errors, overwrite=overwrite, sample=sample,
                     pool=pool.value, progress=progress, slides=slides, mpp=mpp, border=border)
    args = checked_args(args)
    engine = open_engine(args)
    if args.slides is not None:
        code = run_slides_cli(args, engine)
    else:
        summary, tap = classify(args, engine, gather_crops(args))
        code = report(args, summary, labels=tap.labels if tap else None)
    raise typer.Exit(code)


@dataclass(frozen=True)
class InferArgs:
    """The ami-infer command line as values (the enums as their strings). :func:`checked_args`
    returns it resolved: ``resume`` includes --resume-any, ``threads`` capped to the cores,
    ``output`` set (the default file, or the sample's own), ``out_fmt`` and ``stream`` filled in."""

    paths: tuple[str, ...]
    output: Path | None
    fmt: str | None
    model: Path | None
    threshold: float | None
    batch_size: int
    workers: int
    threads: int
    engine: str
    precision: str
    provider: str
    resume: bool
    resume_any: bool
    retry_errors: bool
    overwrite: bool
    sample: bool
    pool: str
    progress: bool
    slides: Path | None
    mpp: float | None
    border: str
    out_fmt: str = ""  # a format of the registry, after checked_args
    stream: bool = False  # the output is standard output, a pipe or a device

    @property
    def shown_output(self) -> str | Path:
        """The output as messages name it."""
        return "standard output" if str(self.output) == "-" else self.output

    def options(self, **more) -> InferenceOptions:
        """The pipeline's options for this command line (``more``: protect, tap, source, ...)."""
        return InferenceOptions(fmt=self.out_fmt or None, batch_size=self.batch_size, workers=self.workers,
                                threshold=self.threshold, resume=self.resume, progress=self.progress, pool=self.pool,
                                overwrite=self.overwrite, resume_any=self.resume_any, retry_errors=self.retry_errors,
                                **more)


def checked_args(a: InferArgs) -> InferArgs:
    """Refuse flags that exclude each other and an output that cannot be used, before any model is
    loaded (the pipeline's and the writer's own checks, called early); return the arguments resolved
    (see :class:`InferArgs`)."""
    resume = a.resume or a.resume_any
    threads, cores = a.threads, os.cpu_count() or 1
    if threads > cores:
        typer.echo(f"ami-infer: note: --threads {threads} capped to this machine's {cores} cores", err=True)
        threads = cores
    if a.slides is not None and (a.paths or a.sample):
        raise InputError("--slides replaces PATH and --sample; give one of them")
    if a.slides is None and (a.mpp is not None or a.border != "pad"):
        raise InputError("--mpp and --border apply to --slides only")
    if not a.paths and not a.sample and a.slides is None:
        raise InputError("give at least one PATH (a folder, an image or a list of paths), or --sample; see --help")
    ext = a.fmt or DEFAULT_FORMAT
    output, overwrite = a.output, a.overwrite
    if a.sample and not a.paths and output is None and not resume:
        # the demo is repeatable: its own output file, replaced on every run
        output, overwrite = Path(f"ami-sample.{ext}"), True
    out = output or Path(f"ami-infer.{ext}")
    a = replace(a, resume=resume, threads=threads, output=out, overwrite=overwrite, out_fmt=format_for(out, a.fmt))
    a.options().checked()
    return replace(a, stream=check_output(out, resume=resume, overwrite=overwrite))


def open_engine(a: InferArgs):
    """Load the model on the chosen engine and say what runs it, whether its weights match their
    digest, how auto chose, and where compiled models are cached."""
    engine = load_engine(a.model, provider=a.provider, threads=a.threads, engine=a.engine, precision=a.precision)
    typer.echo(f"model: {engine.describe()}", err=True)
    if getattr(engine, "weights_verified", False):
        typer.echo(f"model: weights match their digest ({engine.meta.weights_digest[:19]}...)", err=True)
    else:
        typer.echo(f"ami-infer: warning: {NO_DIGEST_WARNING.format(name=engine.path.name)}", err=True)
    if engine.choice:
        typer.echo(f"engine: {engine.choice}", err=True)
    if getattr(engine, "cache_dir", None):
        typer.echo(f"compiled-model cache: {engine.cache_dir}", err=True)
    return engine


def gather_crops(a: InferArgs) -> list[str]:
    """The crops to classify: the shipped samples (--sample), then every PATH expanded; none is refused."""
    crops = sample_inputs() if a.sample else []
    if a.paths:
        crops += list(iter_inputs(a.paths))
    if not crops:
        where = ", ".join(a.paths)
        raise InputError(f"no crops found in {where} (looked for {' '.join(IMAGE_SUFFIXES)} files, recursively)")
    return crops


class _Labels(RowTap):
    """The labels of the ok rows as they stream (for the sample's agreement with its experts)."""

    def __init__(self):
        self.labels: dict[str, str] = {}

    def rows(self, rows: list[tuple]) -> None:
        for r in rows:
            if r[3] == "ok":
                self.labels[str(r[0])] = r[2]


def classify(a: InferArgs, engine, crops: list[str]):
    """Run the pipeline on ``crops`` into the output."""
    typer.echo(f"inputs: {len(crops)} crops -> {a.shown_output} ({a.out_fmt}); PNG decoder: {fast_decoder()}", err=True)
    protect = tuple(p for p in a.paths if os.path.isfile(p))  # list files (and single crops) are inputs too
    tap = _Labels() if a.sample else None
    with kept_on_fault(a):
        summary = run_pipeline(crops, engine, "-" if str(a.output) == "-" else a.output, a.options(protect=protect, tap=tap))
    return summary, tap


def run_slides_cli(a: InferArgs, engine) -> int:
    """``--slides``: run on the detections of ``a.slides``, print the run's and the per-slide summary
    (to stderr when the rows stream to stdout); return the exit code. Errors are raised (main turns
    them into one line and their exit code)."""
    from .. import slides as S

    crop = engine.meta.training_crop()
    note = " (assumed: the artefact does not record it)" if crop["assumed"] else ""
    typer.echo(f"crops: {crop['size_px']} px at {crop['mpp']:g} um/px, centred{note}; border: {a.border}", err=True)
    with kept_on_fault(a):
        summary, sums = S.run_slides(a.slides, engine, "-" if str(a.output) == "-" else a.output,
                                     slide_mpp=a.mpp, border=a.border, options=a.options())
    return report(a, summary, noun="detections", more=tuple(S.summary_lines(sums, a.output, stream=a.stream)))


@contextlib.contextmanager
def kept_on_fault(a: InferArgs):
    """While the run writes: an engine fault says that the rows so far are kept (a file can be
    resumed); an OSError on the output is one line naming it (exit 2)."""
    try:
        yield
    except InferenceFault as e:
        if a.stream:
            raise
        raise InferenceFault(f"{e}; rows written so far are kept in {a.output}: rerun with --resume") from None
    except OSError as e:
        raise InputError(f"cannot write {a.shown_output}: {e.strerror or first_line(e)}") from None


def report(a: InferArgs, summary, noun: str = "inputs", labels: dict | None = None, more: tuple = ()) -> int:
    """Print the run's summary and ``more`` lines (to stderr when the rows stream to stdout); return
    its exit code."""
    for line in (*summary.lines(), *more):
        typer.echo(line, err=a.stream)  # a stream may be our own stdout: the summary must not mix into it
    if labels is not None:
        _sample_agreement(labels, err=a.stream)
    if summary.any_failed and not summary.interrupted:
        n = summary.failed + summary.skipped_failed
        typer.echo(f"exit code 1: {n} of {summary.found} {noun} failed", err=True)
    return summary.exit_code


def _sample_agreement(labels: dict[str, str], err: bool) -> None:
    """The sample crops come with their experts' labels (SOURCES.csv): say how many agree."""
    import csv

    src = SAMPLES / "SOURCES.csv"
    if not src.is_file():
        return
    with src.open(newline="") as f:
        truth = {r["file"]: r["label"] for r in csv.DictReader(f)}
    rows = [(Path(p).name, label) for p, label in labels.items() if Path(p).name in truth]
    agree = sum(truth[name] == label for name, label in rows)
    atyp = [(name, label) for name, label in rows if truth[name] == "Atypical"]
    typer.echo(f"agreement with the experts' labels (samples/SOURCES.csv): {agree}/{len(rows)} crops; "
               f"atypical found {sum(label == 'Atypical' for _, label in atyp)}/{len(atyp)}", err=err)


def main() -> None:
    # The contract: AmiErrors one line with their exit code, anything else one line and exit 4,
    # --debug / AMI_DEBUG=1 for tracebacks; a broken pipe (`ami-infer ... | head`) ends quietly.
    run(app, "ami-infer")
