"""ami-bench parity: does an exported engine keep the quality of the PyTorch model it came from?

For every evaluation set on disk (AMi-Br test split, AtNorM-Br, AtNorM-MD; absent ones are
reported as absent, never faked) and every engine - each artefact file run by every installed
engine of the plug-in registry (:mod:`ami.runtime.engines`: ONNX Runtime, OpenVINO, TensorRT)
that loads it, at every precision that engine runs it at here (OpenVINO: fp32 and, on a CPU with
bf16, bf16 for an fp32 file) - the PyTorch model and the engine classify the *same pixels*: each crop is decoded once with the runtime's own decoder and geometry
(:func:`~ami.runtime.imageio.decode_rgb` + :meth:`Preprocess.to_uint8`, exactly what ``ami-infer``
does); the engine gets those uint8 pixels, PyTorch gets them through the training evaluation path
(:func:`ami.train.data.eval_batch`). Per (dataset, engine) the suite reports balanced accuracy and
AUROC of both sides, their differences (engine - PyTorch), max and mean |delta probability| and
the label agreement rate, and checks them against :data:`TOLERANCES`:

* fp32 engines: labels identical, |delta AUROC| <= 1e-4, max |delta p| <= 1e-4;
* int8, fp16 and bf16 engines: |delta balanced accuracy| <= 0.01, |delta AUROC| <= 0.005.

The precision checked is the one the engine computes in (an fp32 file on OpenVINO bf16 is held to
the bf16 limits).

Balanced accuracy uses the engine's own threshold (from its metadata) on both sides.

The PyTorch side:

* no model named: the shipped edge model, ``runtime/assets/edge.safetensors``, against
  ``edge.onnx`` (fp32) and ``edge-int8.onnx`` (those present);
* ``run=RUN`` + ``engines=[...]``: each engine's folds (from its metadata) rebuilt from
  ``RUN/fold{k}/best.safetensors`` (or ``RUN/all``) exactly as the exporter builds them; a fold
  ensemble is the mean of the fold probabilities;
* ``weights=FILE`` + ``engines=[...]``: one network (registry entry and method from the engine's
  metadata) with a full state dict.

:func:`parity` returns a :class:`Report` (Markdown / CSV / JSON); the command exits 1 when any
check fails and names the engine, dataset and metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import typer

from ami.runtime.artifact import ArtifactMeta
from ami.runtime.datasets import TEST_SETS, available_eval_sets, resolve_data_root
from ami.runtime.engines import ASSETS
from ami.runtime.hashing import file_sha256
from ami.runtime.metrics import MetricError, auroc, balanced_accuracy
from ami.runtime.preprocess import Preprocess
from ami.runtime.sampling import stratified_subset

from .common import (
    SHIPPED_ENGINES,
    SHIPPED_WEIGHTS,
    BenchError,
    build_run_models,
    build_single_model,
    decode_crops,
    engine_choices,
    engine_label,
    load_variants,
    log_to_stderr,
    machine_info,
    progress,
)
from .parity_report import (
    FORMATS,
    Check,
    EngineInfo,
    Report,
    SetResult,
    evaluate_checks,
    fmt_or_na,
    folds_text,
    tolerance_for,
)

RUNTIME_HELP = ("Inference engine(s) from the registry (" + engine_choices()
                + "); repeat for several. Default: every installed engine that loads the file.")


class ParityError(BenchError):
    """The comparison cannot be set up (no model, weights that do not fit, no data); not a failed check."""


# -- the PyTorch side ----------------------------------------------------------------------------

class TorchReference:
    """One PyTorch model (a fold ensemble = mean of fold probabilities) on the training eval path."""

    def __init__(self, models: list, pre: Preprocess, description: str, device: str = "cpu"):
        import torch

        self.device = torch.device(device)
        if self.device.type == "cuda":  # a float32 reference, not TF32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.models = [m.float().eval().to(self.device) for m in models]
        self.pre = pre
        self.description = description
        self.src = None  # the RunSource, when built from a run

    def predict(self, pixels: np.ndarray, batch: int = 64, desc: str = "", show: bool = True) -> np.ndarray:
        from ami.export.ensemble import reference_probs

        return reference_probs(self.models, self.pre, pixels, batch, device=self.device,
                               progress=lambda steps: progress(steps, len(steps), desc, show))



def _provenance_run(src, meta: ArtifactMeta) -> str:
    recorded = (meta.source or {}).get("weights_sha256") or {}
    if not recorded:
        return "the engine records no weights digest (provenance not checked)"
    bad = []
    for f in src.folds:
        want = recorded.get(str(f))
        if want and want != file_sha256(src.weights(f)):
            bad.append(str(f))
    if bad:
        return (f"WARNING: the run's weights of fold(s) {','.join(bad)} differ from those the engine was exported from "
                "(sha256 in its metadata)")
    return "weights sha256 match the engine's metadata"


def _provenance_file(weights: Path, meta: ArtifactMeta) -> str:
    recorded = (meta.source or {}).get("weights_sha256") or {}
    if not recorded:
        return "the engine records no weights digest (provenance not checked)"
    if file_sha256(Path(weights)) in set(recorded.values()):
        return "weights sha256 match the engine's metadata"
    return "note: these weights' sha256 is not among those the engine records (re-saved or different weights)"


# -- the suite -----------------------------------------------------------------------------------

def resolve_engines(engines: Sequence[str | Path] | None) -> tuple[list[Path], list[str]]:
    """The engine files to check and notes on shipped ones that are missing."""
    notes = []
    if engines:
        return [Path(e) for e in engines], notes
    present = [p for p in SHIPPED_ENGINES if p.is_file()]
    for p in SHIPPED_ENGINES:
        if not p.is_file():
            notes.append(f"shipped engine {p.name} is not in {ASSETS}: not checked")
    if not present:
        raise ParityError(f"no shipped engine found: {', '.join(p.name for p in SHIPPED_ENGINES)} are missing from "
                          f"{ASSETS} (the shipped edge model is not built yet?); check any artefact with "
                          "--run DIR --model FILE")
    return present, notes


def _compare(ds: str, engine_name: str, meta: ArtifactMeta, y: np.ndarray, p_torch: np.ndarray,
             p_engine: np.ndarray, extra: list[Check], precision: str | None = None) -> SetResult:
    thr = float(meta.threshold)
    precision = precision or meta.precision

    def metric(fn, *a):
        try:
            return float(fn(y, *a))
        except MetricError:
            return None

    diff = np.abs(p_engine.astype(np.float64) - p_torch.astype(np.float64))
    flips = int(np.sum((p_engine >= thr) != (p_torch >= thr)))
    r = SetResult(
        dataset=ds, engine=engine_name, precision=precision, n=int(y.size), n_atypical=int(y.sum()), threshold=thr,
        torch_ba=metric(balanced_accuracy, p_torch, thr), engine_ba=metric(balanced_accuracy, p_engine, thr),
        torch_auroc=metric(auroc, p_torch), engine_auroc=metric(auroc, p_engine),
        max_abs_dp=float(diff.max()) if diff.size else 0.0, mean_abs_dp=float(diff.mean()) if diff.size else 0.0,
        agreement=1.0 - flips / max(1, y.size), n_flips=flips)
    if not np.isfinite(p_engine).all():
        r.checks.append(Check("finite", None, None, False, "the engine returned NaN or infinite probabilities"))
    r.checks += extra + evaluate_checks(tolerance_for(precision), d_ba=r.d_ba, d_auroc=r.d_auroc,
                                        max_dp=r.max_abs_dp, flips=flips, n=r.n)
    return r


@dataclass(frozen=True)
class ParityOptions:
    """What :func:`parity` compares and how; each field is one of its keyword arguments.

    ``engines``: ONNX files / TensorRT plans (None: the shipped edge engines). ``run``: the run
    directory they were exported from; ``weights``: alternatively a full state dict of one network
    (None with no ``run`` and no ``engines``: the shipped ``edge.safetensors``). ``max_crops``: a
    class-stratified sample of at most this many crops per set (0 = all). ``provider``: ONNX Runtime
    provider for ONNX files (cpu by default: the reference runtime). ``device``: PyTorch device.
    ``keep_predictions``: keep every crop's two probabilities in the results (and the JSON).
    ``runtimes`` / ``precisions``: only these engines / precisions (None: every one that applies)."""

    run: str | Path | None = None
    engines: Sequence[str | Path] | None = None
    weights: str | Path | None = None
    max_crops: int = 0
    batch: int = 64
    threads: int = 0
    provider: str = "cpu"
    device: str = "cpu"
    datasets: Sequence[str] = TEST_SETS
    show_progress: bool = True
    keep_predictions: bool = False
    runtimes: Sequence[str] | None = None
    precisions: Sequence[str] | None = None
    log: Callable[[str], None] = log_to_stderr


def parity(data_root: str | Path | None = None, options: ParityOptions | None = None, **settings) -> Report:
    """Compare PyTorch and each engine on every present evaluation set; see the module docstring.

    ``options``: a :class:`ParityOptions`; keyword ``settings`` (its field names, e.g.
    ``engines=[...]``, ``max_crops=200``) override its fields.

    The steps: the two sides named (:func:`_pytorch_side_named`), the engines loaded, one PyTorch
    reference per distinct model (:func:`_references`), then every present set compared
    (:func:`_compare_set`).
    """
    t0 = time.perf_counter()
    opts = replace(options or ParityOptions(), **settings)
    root = resolve_data_root(data_root)
    if opts.batch < 1:
        raise ParityError(f"batch must be >= 1, got {opts.batch}")
    paths, notes = resolve_engines(opts.engines)
    opts = replace(opts, weights=_pytorch_side_named(opts))

    import torch  # the PyTorch side; imported here so --help and errors above stay fast

    if opts.threads > 0:
        torch.set_num_threads(opts.threads)

    # load the engines: every file on every installed engine that takes it, at every precision
    loaded, more = load_variants(paths, runtimes=opts.runtimes, precisions=opts.precisions, provider=opts.provider,
                                 threads=opts.threads, error=ParityError)
    notes += more
    refs, ref_of, infos = _references(loaded, opts, notes)
    report = Report(data_root=str(root), engines=infos, max_crops=max(0, int(opts.max_crops)), notes=notes)
    sets = available_eval_sets(root)
    for ds in opts.datasets:
        found = sets.get(ds)
        if found is None:
            raise ParityError(f"unknown evaluation set {ds!r}; known: {', '.join(TEST_SETS)}")
        if isinstance(found, str):
            report.absent[ds] = found
            opts.log(f"parity: {ds}: absent")
            continue
        report.results += _compare_set(ds, stratified_subset(found, opts.max_crops), loaded, infos, ref_of, refs, opts)
    if opts.max_crops and any(i.precision != "fp32" for i in infos):
        small = [r for r in report.results if r.precision != "fp32" and r.n_atypical and 1 / (2 * r.n_atypical) > 0.01]
        if small:
            report.notes.append("on a sample this small one flipped atypical label moves BA by more than the int8/fp16 "
                                "tolerance (0.01); the full sets are the verdict that counts (run without --max-crops)")
    report.machine = machine_info()
    report.seconds = time.perf_counter() - t0
    return report


def _pytorch_side_named(opts: ParityOptions) -> str | Path | None:
    """The weights of the PyTorch side: ``opts.weights``; the shipped edge.safetensors when neither
    a run nor engines are named. Refused: engines without a PyTorch side, or both a run and weights."""
    run, weights = opts.run, opts.weights
    if run is None and weights is None:
        if opts.engines:
            raise ParityError("the PyTorch side is missing: pass --run DIR (the run the engine was exported from) or "
                              "--weights FILE (a full state dict of the network)")
        weights = SHIPPED_WEIGHTS
        if not Path(weights).is_file():
            raise ParityError(f"the shipped model's PyTorch weights {weights.name} are missing from {ASSETS}: the "
                              "shipped engines cannot be compared with their PyTorch model")
    if run is not None and weights is not None:
        raise ParityError("pass either --run or --weights, not both")
    return weights


def _references(loaded: list, opts: ParityOptions, notes: list[str]) -> tuple[dict, list[tuple], list[EngineInfo]]:
    """One PyTorch reference per distinct model of the engines (their folds of ``opts.run``, or
    ``opts.weights`` as their network): (references by key, each engine's key, each engine's
    :class:`EngineInfo`). A provenance warning becomes a note."""
    refs: dict[tuple, TorchReference] = {}
    infos: list[EngineInfo] = []
    ref_of: list[tuple] = []
    for eng in loaded:
        meta = eng.meta
        key, provenance = _reference_for(eng, opts, refs)
        if provenance.startswith("WARNING"):
            notes.append(f"{eng.path.name}: {provenance}")
        ref_of.append(key)
        infos.append(EngineInfo(name=engine_label(eng), path=str(eng.path), precision=eng.precision,
                                provider=eng.provider, model=meta.model, method=meta.method, folds=list(meta.folds),
                                threshold=float(meta.threshold), tolerance=tolerance_for(eng.precision).describe(),
                                reference=refs[key].description, provenance=provenance, runtime=eng.engine,
                                artefact_precision=meta.precision))
    return refs, ref_of, infos


def _reference_for(eng, opts: ParityOptions, refs: dict) -> tuple[tuple, str]:
    """(key of the PyTorch reference of ``eng`` in ``refs``, built there when new; whether its weights
    are those the engine records)."""
    meta, run, weights, log = eng.meta, opts.run, opts.weights, opts.log
    if run is not None:
        key = ("run", tuple(str(f) for f in meta.folds))
        if not meta.folds:
            raise ParityError(f"{eng.path.name}: its metadata names no folds; cannot rebuild its PyTorch model")
        if key not in refs:
            log(f"parity: building PyTorch fold model(s) {folds_text(meta.folds)} of {Path(run).name}")
            models, cfg, src = build_run_models(Path(run), list(meta.folds), error=ParityError)
            desc = (f"{cfg.name}/{src.method} from {Path(run).name}, folds {folds_text(src.folds)}"
                    + (" (mean of fold probabilities)" if len(models) > 1 else ""))
            refs[key] = TorchReference(models, cfg.preprocess, desc, opts.device)
            refs[key].src = src
        return key, _provenance_run(refs[key].src, meta)
    key = ("weights", str(weights), meta.model, meta.method)
    if key not in refs:
        log(f"parity: building PyTorch {meta.model}/{meta.method} from {Path(weights).name}")
        model, cfg = build_single_model(Path(weights), meta.model, meta.method, error=ParityError)
        refs[key] = TorchReference([model], cfg.preprocess, f"{meta.model}/{meta.method} from {Path(weights).name}",
                                   opts.device)
    return key, _provenance_file(Path(weights), meta)


def _compare_set(ds: str, samples: list, loaded: list, infos: list[EngineInfo], ref_of: list[tuple],
                 refs: dict, opts: ParityOptions) -> list[SetResult]:
    """Every engine against its PyTorch reference on the crops of one set: each crop decoded once
    per preprocessing, each reference run once per preprocessing, the same pixels to both sides."""
    y = np.array([s.label for s in samples], dtype=np.int64)
    pixels_by_pre: dict[Preprocess, np.ndarray] = {}
    torch_cache: dict[tuple, np.ndarray] = {}
    show, out = opts.show_progress, []
    for eng, info, key in zip(loaded, infos, ref_of):
        pre, ref = eng.meta.preprocess, refs[key]
        if pre not in pixels_by_pre:
            pixels_by_pre[pre] = decode_crops([s.path for s in samples], pre, f"{ds}: decoding", show, error=ParityError)
        pixels = pixels_by_pre[pre]
        extra: list[Check] = []
        if ref.pre != pre:
            extra.append(Check("preprocess", None, None, False,
                               f"preprocess: the engine's metadata ({pre}) differs from the PyTorch model's "
                               f"({ref.pre}); the same pixels were given to both"))
        tkey = (key, pre)
        if tkey not in torch_cache:
            torch_cache[tkey] = ref.predict(pixels, opts.batch, f"{ds}: PyTorch", show)
        p_engine = _predict_engine(eng, pixels, opts.batch, f"{ds}: {info.name}", show)
        r = _compare(ds, info.name, eng.meta, y, torch_cache[tkey], p_engine, extra, eng.precision)
        if opts.keep_predictions:
            r.predictions = {"names": [s.name for s in samples], "labels": y.tolist(),
                             "torch": torch_cache[tkey].tolist(), "engine": p_engine.tolist()}
        out.append(r)
        opts.log(f"parity: {ds} / {info.name}: {'pass' if r.ok else 'FAIL'} (max |Δp| {r.max_abs_dp:.2e}, "
                 f"ΔBA {fmt_or_na(r.d_ba, '+.4f')}, ΔAUROC {fmt_or_na(r.d_auroc, '+.2e')}, {r.n_flips} label(s) differ, n={r.n})")
    return out


def _predict_engine(eng, pixels: np.ndarray, batch: int, desc: str, show: bool) -> np.ndarray:
    out = []
    steps = range(0, len(pixels), batch)
    for i in progress(steps, len(steps), desc, show):
        out.append(np.asarray(eng.predict(np.ascontiguousarray(pixels[i:i + batch])), np.float64))
    return np.concatenate(out) if out else np.zeros(0)


# -- command line --------------------------------------------------------------------------------

EPILOG = """Examples:

