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
from ami.runtime.sampling import stratified_subset
from ami.runtime.splits import FOLDS_FILE, folds_sha256, load_folds
from ami.runtime.tolerances import REDUCED_AUROC_TOL, REDUCED_BA_TOL

from .checks import compare, load_images, ort_predict, session, training_samples, validate_contract
from .errors import ExportError, Int8Rejected
from .node_scopes import is_io_node, is_network_node
from .onnx_file import write_model
from .options import CALIB_CROPS, Int8Options

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_PER_CHANNEL = {"auto": [True, False], True: [True], False: [False], "on": [True], "off": [False]}


def int8_verdict(float_m: dict, int8_m: dict, ba_tol: float = REDUCED_BA_TOL,
                 auroc_tol: float = REDUCED_AUROC_TOL) -> tuple[bool, str]:
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
    calib = stratified_subset(calib_pool or eval_pool, n_calib, seed=seed + 1)
    taken = {s.name for s in calib}
    rest = [s for s in eval_pool if s.name not in taken]
    ev = stratified_subset(rest, eval_cap, seed=seed + 2)
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


def shape_arithmetic_nodes(model) -> list[str]:
    """Nodes that compute on tensor *shapes*, not on the image: everything downstream of a Shape
    (or Size) node that no graph input reaches by another way.

    TF-"same" convolutions (timm's ``tf_*`` models) pad by an amount computed at run time:
    Shape -> Gather -> Cast -> Div -> Ceil -> Sub/Mul/Add -> Cast -> Pad. Quantising those float
    scalars (the quantiser treats Add/Mul like activations) moves a pad of 1 to 0.99998, which the
    Cast to int64 truncates to 0: every feature map after that convolution shifts by a pixel. On
    the ImageNet EfficientNet-Lite0 this made the int8 model useless (mean |delta p| 0.11); such
    nodes are kept float, where they are exact.
    """
    data = {i.name for i in model.graph.input}
    out = []
    for n in model.graph.node:  # ONNX graphs are topologically sorted
        if n.op_type not in ("Shape", "Size") and any(i in data for i in n.input):
            data.update(n.output)
        else:
            out.append(n.name)
    return out


_ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Ceil", "Floor", "Clip", "Max", "Min"}


def count_float_shape_math(model) -> int:
    """How many shape-arithmetic nodes do arithmetic (what quantising would have damaged)."""
    shape = set(shape_arithmetic_nodes(model))
    return sum(1 for n in model.graph.node if n.name in shape and n.op_type in _ARITHMETIC)


