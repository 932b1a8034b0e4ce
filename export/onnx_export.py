"""Export a training run (one fold, several folds, or the all-crops model) to a checked engine.

:func:`export_onnx` is the one door (the ``ami-export`` command, the parity suite and the
shipped-model build all use it)::

    export_onnx("runs/edge", "ami-edge.onnx", folds="all", data_root=root)               # fold ensemble
    export_onnx("runs/edge/fold0", "edge-f0.onnx", data_root=root)                       # one fold
    export_onnx("ami-edge.onnx", "ami-edge-int8.onnx", engine="onnx-int8", data_root=root)
    export_onnx("runs/uni-lora", "uni.plan", engine="trt", batch=(1, 32, 128), data_root=root)
    export_onnx("runs/edge", "ami-edge-int8.onnx", ExportOptions(engine="onnx-int8", int8=Int8Options(calib_crops=800)))

Every setting is a field of :class:`~ami.export.options.ExportOptions` (grouped: ``CheckOptions``
for the float export and its self-checks, ``Int8Options``, ``TrtOptions``); the keyword arguments
of :func:`export_onnx` are those fields by name.

Steps for a run: build each fold network from its ``best.safetensors`` (LoRA: merged into the
backbone in float32 and checked, :mod:`.merge`), wrap preprocessing + folds + mean probability
in one graph (:mod:`.ensemble`), export it with ``torch.onnx.export`` (TorchScript exporter,
``dynamo=False``; fixed image size, dynamic batch, opset >= 17), check it (ONNX checker, the
artefact contract, ONNX Runtime vs PyTorch on real AMi-Br training crops at batch 1 and N), add
the self-describing metadata, and only then move it into place. Everything is written into a
hidden staging folder beside the output and renamed at the end, so a failed export leaves
nothing behind and replaces nothing the user had.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from ami.runtime import __version__
from ami.runtime.artifact import AMIBR_CROP, INPUT_NAME, OUTPUT_NAME, PLAN_SUFFIXES, ArtifactMeta, plan_weights_digest
from ami.runtime.datasets import DatasetMissing, require_data_root
from ami.runtime.sampling import stratified_subset

from .checks import (
    compare,
    load_checked,
    load_images,
    ort_predict,
    parity,
    session,
    training_samples,
    validate_contract,
)
from .errors import ExportError
from .onnx_file import write_model
from .options import ENGINES, MIN_OPSET, ExportOptions
from .quantize import quantize_int8
from .source import RunSource, choose_threshold, resolve_source, source_record, validation_summary

EXPORTER = "torch.onnx.export (TorchScript exporter, dynamo=False), traced at batch 2, dynamic batch axis"


def versions(method: str | None = None) -> dict:
    import onnx
    import onnxruntime
    import timm
    import torch

    v = {"ami": __version__, "torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
         "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "python": platform.python_version()}
    if method == "lora":
        try:
            import peft

            v["peft"] = peft.__version__
        except ImportError:
            pass
    return v


class Staging:
    """A hidden folder beside the output. Files directly in it whose names start with the
    output's name are moved into place by :meth:`commit` (the output itself last); the folder,
    with any scratch files under ``work/``, is removed on exit, success or not."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        self.work = self.dir / "work"
        self.work.mkdir()

    def path(self, suffix: str = "") -> Path:
        return self.dir / (self.out.name + suffix)

    def commit(self) -> list[Path]:
        files = sorted((p for p in self.dir.iterdir() if p.is_file() and p.name.startswith(self.out.name)),
                       key=lambda p: p.name == self.out.name)
        if not files or files[-1].name != self.out.name:
            raise ExportError(f"internal error: nothing to commit for {self.out}")
        done = []
        for p in files:
            dst = self.out.parent / p.name
            os.replace(p, dst)
            done.append(dst)
        return done

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> bool:
        shutil.rmtree(self.dir, ignore_errors=True)
        return False


def final_paths(out: Path, engine: str) -> list[Path]:
    from ami.runtime.engines.tensorrt import sidecar_path

    out = Path(out)
    if engine == "trt":
        return [out, sidecar_path(out)]
    return [out, out.with_name(out.name + ".data")]


