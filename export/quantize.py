"""int8 for CPU edges: ONNX Runtime static QDQ quantisation, accepted on the task metric.

* Calibration: a few hundred AMi-Br *training* crops (never test crops), through the float
  graph itself (uint8 pixels in: the preprocessing runs as in deployment).
* Only the networks are quantised: preprocessing, the classifier head, sigmoid and the fold
  mean stay float32 (``nodes_to_exclude``), so uint8 in / probability out keeps working.
* Activations int8 (S8S8, ONNX Runtime's recommended default, the same on every CPU) or, with
  ``activations="u8"``, uint8 (U8S8: faster on x86-64 with VNNI; on AVX2-only CPUs ONNX Runtime's
  U8S8 kernels may saturate, so accept such a model on the CPU family it will run on).
* Per-channel weight scales "where they help": with ``per_channel="auto"`` both per-channel and
  per-tensor models are made and the one closer to the float model *on the calibration crops*
  is kept.
* Acceptance: balanced accuracy (at the artefact's threshold) and AUROC of the int8 model stay
  within ``ba_tol`` / ``auroc_tol`` of the float model on training crops held apart from the
  calibration crops (for a fold model: its validation fold). Otherwise :class:`Int8Rejected`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ami.runtime.artifact import INPUT_NAME, ArtifactMeta
from ami.runtime.metrics import MetricError, evaluate
from ami.runtime.splits import FOLDS_FILE, folds_sha256, load_folds

from . import ExportError
from .checks import (
    compare,
    load_images,
    ort_predict,
    session,
    stratified,
    training_samples,
    validate_contract,
)
from .ensemble import is_io_node, is_network_node

BA_TOL = 0.01
AUROC_TOL = 0.005
CALIB_CROPS = 300
_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


class Int8Rejected(ExportError):
    """The int8 model lost too much balanced accuracy or AUROC against the float model."""


def int8_verdict(float_m: dict, int8_m: dict, ba_tol: float = BA_TOL, auroc_tol: float = AUROC_TOL) -> tuple[bool, str]:
    """Accept iff |BA_int8 - BA_float| <= ba_tol and |AUROC_int8 - AUROC_float| <= auroc_tol."""
    d_ba = abs(int8_m["balanced_accuracy"] - float_m["balanced_accuracy"])
    d_au = abs(int8_m["auroc"] - float_m["auroc"])
    ok = d_ba <= ba_tol and d_au <= auroc_tol
    msg = (f"int8 vs float: balanced accuracy {int8_m['balanced_accuracy']:.4f} vs {float_m['balanced_accuracy']:.4f} "
           f"(|delta| {d_ba:.4f}, limit {ba_tol:g}), AUROC {int8_m['auroc']:.4f} vs {float_m['auroc']:.4f} "
           f"(|delta| {d_au:.4f}, limit {auroc_tol:g})")
    return ok, msg


def split_crops(data_root: Path, meta: ArtifactMeta, n_calib: int = CALIB_CROPS, eval_cap: int = 0,
                seed: int = 0) -> tuple[list, list, dict]:
    """(calibration samples, evaluation samples, description). Both are AMi-Br training crops,
    disjoint. A fold model is evaluated on its validation fold(s) and calibrated on the others;
    a model that saw every training crop (ensemble of all folds, all-crops model, unknown) is
    evaluated on the training crops not drawn for calibration."""
    train = training_samples(data_root)
    folds = [f for f in meta.folds if isinstance(f, int)]
    same_split = meta.source.get("folds_sha256") == folds_sha256(FOLDS_FILE)
    if folds and len(folds) == len(meta.folds) and same_split:
        fold_of = {r.image: r.fold for r in load_folds(FOLDS_FILE)}
        eval_pool = [s for s in train if fold_of[s.name] in folds]
        calib_pool = [s for s in train if fold_of[s.name] not in folds]
        eval_desc = f"validation crops of fold(s) {','.join(map(str, folds))} (the exported models' validation folds)"
    else:
        eval_pool, calib_pool = train, []
        eval_desc = "AMi-Br training crops not drawn for calibration"
        if folds and not same_split:
            eval_desc += " (the model's folds file differs from the installed one, so its validation folds are unknown)"
    calib = stratified(calib_pool or eval_pool, n_calib, seed=seed + 1)
    taken = {s.name for s in calib}
    rest = [s for s in eval_pool if s.name not in taken]
    ev = stratified(rest, eval_cap, seed=seed + 2)
    if eval_cap and len(ev) < len(rest):
        eval_desc += f", stratified subset of {len(ev)}"
    desc = {
        "calibration_set": "AMi-Br training crops (amibr_train_split.csv); never test crops",
        "calibration_n": len(calib),
        "calibration_drawn_from": ("training crops outside the evaluation folds" if calib_pool
                                   else "AMi-Br training crops, then removed from the evaluation set"),
        "calibration_selection": f"class-stratified, seed {seed + 1}",
        "calibration_names_sha256": hashlib.sha256("\n".join(sorted(taken)).encode()).hexdigest(),
        "evaluation_set": eval_desc,
        "evaluation_n": len(ev),
    }
    return calib, ev, desc


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over uint8 crops."""

    def __init__(self, images: np.ndarray, batch: int = 16):
        self.images, self.batch, self.i = images, batch, 0

    def get_next(self):
        if self.i >= len(self.images):
            return None
        x = self.images[self.i:self.i + self.batch]
        self.i += self.batch
        return {INPUT_NAME: np.ascontiguousarray(x)}

    def rewind(self):
        self.i = 0

    def __len__(self):
        return (len(self.images) + self.batch - 1) // self.batch