def calibration_reader(images: np.ndarray, batch: int = 16):
    """A fresh ``CalibrationDataReader`` over ``images`` (ONNX Runtime's base class, imported late)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.r = _Reader(images, batch)

        def get_next(self):
            return self.r.get_next()

    return Reader()


def float_heads(meta: ArtifactMeta, name: str, log=print) -> list[str]:
    """Module names of the classifier head, which the int8 graph keeps float32: the artefact's own
    record (``head_modules``). An artefact exported before ami recorded it gets the linear/LoRA
    head and the timm head of today's registry entry of its model name, as ami-export always did,
    and the log says so; without such an entry only the linear/LoRA head is kept float."""
    if meta.head_modules:
        return list(meta.head_modules)
    try:
        from ami.train.adapt import HEAD
        from ami.train.registry import get
    except ImportError as e:
        raise ExportError(f"{name} does not record its classifier head (exported before ami-export recorded it), "
                          f"and the model registry to look it up in is not installed ({e}); export the run again "
                          "with this ami-export") from None
    try:
        heads = [HEAD, get(meta.model).head]
    except KeyError:
        log(f"int8: {name} does not record its classifier head and the registry has no entry {meta.model!r}: only "
            f"'{HEAD}' (a linear/LoRA head) stays float32; export the run again to record its head")
        return [HEAD]
    log(f"int8: {name} does not record its classifier head (exported before ami-export recorded it); keeping "
        f"float32 {', '.join(heads)} from today's registry entry {meta.model!r}")
    return heads


def excluded_nodes(model, heads: list[str]) -> tuple[list[str], int]:
    """(nodes to keep float: pre/post-processing, the classifier head and shape arithmetic, n network nodes)."""
    names = [n.name for n in model.graph.node]
    n_net = sum(is_network_node(n) for n in names)
    tags = [f"/{h.replace('.', '/')}/" for h in heads]  # module a.b -> ONNX node scope /a/b/
    excl = [n for n in names if is_io_node(n) or (is_network_node(n) and any(t in n for t in tags))]
    kept = set(excl)
    excl += [n for n in shape_arithmetic_nodes(model) if n not in kept]
    return excl, n_net


def _has_external_data(model) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in model.graph.initializer)


def _check_options(meta: ArtifactMeta, opts: Int8Options) -> tuple[object, list[bool]]:
    """(ONNX Runtime activation type, per-channel variants to try); ExportError for a bad option."""
    from onnxruntime.quantization import QuantType

    if meta.precision != "fp32":
        raise ExportError(f"int8 is made from a float32 model; this one is {meta.precision}")
    if opts.calibration not in _METHODS:
        raise ExportError(f"calibration method must be one of {', '.join(_METHODS)}, got {opts.calibration!r}")
    if opts.activations not in ("s8", "u8"):
        raise ExportError("activations must be s8 (int8, ONNX Runtime's default) or u8 (uint8), "
                          f"got {opts.activations!r}")
    pcs = _PER_CHANNEL.get(opts.per_channel)
    if pcs is None:
        raise ExportError(f"per_channel must be auto, on or off, got {opts.per_channel!r}")
    return (QuantType.QInt8 if opts.activations == "s8" else QuantType.QUInt8), pcs


def _pre_process(float_path: Path, work: Path, big: bool, log) -> Path:
    """ONNX Runtime's quantisation pre-processing (shape inference, graph optimisation) of the float
    model; the float model itself when it fails (pre-processing is an optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prep = work / "prep.onnx"
    ext = dict(save_as_external_data=True, all_tensors_to_one_file=True, external_data_location="prep.onnx.data") if big else {}
    try:
        quant_pre_process(str(float_path), str(prep), **ext)
    except Exception as e:  # pre-processing is an optimisation; quantise the model as it is
        log(f"int8: ONNX Runtime's quantisation pre-processing failed ({str(e).splitlines()[0][:200]}); "
            "quantising the exported graph directly")
        return Path(float_path)
    return prep


def _float_nodes(prep: Path, meta: ArtifactMeta, float_path: Path, log) -> tuple[list[str], int]:
    """(the nodes of the graph to quantise that stay float32 - pre/post-processing, classifier head,
    shape arithmetic -, how many of them are shape arithmetic doing float math)."""
    import onnx

    model = onnx.load(str(prep), load_external_data=False)
    excl, n_net = excluded_nodes(model, float_heads(meta, Path(float_path).name, log))
    if n_net == 0:
        raise ExportError(f"{Path(float_path).name}: no network nodes named '/folds.K/...': the int8 step needs a graph "
                          "exported by ami-export (export the run again)")
    return excl, count_float_shape_math(model)


def _quantize_variants(prep: Path, work: Path, cal_img: np.ndarray, p_cal_f: np.ndarray, *, excl: list[str],
                       act_type, pcs: list[bool], method: str, big: bool, threads: int, batch: int, log,
                       reduce_range: bool = False) -> dict:
    """One QDQ model per per-channel choice in ``pcs``: {per_channel: {path, calibration-crop distance to float}}."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cache = work / "calibration.json"
    variants = {}
    for pc in pcs:
        qpath = work / f"int8-{'pc' if pc else 'pt'}.onnx"
        t0 = time.time()
        try:
            quantize_static(str(prep), str(qpath), calibration_reader(cal_img, batch), quant_format=QuantFormat.QDQ,
                            per_channel=pc, activation_type=act_type, weight_type=QuantType.QInt8,
                            nodes_to_exclude=excl, calibrate_method=getattr(CalibrationMethod, _METHODS[method]),
                            use_external_data_format=big, calibration_cache_path=str(cache),
                            reduce_range=reduce_range)
        except Exception as e:  # BLE001
            raise ExportError(f"ONNX Runtime quantisation failed: {str(e).splitlines()[0][:300]}") from None
        p_cal_q = ort_predict(session(qpath, threads), cal_img, batch)
        variants[pc] = {"path": qpath, "calib_mean_abs_diff": float(np.mean(np.abs(p_cal_q - p_cal_f))),
                        "calib_max_abs_diff": float(np.max(np.abs(p_cal_q - p_cal_f))), "seconds": round(time.time() - t0, 1)}
        log(f"int8: per-{'channel' if pc else 'tensor'} weights: mean |delta p| vs float on the calibration crops "
            f"{variants[pc]['calib_mean_abs_diff']:.4g}")
    return variants


def _accept(fsess, qsess, ev_img: np.ndarray, ev: list, meta: ArtifactMeta, opts: Int8Options, eval_set: str,
            batch: int, log) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """The acceptance test on the held-apart crops: (float metrics, int8 metrics, p_float, p_int8),
    or Int8Rejected; then the int8 graph's batch invariance (batch 1 vs batch N)."""
    p_f = ort_predict(fsess, ev_img, batch, "float model")
    p_q = ort_predict(qsess, ev_img, batch, "int8 model")
    y = np.asarray([s.label for s in ev])
    try:
        mf = evaluate(y, p_f, meta.threshold).to_dict()
        mq = evaluate(y, p_q, meta.threshold).to_dict()
    except MetricError as e:
        raise ExportError(f"int8 acceptance needs both classes among the evaluation crops: {e}") from None
    ok, msg = int8_verdict(mf, mq, opts.ba_tol, opts.auroc_tol)
    msg += f" on {len(ev)} {eval_set}"
    if not ok:
        raise Int8Rejected(f"int8 model REFUSED: {msg}. Nothing was written. Try more calibration crops "
                           "(--calib-crops), another --calibration method, or ship the float model.")
    log(f"int8: accepted: {msg}")
    k = min(4, len(ev_img))
    compare(ort_predict(qsess, ev_img[:k], 1), p_q[:k], meta.threshold, 1e-4, "int8 model, batch 1 vs batch N", [1, batch])
    return mf, mq, p_f, p_q


def _calibration_record(desc: dict, opts: Int8Options, pcs: list[bool], variants: dict, pc: bool, mf: dict,
                        mq: dict, p_f: np.ndarray, p_q: np.ndarray, shape_math: int = 0) -> dict:
    """The ``calibration`` metadata of the int8 artefact: crops, format, choices, acceptance."""
    return {**desc, "format": "QDQ (onnxruntime.quantization.quantize_static)",
            "activations": "int8 (S8S8)" if opts.activations == "s8" else "uint8 (U8S8)",
            "weights": "int8" + (" (7-bit range)" if opts.reduce_range else "") + ", "
                       + ("per-channel" if pc else "per-tensor"),
            "calibrate_method": _METHODS[opts.calibration],
            "per_channel_choice": ("auto: the variant closer to float on the calibration crops"
                                   if len(pcs) > 1 else "user"),
            "variants": {("per-channel" if k else "per-tensor"): {kk: vv for kk, vv in v.items() if kk != "path"}
                         for k, v in variants.items()},
            "kept_float": "preprocessing, classifier head, sigmoid, fold mean" + (
                f", shape arithmetic ({shape_math} nodes: run-time padding)" if shape_math else ""),
            "acceptance": {"float": {k: mf[k] for k in ("balanced_accuracy", "auroc", "n", "n_atypical", "threshold")},
                           "int8": {k: mq[k] for k in ("balanced_accuracy", "auroc")},
                           "ba_tolerance": opts.ba_tol, "auroc_tolerance": opts.auroc_tol, "accepted": True,
                           "max_abs_diff_probability": float(np.max(np.abs(p_q - p_f)))}}


def _write_int8(qpath: Path, out_path: Path, meta: ArtifactMeta, float_path: Path, calibration: dict) -> ArtifactMeta:
    import onnx
    import onnxruntime

    qmeta = replace(meta, precision="int8", calibration=calibration,
                    versions={**meta.versions, "onnxruntime_quantization": onnxruntime.__version__},
                    extra={**meta.extra, "int8_from": {"precision": meta.precision, "file": Path(float_path).name}})
    write_model(onnx.load(str(qpath)), out_path, qmeta, doc=f"{meta.display} - int8 (QDQ)")
    validate_contract(out_path)
    return qmeta


def _log_speed(float_path: Path, out_path: Path, batch: int, threads: int, log) -> None:
    sp = measure_speed(float_path, out_path, batch=batch, threads=threads or 1)
    log(f"int8: CPU speed at batch {sp['batch']} ({sp['threads']} thread(s), median of {sp['rounds']}): "
        f"fp32 {sp['fp32']['crops_per_cpu_s']:.0f}, int8 {sp['int8']['crops_per_cpu_s']:.0f} crops per CPU-second "
        f"(x{sp['int8_speedup_cpu']:.2f}); wall clock fp32 {sp['fp32']['crops_per_s']:.0f}, int8 "
        f"{sp['int8']['crops_per_s']:.0f} crops/s (x{sp['int8_speedup_wall']:.2f})")


def quantize_int8(float_path: Path, out_path: Path, meta: ArtifactMeta, data_root: Path, work: Path,
                  opts: Int8Options | None = None, *, threads: int = 0, batch: int = 16, log=print) -> ArtifactMeta:
    """Quantise ``float_path`` (a checked ami float model) into ``out_path``; returns its metadata.

    ``work`` is a scratch folder; ``opts`` defaults to ``Int8Options()``. Raises Int8Rejected when
    the acceptance test fails.
    """
    opts = opts or Int8Options()
    import onnx

    act_type, pcs = _check_options(meta, opts)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    big = _has_external_data(onnx.load(str(float_path), load_external_data=False))

    calib, ev, desc = split_crops(data_root, meta, opts.calib_crops, opts.eval_crops)
    log(f"int8: {len(calib)} calibration crops, {len(ev)} evaluation crops ({desc['evaluation_set']})")
    cal_img = load_images(calib, meta.preprocess, "calibration crops")
    ev_img = load_images(ev, meta.preprocess, "evaluation crops")

    prep = _pre_process(float_path, work, big, log)
    excl, shape_math = _float_nodes(prep, meta, float_path, log)
    fsess = session(float_path, threads)
    variants = _quantize_variants(prep, work, cal_img, ort_predict(fsess, cal_img, batch), excl=excl,
                                  act_type=act_type, pcs=pcs, method=opts.calibration, big=big, threads=threads,
                                  batch=batch, log=log, reduce_range=opts.reduce_range)
    pc = min(variants, key=lambda k: variants[k]["calib_mean_abs_diff"])
    qpath = variants[pc]["path"]
    mf, mq, p_f, p_q = _accept(fsess, session(qpath, threads), ev_img, ev, meta, opts, desc["evaluation_set"],
                               batch, log)
    calibration = _calibration_record(desc, opts, pcs, variants, pc, mf, mq, p_f, p_q, shape_math)
    qmeta = _write_int8(qpath, out_path, meta, float_path, calibration)
    if opts.speed_batch:
        _log_speed(float_path, out_path, opts.speed_batch, threads, log)
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