def _torch_export(graph, path: Path, input_size: int, opset: int) -> None:
    """The export call itself (a seam the tests use to hand the checks a wrong model)."""
    import torch

    x = torch.randint(0, 256, (2, input_size, input_size, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer notes
        torch.onnx.export(graph, (x,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                          do_constant_folding=True)


def check_images(data_root: Path, n: int, pre) -> np.ndarray:
    return load_images(stratified_subset(training_samples(data_root), n, seed=0), pre, "self-check crops")


def head_modules(cfg, method: str) -> list[str]:
    """The classifier head of a fold network, recorded in the artefact (the int8 step keeps it
    float32): the registry entry's timm head when the whole network is trained, the new one-logit
    head (:data:`ami.train.adapt.HEAD`) of a linear probe or LoRA run."""
    from ami.train.adapt import HEAD

    return [cfg.head] if method == "full" else [HEAD]


def _fold_models(src: RunSource, pre, images: np.ndarray, weights: str | None, log) -> tuple[list, dict]:
    """(fold networks in float32, eval mode, LoRA merged and checked; LoRA merge reports by fold)."""
    import torch

    from .ensemble import build_fold_model
    from .merge import merge_lora_checked

    models, merges = [], {}
    with torch.no_grad():
        for f in src.folds:
            m = build_fold_model(src, f, weights)
            if src.method == "lora":
                m, merges[str(f)] = merge_lora_checked(m, pre, images, what=f"LoRA merge of fold {f}")
                log(f"export: fold {f}: LoRA merged, max |delta p| {merges[str(f)]['max_abs_diff']:.2g} on {len(images)} crops")
            models.append(m)
    return models, merges


def _export_float(src: RunSource, st: Staging, final: Path, data_root: Path,
                  opts: ExportOptions) -> tuple[Path, ArtifactMeta, np.ndarray, np.ndarray]:
    """Run -> checked float32 ONNX at ``final`` (inside the staging folder)."""
    import onnx

    from .ensemble import DeployGraph, reference_probs

    chk, log = opts.check, opts.log
    cfg = src.cfg
    pre = cfg.preprocess
    what = f"{src.run_dir.name} ({cfg.name}/{src.method}, folds {','.join(map(str, src.folds))})"
    log(f"export: {what}{' - TINY STAND-IN' if src.tiny else ''}")
    images = check_images(data_root, chk.check_crops, pre)
    models, merges = _fold_models(src, pre, images, opts.weights, log)
    ref = reference_probs(models, pre, images)
    thr, rule, thr_details = choose_threshold(src, opts.threshold)
    log(f"export: threshold {thr:.6g} - {rule}")
    graph = DeployGraph(pre, models).eval()
    raw_dir = st.work / "raw"
    raw_dir.mkdir()
    raw = raw_dir / "model.onnx"
    _torch_export(graph, raw, pre.input_size, chk.opset)
    load_checked(raw)
    rep = parity(raw, images, ref, thr, chk.tol, chk.check_batch, threads=opts.threads)
    log(f"export: ONNX Runtime vs PyTorch on {rep.n} AMi-Br training crops (batch {rep.batches[0]} and "
        f"{rep.batches[1]}): max |delta p| {rep.max_abs_diff:.2g}, labels identical")
    display = cfg.display + (f" - {len(models)}-fold ensemble" if len(models) > 1 else "")
    if src.tiny:
        display += " [TINY RANDOM STAND-IN of the architecture: tests only]"
    meta = ArtifactMeta(
        model=cfg.name, method=src.method, preprocess=pre, threshold=thr, threshold_rule=rule, precision="fp32",
        display=display, folds=list(src.folds), source=source_record(src), validation=validation_summary(src, thr),
        versions=versions(src.method), crop=dict(AMIBR_CROP), head_modules=head_modules(cfg, src.method),
        extra={"opset": chk.opset, "exporter": EXPORTER, "dynamic_batch": True, "timm_exportable_mode": True,
               "graph": f"uint8 pixels -> preprocessing -> {len(models)} fold network(s) -> mean of sigmoid(logit)",
               "self_check": {**rep.to_dict(), "crops": "AMi-Br training crops (stratified, seed 0)",
                              "reference": "PyTorch fp32, training preprocessing (ami.train.data.eval_batch)"},
               "threshold_details": thr_details, **({"lora_merge": merges} if merges else {})})
    write_model(onnx.load(str(raw)), final, meta)
    validate_contract(final)
    k = min(8, len(images))
    parity(final, images[:k], ref[:k], thr, chk.tol, batch=k, threads=opts.threads, what="final file vs PyTorch")
    return final, meta, images, ref


def _check_request(opts: ExportOptions, out: Path) -> None:
    """Refuse bad options and an output in the way before any work (ExportError, or TensorRTUnavailable)."""
    if opts.engine not in ENGINES:
        raise ExportError(f"--engine must be one of {', '.join(ENGINES)}, got {opts.engine!r}")
    if opts.check.opset < MIN_OPSET:
        raise ExportError(f"--opset must be >= {MIN_OPSET} (one LayerNormalization node, TensorRT-safe), "
                          f"got {opts.check.opset}")
    if opts.check.check_crops < 2:
        raise ExportError("the self-check needs at least 2 crops")
    if opts.engine == "trt" and out.suffix.lower() not in PLAN_SUFFIXES:
        raise ExportError(f"-o {out}: a TensorRT plan's name ends with .plan (its metadata goes beside it, NAME.plan.json)")
    if opts.engine != "trt" and out.suffix.lower() != ".onnx":
        raise ExportError(f"-o {out}: an ONNX model's name ends with .onnx")
    if opts.engine == "trt":
        from .tensorrt import parse_batches, require_tensorrt

        if opts.trt.precision not in ("fp16", "fp32"):
            raise ExportError(f"--precision must be fp16 or fp32, got {opts.trt.precision!r}")
        parse_batches(opts.trt.batch)
        require_tensorrt()  # fail before any work when there is no GPU / TensorRT
    existing = [p for p in final_paths(out, opts.engine) if p.exists()]
    if existing and not opts.force:
        raise ExportError(f"{existing[0]} already exists; pass --overwrite to replace it (it is replaced only after "
                          "every check has passed)")
    if out.exists() and out.is_dir():
        raise ExportError(f"{out} is a directory; -o takes a file name")


def _float_model(src_path: Path, st: Staging, root: Path,
                 opts: ExportOptions) -> tuple[Path, ArtifactMeta, np.ndarray | None]:
    """(checked float32 model, its metadata, the self-check crops or None): the given ami ONNX
    file, or a fresh export of the run (into the output's place for engine onnx, else scratch)."""
    if src_path.is_file():
        if opts.engine == "onnx":
            raise ExportError(f"{src_path} is already an ONNX model; from a file, export --engine onnx-int8 or trt")
        meta = validate_contract(src_path, load_checked(src_path, load_weights=False))
        opts.log(f"export: {src_path.name}: {meta.display} ({meta.precision}, folds {meta.folds})")
        return src_path, meta, None
    src = resolve_source(src_path, opts.folds)
    final = st.path() if opts.engine == "onnx" else st.work / "float.onnx"
    float_path, meta, images, _ = _export_float(src, st, final, root, opts)
    return float_path, meta, images


def export_onnx(source, out, options: ExportOptions | None = None, **kwargs) -> Path:
    """Export ``source`` (run dir, fold dir, or - for int8/trt - an ami ONNX file) to ``out``.

    ``options`` (:class:`ExportOptions`) holds every setting; keyword arguments named like its
    fields (``engine="trt"``, ``calib_crops=800``, ``batch="1,8,32"``, ``log=...``) replace them.
    Returns ``out`` once every check passed; raises :class:`~ami.export.ExportError` (or a
    subclass: CheckFailed, Int8Rejected, TensorRTUnavailable) otherwise, leaving no file behind.
    """
    opts = (options or ExportOptions()).with_overrides(**kwargs)
    out = Path(out)
    _check_request(opts, out)
    try:  # the self-checks read real training crops: a missing data root is refused before any work
        root = require_data_root(opts.data_root, ("AMi-Br",), train_split=True)
    except DatasetMissing as e:
        raise ExportError(str(e)) from None
    with Staging(out) as st:
        float_path, meta, images = _float_model(Path(source), st, root, opts)
        if opts.engine == "onnx-int8":
            quantize_int8(float_path, st.path(), meta, root, st.work / "int8", opts.int8, threads=opts.threads,
                          batch=opts.check.check_batch, log=opts.log)
        elif opts.engine == "trt":
            _build_trt(float_path, meta, st, root, images, opts)
        written = st.commit()
    for p in written:
        opts.log(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
    return out


def _fp16_graph_checked(float_path: Path, meta: ArtifactMeta, st: Staging, images: np.ndarray, p_float: np.ndarray,
                        opts: ExportOptions) -> Path:
    """The fp16 network graph TensorRT builds from, checked on ONNX Runtime where it can run it."""
    import onnx

    from .tensorrt import TOLERANCE, fp16_graph

    m16 = fp16_graph(onnx.load(str(float_path)))
    graph_path = st.work / "fp16.onnx"
    write_model(m16, graph_path, replace(meta, precision="fp16"), doc=f"{meta.display} - fp16 network")
    try:
        p16 = ort_predict(session(graph_path, opts.threads), images, opts.check.check_batch)
    except ExportError as e:  # ONNX Runtime's CPU provider lacks some fp16 kernels; the plan check decides
        opts.log(f"trt: fp16 graph not runnable on this ONNX Runtime ({e}); the plan check below decides")
    else:
        r16 = compare(p16, p_float, meta.threshold, TOLERANCE["fp16"], "fp16 ONNX graph vs float32",
                      [opts.check.check_batch], flip_margin=TOLERANCE["fp16"])
        opts.log(f"trt: fp16 graph on ONNX Runtime vs float32: max |delta p| {r16.max_abs_diff:.2g}")
    return graph_path


def _build_trt(float_path: Path, meta: ArtifactMeta, st: Staging, root: Path, images, opts: ExportOptions) -> None:
    from ami.runtime.engines.tensorrt import write_plan_sidecar

    from .tensorrt import TOLERANCE, build_engine, parse_batches, run_plan

    t, log = opts.trt, opts.log
    if meta.precision != "fp32":
        raise ExportError(f"TensorRT plans are built from the float32 ami model, not from a {meta.precision} one "
                          "(ONNX Runtime's int8 Q/DQ uses asymmetric activations, which TensorRT does not take)")
    if images is None:
        images = check_images(root, opts.check.check_crops, meta.preprocess)
    p_float = ort_predict(session(float_path, opts.threads), images, opts.check.check_batch)
    thr = meta.threshold
    graph_path = Path(float_path)
    if t.precision == "fp16":
        graph_path = _fp16_graph_checked(float_path, meta, st, images, p_float, opts)
    plan = st.path()
    info = build_engine(graph_path, plan, input_size=meta.preprocess.input_size, batches=t.batch,
                        precision=t.precision, timing_cache=t.timing_cache, workspace_gb=t.workspace_gb, log=log)

    def sidecar(extra_check: dict | None = None) -> ArtifactMeta:
        trt_rec = {**info, **({"self_check": extra_check} if extra_check else {})}
        pmeta = replace(meta, precision=t.precision, versions={**meta.versions, "tensorrt": info["version"]},
                        weights_digest=plan_weights_digest(plan),
                        extra={**meta.extra, "tensorrt": trt_rec, "built_from": Path(float_path).name})
        write_plan_sidecar(plan, pmeta, tensorrt_version=info["version"], gpu_name=info["gpu_name"],
                           compute_capability=info["compute_capability"], profile=dict(info["profile"]))
        return pmeta

    sidecar()
    bmin, _, bmax = parse_batches(t.batch)
    p_plan, p_one = run_plan(plan, images, bmin, bmax)
    tol = TOLERANCE[t.precision]
    rep = compare(p_plan, p_float, thr, tol, f"TensorRT {t.precision} plan vs float32 ONNX (batch {bmax})", [bmax],
                  flip_margin=tol)
    if p_one is not None:
        compare(p_one, p_float[:len(p_one)], thr, tol, "TensorRT plan at batch 1", [1], flip_margin=tol)
        rep.batches = [1, bmax]
    log(f"trt: plan vs float32 ONNX on {rep.n} AMi-Br training crops: max |delta p| {rep.max_abs_diff:.2g} "
        f"(tolerance {tol:g}), {rep.n_label_flips} label flip(s), all within {tol:g} of the threshold")
    sidecar({**rep.to_dict(), "reference": "the float32 ONNX model on ONNX Runtime (CPU)"})