def excluded_nodes(model, head: str | None) -> tuple[list[str], int]:
    """(nodes to keep float: pre/post-processing and the classifier head, n network nodes)."""
    names = [n.name for n in model.graph.node]
    n_net = sum(is_network_node(n) for n in names)
    tags = ["/logit_head/"] + ([f"/{head.replace('.', '/')}/"] if head else [])  # linear/LoRA head, timm head
    excl = [n for n in names if is_io_node(n) or (is_network_node(n) and any(t in n for t in tags))]
    return excl, n_net


def _has_external_data(model) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in model.graph.initializer)


def quantize_int8(float_path: Path, out_path: Path, meta: ArtifactMeta, data_root: Path, work: Path, *,
                  calib_crops: int = CALIB_CROPS, eval_crops: int = 0, per_channel="auto", ba_tol: float = BA_TOL,
                  auroc_tol: float = AUROC_TOL, method: str = "minmax", activations: str = "s8", threads: int = 0,
                  batch: int = 16, speed_batch: int = 0, log=print) -> ArtifactMeta:
    """Quantise ``float_path`` (a checked ami float model) into ``out_path``; returns its metadata.

    ``work`` is a scratch folder. Raises Int8Rejected when the acceptance test fails.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if meta.precision != "fp32":
        raise ExportError(f"int8 is made from a float32 model; this one is {meta.precision}")
    if method not in _METHODS:
        raise ExportError(f"calibration method must be one of {', '.join(_METHODS)}, got {method!r}")
    if activations not in ("s8", "u8"):
        raise ExportError(f"activations must be s8 (int8, ONNX Runtime's default) or u8 (uint8), got {activations!r}")
    act_type = QuantType.QInt8 if activations == "s8" else QuantType.QUInt8
    pcs = {"auto": [True, False], True: [True], False: [False], "on": [True], "off": [False]}.get(per_channel)
    if pcs is None:
        raise ExportError(f"per_channel must be auto, on or off, got {per_channel!r}")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    fmodel = onnx.load(str(float_path), load_external_data=False)
    big = _has_external_data(fmodel)

    calib, ev, desc = split_crops(data_root, meta, calib_crops, eval_crops)
    log(f"int8: {len(calib)} calibration crops, {len(ev)} evaluation crops ({desc['evaluation_set']})")
    cal_img = load_images(calib, meta.preprocess, "calibration crops")
    ev_img = load_images(ev, meta.preprocess, "evaluation crops")

    prep = work / "prep.onnx"
    ext = dict(save_as_external_data=True, all_tensors_to_one_file=True, external_data_location="prep.onnx.data") if big else {}
    try:
        quant_pre_process(str(float_path), str(prep), **ext)
    except Exception as e:  # pre-processing is an optimisation; quantise the model as it is
        log(f"int8: ONNX Runtime's quantisation pre-processing failed ({str(e).splitlines()[0][:200]}); "
            "quantising the exported graph directly")
        prep = Path(float_path)
    pmodel = onnx.load(str(prep), load_external_data=False)
    try:
        from ami.train.registry import get

        head = get(meta.model).head
    except (KeyError, ImportError):
        head = None
    excl, n_net = excluded_nodes(pmodel, head)
    if n_net == 0:
        raise ExportError(f"{Path(float_path).name}: no network nodes named '/folds.K/...': the int8 step needs a graph "
                          "exported by ami-export (export the run again)")
    del pmodel, fmodel

    fsess = session(float_path, threads)
    p_cal_f = ort_predict(fsess, cal_img, batch)
    class Reader(CalibrationDataReader):  # the ORT base class, bound late
        def __init__(self):
            self.r = _Reader(cal_img, batch)

        def get_next(self):
            return self.r.get_next()

    cache = work / "calibration.json"
    variants = {}
    for pc in pcs:
        qpath = work / f"int8-{'pc' if pc else 'pt'}.onnx"
        t0 = time.time()
        try:
            quantize_static(str(prep), str(qpath), Reader(), quant_format=QuantFormat.QDQ, per_channel=pc,
                            activation_type=act_type, weight_type=QuantType.QInt8, nodes_to_exclude=excl,
                            calibrate_method=getattr(CalibrationMethod, _METHODS[method]),
                            use_external_data_format=big, calibration_cache_path=str(cache))
        except Exception as e:
            raise ExportError(f"ONNX Runtime quantisation failed: {str(e).splitlines()[0][:300]}") from None
        q = session(qpath, threads)
        p_cal_q = ort_predict(q, cal_img, batch)
        variants[pc] = {"path": qpath, "calib_mean_abs_diff": float(np.mean(np.abs(p_cal_q - p_cal_f))),
                        "calib_max_abs_diff": float(np.max(np.abs(p_cal_q - p_cal_f))), "seconds": round(time.time() - t0, 1)}
        log(f"int8: per-{'channel' if pc else 'tensor'} weights: mean |delta p| vs float on the calibration crops "
            f"{variants[pc]['calib_mean_abs_diff']:.4g}")
    pc = min(variants, key=lambda k: variants[k]["calib_mean_abs_diff"])
    qpath = variants[pc]["path"]

    # acceptance on held-apart crops
    qsess = session(qpath, threads)
    p_f = ort_predict(fsess, ev_img, batch, "float model")
    p_q = ort_predict(qsess, ev_img, batch, "int8 model")
    y = np.asarray([s.label for s in ev])
    try:
        mf = evaluate(y, p_f, meta.threshold).to_dict()
        mq = evaluate(y, p_q, meta.threshold).to_dict()
    except MetricError as e:
        raise ExportError(f"int8 acceptance needs both classes among the evaluation crops: {e}") from None
    ok, msg = int8_verdict(mf, mq, ba_tol, auroc_tol)
    msg += f" on {len(ev)} {desc['evaluation_set']}"
    if not ok:
        raise Int8Rejected(f"int8 model REFUSED: {msg}. Nothing was written. Try more calibration crops "
                           "(--calib-crops), another --calibration method, or ship the float model.")
    log(f"int8: accepted: {msg}")
    # batch invariance of the int8 graph (batch 1 vs batch N on the same crops)
    k = min(4, len(ev_img))
    compare(ort_predict(qsess, ev_img[:k], 1), p_q[:k], meta.threshold, 1e-4, "int8 model, batch 1 vs batch N", [1, batch])

    calibration = {**desc, "format": "QDQ (onnxruntime.quantization.quantize_static)",
                   "activations": "int8 (S8S8)" if activations == "s8" else "uint8 (U8S8)",
                   "weights": "int8, " + ("per-channel" if pc else "per-tensor"), "calibrate_method": _METHODS[method],
                   "per_channel_choice": ("auto: the variant closer to float on the calibration crops"
                                          if len(pcs) > 1 else "user"),
                   "variants": {("per-channel" if k else "per-tensor"): {kk: vv for kk, vv in v.items() if kk != "path"}
                                for k, v in variants.items()},
                   "kept_float": "preprocessing, classifier head, sigmoid, fold mean",
                   "acceptance": {"float": {k: mf[k] for k in ("balanced_accuracy", "auroc", "n", "n_atypical", "threshold")},
                                  "int8": {k: mq[k] for k in ("balanced_accuracy", "auroc")},
                                  "ba_tolerance": ba_tol, "auroc_tolerance": auroc_tol, "accepted": True,
                                  "max_abs_diff_probability": float(np.max(np.abs(p_q - p_f)))}}
    import onnxruntime

    qmeta = replace(meta, precision="int8", calibration=calibration,
                    versions={**meta.versions, "onnxruntime_quantization": onnxruntime.__version__},
                    extra={**meta.extra, "int8_from": {"precision": meta.precision, "file": Path(float_path).name}})
    from .onnx_export import write_model

    qmodel = onnx.load(str(qpath))
    write_model(qmodel, out_path, qmeta, doc=f"{meta.display} - int8 (QDQ)")
    validate_contract(out_path)
    if speed_batch:
        sp = measure_speed(float_path, out_path, batch=speed_batch, threads=threads or 1)
        log(f"int8: CPU speed at batch {sp['batch']} ({sp['threads']} thread(s), median of {sp['rounds']}): "
            f"fp32 {sp['fp32']['crops_per_cpu_s']:.0f}, int8 {sp['int8']['crops_per_cpu_s']:.0f} crops per CPU-second "
            f"(x{sp['int8_speedup_cpu']:.2f}); wall clock fp32 {sp['fp32']['crops_per_s']:.0f}, int8 "
            f"{sp['int8']['crops_per_s']:.0f} crops/s (x{sp['int8_speedup_wall']:.2f})")
    return qmeta


def measure_speed(float_path: Path, int8_path: Path, batch: int = 64, threads: int = 1, rounds: int = 10,
                  size: int | None = None) -> dict:
    """fp32 vs int8 on this CPU: median wall seconds and median process CPU seconds per batch (same
    random uint8 batch, same thread count). On a shared machine the CPU-time ratio is the number to
    trust; wall time also counts the time other processes held the cores."""
    if size is None:
        size = validate_contract(float_path).preprocess.input_size
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    out = {"batch": batch, "threads": threads, "rounds": rounds}
    for name, path in (("fp32", float_path), ("int8", int8_path)):
        s = session(path, threads)
        for _ in range(2):
            s.run(None, {INPUT_NAME: x})
        wall, cpu = [], []
        for _ in range(rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            s.run(None, {INPUT_NAME: x})
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        w, c = float(np.median(wall)), float(np.median(cpu))
        out[name] = {"median_wall_s": w, "median_cpu_s": c, "crops_per_s": batch / w, "crops_per_cpu_s": batch / c}
    out["int8_speedup_wall"] = out["fp32"]["median_wall_s"] / out["int8"]["median_wall_s"]
    out["int8_speedup_cpu"] = out["fp32"]["median_cpu_s"] / out["int8"]["median_cpu_s"]
    return out
