"""Checks every exported artefact must pass, and the real crops they run on.

* :func:`load_checked` - the file is a readable, valid ONNX model (clear errors for missing,
  empty, truncated or corrupt files, and for checker failures);
* :func:`validate_contract` - it is an *ami* artefact: one uint8 NHWC input ``pixels`` of the
  size its metadata names, with a dynamic batch axis, one float32 ``[N]`` output
  ``prob_atypical``, and readable :class:`~ami.runtime.artifact.ArtifactMeta` metadata;
* :func:`parity` - ONNX Runtime agrees with a reference (PyTorch, or the float model) on real
  AMi-Br training crops at batch 1 and batch N, within a tolerance and with identical labels.

Torch-free: crops are decoded with the runtime's own decoder and geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ami.runtime.artifact import INPUT_NAME, META_KEY, OUTPUT_NAME, ArtifactError, ArtifactMeta
from ami.runtime.datasets import DatasetError, DatasetMissing, Sample, amibr_split
from ami.runtime.imageio import ImageError
from ami.runtime.pixels import decode_pixels
from ami.runtime.preprocess import Preprocess

from .errors import CheckFailed, ExportError

# ---------------------------------------------------------------------------------------------
# real crops


def training_samples(data_root: Path) -> list[Sample]:
    """The 2894 AMi-Br training crops (never the test split)."""
    try:
        train, _ = amibr_split(Path(data_root))
    except (DatasetMissing, DatasetError) as e:
        raise ExportError(f"the self-checks run on real AMi-Br training crops, which are not usable: {e}") from None
    return train


def load_images(samples: list[Sample], pre: Preprocess, desc: str = "decoding crops") -> np.ndarray:
    """uint8 NHWC at the model's input size, exactly as ami-infer prepares them
    (:func:`ami.runtime.pixels.decode_pixels`); an undecodable crop is an ExportError."""
    from tqdm.auto import tqdm

    try:
        return decode_pixels([s.path for s in samples], pre,
                             progress=lambda it: tqdm(it, desc=desc, leave=False, disable=None, mininterval=1.0))
    except ImageError as e:
        raise ExportError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# ONNX files


def load_checked(path: Path, load_weights: bool = True):
    """onnx.load + onnx.checker with reasons a person can act on."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    if path.is_dir():
        raise ExportError(f"{path} is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise ExportError(f"{path} is empty (0 bytes): not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=load_weights)
    except DecodeError as e:
        raise ExportError(f"{path} is not a readable ONNX model: truncated or corrupt protobuf ({e})") from None
    except (OSError, ValueError) as e:  # missing external data file, bad UTF-8, ...
        raise ExportError(f"{path} cannot be loaded as ONNX: {e}") from None
    if not model.graph.node:
        raise ExportError(f"{path} holds no graph (0 nodes): truncated, corrupt or not an ONNX model")
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:  # onnx raises several types
        raise ExportError(f"{path} fails the ONNX checker: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return model


def _dims(value_info) -> list:
    t = value_info.type.tensor_type
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]


def read_meta(model) -> ArtifactMeta:
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise ExportError(f"not an ami artefact: metadata key {META_KEY!r} is missing (only ami-export output "
                          "describes itself; export the run again with ami-export)")
    try:
        return ArtifactMeta.from_json(props[META_KEY])
    except (ArtifactError, TypeError, ValueError) as e:
        raise ExportError(f"ami metadata unreadable: {e}") from None


def set_meta(model, meta: ArtifactMeta) -> None:
    for i in reversed(range(len(model.metadata_props))):
        if model.metadata_props[i].key == META_KEY:
            del model.metadata_props[i]
    p = model.metadata_props.add()
    p.key, p.value = META_KEY, meta.to_json()


