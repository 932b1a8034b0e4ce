"""Export a training run (one fold, several folds, or the all-crops model) to a checked engine.

:func:`export_onnx` is the one door (the ``ami-export`` command, the parity suite and the
shipped-model build all use it)::

    export_onnx("runs/edge", "ami-edge.onnx", folds="all", data_root=root)               # fold ensemble
    export_onnx("runs/edge/fold0", "edge-f0.onnx", data_root=root)                       # one fold
    export_onnx("ami-edge.onnx", "ami-edge-int8.onnx", engine="onnx-int8", data_root=root)
    export_onnx("runs/uni-lora", "uni.plan", engine="trt", batch=(1, 32, 128), data_root=root)

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
from ami.runtime.artifact import (AMIBR_CROP, INPUT_NAME, OUTPUT_NAME, ArtifactMeta, plan_weights_digest,
                                  stamp_weights_digest)
from ami.runtime.datasets import resolve_data_root

from . import ExportError
from .checks import (
    compare,
    load_checked,
    load_images,
    ort_predict,
    parity,
    session,
    set_meta,
    stratified,
    training_samples,
    validate_contract,
)
from .quantize import AUROC_TOL, BA_TOL, CALIB_CROPS
from .source import RunSource, choose_threshold, resolve_source, source_record, validation_summary

ENGINES = ("onnx", "onnx-int8", "trt")
MIN_OPSET = 17
PARITY_TOL = 1e-4
CHECK_CROPS = 64
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph
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

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> bool:
        shutil.rmtree(self.dir, ignore_errors=True)
        return False


def final_paths(out: Path, engine: str) -> list[Path]:
    out = Path(out)
    if engine == "trt":
        return [out, out.with_name(out.name + ".json")]
    return [out, out.with_name(out.name + ".data")]


def _initializer_bytes(model) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def write_model(model, path: Path, meta: ArtifactMeta, doc: str = "") -> list[Path]:
    """Save ``model`` with ``meta`` in its metadata; external data (``<name>.data``) when > ~2 GB."""
    import onnx

    set_meta(model, meta)
    model.producer_name = "ami-export"
    model.producer_version = __version__
    model.doc_string = (doc or meta.display) + (
        f". Input '{INPUT_NAME}': uint8 [N,{meta.preprocess.input_size},{meta.preprocess.input_size},3] RGB; output "
        f"'{OUTPUT_NAME}': float32 [N], P(Atypical). Metadata key 'ami' describes the rest.")
    path = Path(path)
    if _initializer_bytes(model) > EXTERNAL_DATA_BYTES:
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        stamp_weights_digest(path)  # the weights digest the runtime checks at load
        return [data, path]
    onnx.save_model(model, str(path))
    stamp_weights_digest(path)
    return [path]


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
    return load_images(stratified(training_samples(data_root), n, seed=0), pre, "self-check crops")


def _export_float(src: RunSource, st: Staging, final: Path, data_root: Path, *, threshold, opset: int,
                  check_crops: int, check_batch: int, tol: float, threads: int, weights: str | None, log) -> tuple[Path, ArtifactMeta, np.ndarray, np.ndarray]:
    """Run -> checked float32 ONNX at ``final`` (inside the staging folder)."""
    import onnx
    import torch

    from .ensemble import DeployGraph, build_fold_model, reference_probs
    from .merge import merge_lora_checked

    cfg = src.cfg
    pre = cfg.preprocess
    what = f"{src.run_dir.name} ({cfg.name}/{src.method}, folds {','.join(map(str, src.folds))})"
    log(f"export: {what}{' - TINY STAND-IN' if src.tiny else ''}")
    images = check_images(data_root, check_crops, pre)
    models, merges = [], {}
    with torch.no_grad():
        for f in src.folds:
            m = build_fold_model(src, f, weights, log)
            if src.method == "lora":
                m, merges[str(f)] = merge_lora_checked(m, pre, images, what=f"LoRA merge of fold {f}")
                log(f"export: fold {f}: LoRA merged, max |delta p| {merges[str(f)]['max_abs_diff']:.2g} on {len(images)} crops")
            models.append(m)
        ref = reference_probs(models, pre, images)
    thr, rule, thr_details = choose_threshold(src, threshold)
    log(f"export: threshold {thr:.6g} - {rule}")
    graph = DeployGraph(pre, models).eval()
    raw_dir = st.work / "raw"
    raw_dir.mkdir()
    raw = raw_dir / "model.onnx"
    _torch_export(graph, raw, pre.input_size, opset)
    load_checked(raw)
    rep = parity(raw, images, ref, thr, tol, check_batch, threads=threads)
    log(f"export: ONNX Runtime vs PyTorch on {rep.n} AMi-Br training crops (batch {rep.batches[0]} and "
        f"{rep.batches[1]}): max |delta p| {rep.max_abs_diff:.2g}, labels identical")
    display = cfg.display + (f" - {len(models)}-fold ensemble" if len(models) > 1 else "")
    if src.tiny:
        display += " [TINY RANDOM STAND-IN of the architecture: tests only]"
    meta = ArtifactMeta(
        model=cfg.name, method=src.method, preprocess=pre, threshold=thr, threshold_rule=rule, precision="fp32",
        display=display, folds=list(src.folds), source=source_record(src), validation=validation_summary(src, thr),
        versions=versions(src.method), crop=dict(AMIBR_CROP),
        extra={"opset": opset, "exporter": EXPORTER, "dynamic_batch": True, "timm_exportable_mode": True,
               "graph": f"uint8 pixels -> preprocessing -> {len(models)} fold network(s) -> mean of sigmoid(logit)",
               "self_check": {**rep.to_dict(), "crops": "AMi-Br training crops (stratified, seed 0)",
                              "reference": "PyTorch fp32, training preprocessing (ami.train.data.eval_batch)"},
               "threshold_details": thr_details, **({"lora_merge": merges} if merges else {})})
    write_model(onnx.load(str(raw)), final, meta)
    validate_contract(final)
    k = min(8, len(images))
    parity(final, images[:k], ref[:k], thr, tol, batch=k, threads=threads, what="final file vs PyTorch")
    return final, meta, images, ref


def export_onnx(source, out, *, folds="all", data_root=None, engine: str = "onnx", threshold: float | None = None,
                opset: int = MIN_OPSET, check_crops: int = CHECK_CROPS, check_batch: int = 16, tol: float = PARITY_TOL,
                force: bool = False, threads: int = 0, weights: str | None = None,
                calib_crops: int = CALIB_CROPS, eval_crops: int = 0, per_channel="auto", calibration: str = "minmax",
                activations: str = "s8",
                ba_tol: float = BA_TOL, auroc_tol: float = AUROC_TOL,
                speed_batch: int = 0, batch=(1, 32, 128), precision: str = "fp16", timing_cache=None,
                workspace_gb: float = 0.0, log=print) -> Path:
    """Export ``source`` (run dir, fold dir, or - for int8/trt - an ami ONNX file) to ``out``.

    Returns ``out`` once every check passed; raises :class:`~ami.export.ExportError` (or a
    subclass: CheckFailed, Int8Rejected, TensorRTUnavailable) otherwise, leaving no file behind.
    """
    if engine not in ENGINES:
        raise ExportError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if opset < MIN_OPSET:
        raise ExportError(f"--opset must be >= {MIN_OPSET} (one LayerNormalization node, TensorRT-safe), got {opset}")
    if check_crops < 2:
        raise ExportError("the self-check needs at least 2 crops")
    out = Path(out)
    if engine == "trt" and out.suffix.lower() not in (".plan", ".engine", ".trt"):
        raise ExportError(f"-o {out}: a TensorRT plan's name ends with .plan (its metadata goes beside it, NAME.plan.json)")
    if engine != "trt" and out.suffix.lower() != ".onnx":
        raise ExportError(f"-o {out}: an ONNX model's name ends with .onnx")
    if engine == "trt":
        from .tensorrt import parse_batches, require_tensorrt

        if precision not in ("fp16", "fp32"):
            raise ExportError(f"--precision must be fp16 or fp32, got {precision!r}")
        parse_batches(batch)
        require_tensorrt()  # fail before any work when there is no GPU / TensorRT
    existing = [p for p in final_paths(out, engine) if p.exists()]
    if existing and not force:
        raise ExportError(f"{existing[0]} already exists; pass --force to replace it (it is replaced only after "
                          "every check has passed)")
    if out.exists() and out.is_dir():
        raise ExportError(f"{out} is a directory; -o takes a file name")
    root = resolve_data_root(data_root)
    src_path = Path(source)
    with Staging(out) as st:
        images = None
        if src_path.is_file():
            if engine == "onnx":
                raise ExportError(f"{src_path} is already an ONNX model; from a file, export --engine onnx-int8 or trt")
            meta = validate_contract(src_path, load_checked(src_path, load_weights=False))
            float_path = src_path
            log(f"export: {src_path.name}: {meta.display} ({meta.precision}, folds {meta.folds})")
        else:
            src = resolve_source(src_path, folds)
            final = st.path() if engine == "onnx" else st.work / "float.onnx"
            float_path, meta, images, _ = _export_float(
                src, st, final, root, threshold=threshold, opset=opset, check_crops=check_crops,
                check_batch=check_batch, tol=tol, threads=threads, weights=weights, log=log)
        if engine == "onnx-int8":
            from .quantize import quantize_int8

            quantize_int8(float_path, st.path(), meta, root, st.work / "int8", calib_crops=calib_crops,
                          eval_crops=eval_crops, per_channel=per_channel, ba_tol=ba_tol, auroc_tol=auroc_tol,
                          method=calibration, activations=activations, threads=threads, batch=check_batch,
                          speed_batch=speed_batch, log=log)
        elif engine == "trt":
            _build_trt(float_path, meta, st, root, images, batch=batch, precision=precision, timing_cache=timing_cache,
                       workspace_gb=workspace_gb, check_crops=check_crops, check_batch=check_batch, threads=threads, log=log)
        written = st.commit()
    for p in written:
        log(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
    return out


def _build_trt(float_path: Path, meta: ArtifactMeta, st: Staging, root: Path, images, *, batch, precision: str,
               timing_cache, workspace_gb: float, check_crops: int, check_batch: int, threads: int, log) -> None:
    import onnx

    from .tensorrt import TOLERANCE, build_engine, fp16_graph, parse_batches, run_plan

    if meta.precision != "fp32":
        raise ExportError(f"TensorRT plans are built from the float32 ami model, not from a {meta.precision} one "
                          "(ONNX Runtime's int8 Q/DQ uses asymmetric activations, which TensorRT does not take)")
    if images is None:
        images = check_images(root, check_crops, meta.preprocess)
    p_float = ort_predict(session(float_path, threads), images, check_batch)
    thr = meta.threshold
    graph_path = Path(float_path)
    if precision == "fp16":
        m16 = fp16_graph(onnx.load(str(float_path)))
        graph_path = st.work / "fp16.onnx"
        write_model(m16, graph_path, replace(meta, precision="fp16"), doc=f"{meta.display} - fp16 network")
        try:
            p16 = ort_predict(session(graph_path, threads), images, check_batch)
        except ExportError as e:  # ONNX Runtime's CPU provider lacks some fp16 kernels; the plan check decides
            log(f"trt: fp16 graph not runnable on this ONNX Runtime ({e}); the plan check below decides")
        else:
            r16 = compare(p16, p_float, thr, TOLERANCE["fp16"], "fp16 ONNX graph vs float32", [check_batch],
                          flip_margin=TOLERANCE["fp16"])
            log(f"trt: fp16 graph on ONNX Runtime vs float32: max |delta p| {r16.max_abs_diff:.2g}")
    plan = st.path()
    info = build_engine(graph_path, plan, input_size=meta.preprocess.input_size, batches=batch, precision=precision,
                        timing_cache=timing_cache, workspace_gb=workspace_gb, log=log)
    from ami.runtime.engines.tensorrt import write_plan_sidecar

    def sidecar(extra_check: dict | None = None) -> ArtifactMeta:
        trt_rec = {**info, **({"self_check": extra_check} if extra_check else {})}
        pmeta = replace(meta, precision=precision, versions={**meta.versions, "tensorrt": info["version"]},
                        weights_digest=plan_weights_digest(plan),
                        extra={**meta.extra, "tensorrt": trt_rec, "built_from": Path(float_path).name})
        write_plan_sidecar(plan, pmeta, tensorrt_version=info["version"], gpu_name=info["gpu_name"],
                           compute_capability=info["compute_capability"], profile=dict(info["profile"]))
        return pmeta

    sidecar()
    bmin, _, bmax = parse_batches(batch)
    p_plan, p_one = run_plan(plan, images, bmin, bmax)
    tol = TOLERANCE[precision]
    rep = compare(p_plan, p_float, thr, tol, f"TensorRT {precision} plan vs float32 ONNX (batch {bmax})", [bmax],
                  flip_margin=tol)
    if p_one is not None:
        compare(p_one, p_float[:len(p_one)], thr, tol, "TensorRT plan at batch 1", [1], flip_margin=tol)
        rep.batches = [1, bmax]
    log(f"trt: plan vs float32 ONNX on {rep.n} AMi-Br training crops: max |delta p| {rep.max_abs_diff:.2g} "
        f"(tolerance {tol:g}), {rep.n_label_flips} label flip(s), all within {tol:g} of the threshold")
    sidecar({**rep.to_dict(), "reference": "the float32 ONNX model on ONNX Runtime (CPU)"})