\b
  ami-bench parity --data-root D       # shipped edge model: edge.safetensors vs edge.onnx + edge-int8.onnx
  ami-bench parity --max-crops 200     # quick: a class-stratified sample of 200 crops per set
  ami-bench parity --run runs/edge --model edge.onnx --model edge-int8.onnx
  ami-bench parity --run runs/uni-lora --model uni.onnx --format json -o parity.json
  ami-bench parity --weights edge.safetensors --model my-edge.onnx
  ami-bench parity --engine openvino --precision bf16    # one engine, one precision

\b
Every file runs on every installed engine that loads it (ONNX Runtime, OpenVINO, TensorRT), at
every precision that engine offers here; each (file, engine, precision) is one row.
Tolerances: fp32: labels identical, |ΔAUROC| <= 1e-4, max |Δp| <= 1e-4
            int8/fp16/bf16: |ΔBA| <= 0.01, |ΔAUROC| <= 0.005
Exit status: 0 all pass; 1 a check failed (the verdict names engine, dataset and metric);
2 the comparison could not be set up. Absent datasets are reported as absent."""


def register(app: typer.Typer) -> None:
    @app.command("parity", epilog=EPILOG)
    def parity_cmd(
        data_root: Path | None = typer.Option(None, "--data-root", help="Folder holding AMi-Br/, AtNorM-Br/, AtNorM-MD/ "
                                                 "(default: $AMI_DATA_ROOT, else ~/.local/share/ami/ami-br-benchmark)."),
        run: Path | None = typer.Option(None, "--run", help="Training run the engines were exported from (its "
                                           "config.json + fold*/best.safetensors; folds from each engine's metadata)."),
        model: list[Path] | None = typer.Option(None, "--model", "-m", help="Model file (ONNX or TensorRT plan) or a "
                                                   "shipped model's name (edge, edge-int8); repeat for several. "
                                                   "Default: the shipped edge and edge-int8."),
        weights: Path | None = typer.Option(None, "--weights", help="Instead of --run: a full PyTorch state dict "
                                               "(.safetensors) of the engines' network."),
        max_crops: int = typer.Option(0, "--max-crops", help="At most N crops per set (class-stratified, seed 0); 0 = all."),
        fmt: str = typer.Option("md", "--format", "-f", help="md | csv | json."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Write the report here (the verdict still "
                                           "goes to stdout)."),
        batch_size: int = typer.Option(64, "--batch-size", help="Batch size for both sides."),
        threads: int = typer.Option(0, "--threads", help="CPU threads for PyTorch and ONNX Runtime (0 = their default)."),
        provider: str = typer.Option("cpu", "--provider", help="ONNX Runtime provider for ONNX engines: cpu | cuda | "
                                     "tensorrt | auto (plans always run on TensorRT)."),
        device: str = typer.Option("cpu", "--device", help="PyTorch device: cpu | cuda (float32, TF32 off)."),
        engine: list[str] | None = typer.Option(None, "--engine", help=RUNTIME_HELP),
        precision: list[str] | None = typer.Option(None, "--precision", help="Only these precisions (fp32 | bf16 | "
                                                      "int8); repeat. Default: every precision each engine runs the "
                                                      "file at here (OpenVINO: fp32 and bf16 where the CPU has it)."),
    ):
        """Check exported engines against their PyTorch model on every present test set."""
        if fmt not in FORMATS:
            raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
        try:
            opts = ParityOptions(run=run, engines=model, weights=weights, max_crops=max_crops, batch=batch_size,
                                 threads=threads, provider=provider, device=device, runtimes=engine,
                                 precisions=precision, log=lambda s: typer.echo(s, err=True))
            rep = parity(data_root, opts)
        except ParityError as e:
            typer.echo(f"ami-bench parity: {e}", err=True)
            raise typer.Exit(2) from None
        text = rep.render(fmt)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            typer.echo(f"wrote {out}", err=True)
            typer.echo("\n".join(rep.verdict_lines() + rep.notes))
        else:
            typer.echo(text, nl=False)
        if not rep.results:
            raise typer.Exit(2)
        if not rep.ok:
            typer.echo("PARITY FAILED: " + "; ".join(rep.failures()), err=True)
            raise typer.Exit(1)