def validate_contract(path: Path, model=None) -> ArtifactMeta:
    """Refuse anything that is not a well-formed ami artefact; returns its metadata."""
    import onnx

    path = Path(path)
    model = model if model is not None else load_checked(path, load_weights=False)
    meta = read_meta(model)
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    outputs = list(model.graph.output)
    s = meta.preprocess.input_size
    want_in = f"one input '{INPUT_NAME}' uint8 [N,{s},{s},3] (NHWC RGB)"
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise ExportError(f"{path.name}: wrong inputs {[i.name for i in inputs]}; an ami model has {want_in}")
    x = inputs[0]
    dt = onnx.TensorProto.DataType.Name(x.type.tensor_type.elem_type)
    d = _dims(x)
    if dt != "UINT8" or len(d) != 4 or d[1:] != [s, s, 3]:
        raise ExportError(f"{path.name}: input '{INPUT_NAME}' is {dt.lower()} {d}; an ami model has {want_in} "
                          f"(input size {s} from its metadata)")
    if isinstance(d[0], int):
        raise ExportError(f"{path.name}: the batch axis of '{INPUT_NAME}' is fixed at {d[0]}; ami models have a "
                          "dynamic batch axis (export again)")
    if len(outputs) != 1 or outputs[0].name != OUTPUT_NAME:
        raise ExportError(f"{path.name}: wrong outputs {[o.name for o in outputs]}; an ami model has one output "
                          f"'{OUTPUT_NAME}' float32 [N]")
    y = outputs[0]
    dt = onnx.TensorProto.DataType.Name(y.type.tensor_type.elem_type)
    dy = _dims(y)
    if dt != "FLOAT" or len(dy) != 1:
        raise ExportError(f"{path.name}: output '{OUTPUT_NAME}' is {dt.lower()} {dy}; an ami model outputs "
                          "float32 [N] (one atypical probability per crop)")
    return meta


# ---------------------------------------------------------------------------------------------
# ONNX Runtime


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ExportError(f"ONNX Runtime cannot load {Path(path).name}: {str(e).splitlines()[0]}") from None


def ort_predict(sess, images: np.ndarray, batch: int = 16, desc: str | None = None) -> np.ndarray:
    from tqdm.auto import tqdm

    out = []
    steps = range(0, len(images), batch)
    for i in tqdm(steps, desc=desc, leave=False, disable=None if desc else True, mininterval=1.0):
        p = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images[i:i + batch])})[0]
        if p.shape != (min(batch, len(images) - i),):
            raise CheckFailed(f"the model returned shape {tuple(p.shape)} for a batch of "
                              f"{min(batch, len(images) - i)} crops; expected [N]")
        out.append(p)
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


@dataclass
class ParityReport:
    n: int
    batches: list
    max_abs_diff: float
    mean_abs_diff: float
    labels_identical: bool
    n_label_flips: int
    tolerance: float
    threshold: float

    def to_dict(self) -> dict:
        return {"n_crops": self.n, "batch_sizes": self.batches, "max_abs_diff": self.max_abs_diff,
                "mean_abs_diff": self.mean_abs_diff, "labels_identical": self.labels_identical,
                "tolerance": self.tolerance, "threshold": self.threshold}


def compare(p: np.ndarray, ref: np.ndarray, threshold: float, tol: float, what: str, batches: list,
            flip_margin: float = 0.0) -> ParityReport:
    """Probabilities within ``tol`` and identical labels at ``threshold``, else CheckFailed.

    ``flip_margin`` > 0 (reduced precision only) tolerates label flips of crops whose reference
    probability lies within that distance of the threshold; they are counted and reported."""
    p, ref = np.asarray(p, np.float64), np.asarray(ref, np.float64)
    if p.shape != ref.shape:
        raise CheckFailed(f"{what}: {p.shape[0]} probabilities for {ref.shape[0]} crops")
    if not np.isfinite(p).all():
        raise CheckFailed(f"{what}: the model returns NaN or infinite probabilities")
    diff = np.abs(p - ref)
    flip = (p >= threshold) != (ref >= threshold)
    flips = int(flip.sum())
    hard = int(np.sum(flip & (np.abs(ref - threshold) > flip_margin)))
    rep = ParityReport(int(p.size), batches, float(diff.max()), float(diff.mean()), flips == 0, flips, tol, threshold)
    if rep.max_abs_diff > tol or hard:
        worst = int(diff.argmax())
        raise CheckFailed(f"{what}: max |delta probability| {rep.max_abs_diff:.3g} (tolerance {tol:g}; worst crop "
                          f"#{worst}: {p[worst]:.6f} vs {ref[worst]:.6f}), {flips} of {p.size} labels differ at "
                          f"threshold {threshold:g}; refusing to write the artefact")
    return rep


def parity(path: Path, images: np.ndarray, ref: np.ndarray, threshold: float, tol: float = 1e-4,
           batch: int = 16, n_single: int = 4, threads: int = 0, what: str = "ONNX Runtime vs PyTorch") -> ParityReport:
    """ONNX Runtime on ``images`` at batch ``batch`` (all crops) and batch 1 (the first few) vs ``ref``."""
    sess = session(path, threads)
    p_n = ort_predict(sess, images, batch)
    rep = compare(p_n, ref, threshold, tol, f"{what} (batch {batch})", [batch])
    k = min(n_single, len(images))
    p_1 = ort_predict(sess, images[:k], 1)
    compare(p_1, ref[:k], threshold, tol, f"{what} (batch 1)", [1])
    rep.batches = [1, min(batch, len(images))]
    return rep
