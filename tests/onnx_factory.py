"""Tiny, valid ami ONNX artefacts built with onnx.helper, so runtime tests need no trained model.

The graph honours the artefact contract (``pixels`` uint8 NHWC -> ``prob_atypical`` float32 [N]) and
does the same photometric arithmetic as an exported model (cast, /255, (x-mean)/std, NHWC->NCHW),
then a fixed per-channel weighting, a global mean and a sigmoid. :func:`reference_probs` computes
the same numbers in numpy, so a test can check every probability a runner writes.

Variants with a defect (wrong dtype / size / names, no or broken metadata) exercise the refusals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ami.runtime.artifact import INPUT_NAME, META_KEY, OUTPUT_NAME, ArtifactMeta
from ami.runtime.preprocess import Preprocess

# Per-channel weights, scale and bias: chosen so H&E crops spread around 0.5.
WEIGHTS = (1.5, -1.0, -0.5)
SCALE, BIAS = 3.0, 0.2
TINY_PRE = Preprocess(input_size=128, resize=None, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def float_tensor(name: str, arr) -> onnx.TensorProto:
    """A float32 initializer holding ``arr`` (any array-like), shape kept."""
    a = np.asarray(arr, dtype=np.float32)
    return helper.make_tensor(name, TensorProto.FLOAT, a.shape, a.ravel().tolist())


def tiny_meta(pre: Preprocess = TINY_PRE, threshold: float = 0.5, **kw) -> ArtifactMeta:
    return ArtifactMeta(model="tiny-test", method="full", preprocess=pre, threshold=threshold,
                        threshold_rule="default 0.5", precision="fp32", display="tiny test model",
                        folds=["all"], **kw)


def reference_probs(batch_uint8_nhwc: np.ndarray, pre: Preprocess = TINY_PRE) -> np.ndarray:
    x = pre.normalize(batch_uint8_nhwc)  # NCHW float32, the graph's arithmetic
    x = x * np.asarray(WEIGHTS, np.float32)[None, :, None, None]
    z = x.mean(axis=(1, 2, 3)) * np.float32(SCALE) + np.float32(BIAS)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def build_model(pre: Preprocess = TINY_PRE, *, meta: ArtifactMeta | str | None = "default",
                input_dtype: int = TensorProto.UINT8, graph_size: int | None = None,
                input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME, output_rank: int = 1,
                opset: int = 17) -> onnx.ModelProto:
    s = graph_size or pre.input_size
    c = float_tensor
    inits = [
        c("inv255", [np.float32(1 / 255)]),
        c("mean", np.asarray(pre.mean, np.float32).reshape(1, 1, 1, 3)),
        c("std", np.asarray(pre.std, np.float32).reshape(1, 1, 1, 3)),
        c("w", np.asarray(WEIGHTS, np.float32).reshape(1, 3, 1, 1)),
        c("scale", [np.float32(SCALE)]),
        c("bias", [np.float32(BIAS)]),
    ]
    nodes = [
        helper.make_node("Cast", [input_name], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "inv255"], ["x01"]),
        helper.make_node("Sub", ["x01", "mean"], ["xc"]),
        helper.make_node("Div", ["xc", "std"], ["xn"]),
        helper.make_node("Transpose", ["xn"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["nchw", "w"], ["xw"]),
        helper.make_node("ReduceMean", ["xw"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["m", "scale"], ["ms"]),
        helper.make_node("Add", ["ms", "bias"], ["z"]),
    ]
    if output_rank == 1:
        nodes.append(helper.make_node("Sigmoid", ["z"], [output_name]))
        out_shape = ["N"]
    else:
        nodes += [helper.make_node("Sigmoid", ["z"], ["p"]),
                  helper.make_node("Unsqueeze", ["p", "ax1"], [output_name])]
        inits.append(helper.make_tensor("ax1", TensorProto.INT64, [1], [1]))
        out_shape = ["N", 1]
    graph = helper.make_graph(
        nodes, "ami_tiny",
        [helper.make_tensor_value_info(input_name, input_dtype, ["N", s, s, 3])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_shape)],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ami-tests")
    model.ir_version = 8
    if meta == "default":
        meta = tiny_meta(pre)
    if isinstance(meta, ArtifactMeta):
        helper.set_model_props(model, {META_KEY: meta.to_json()})
    elif isinstance(meta, str):
        helper.set_model_props(model, {META_KEY: meta})
    onnx.checker.check_model(model)
    return model


def write_model(path: str | Path, **kw) -> Path:
    path = Path(path)
    onnx.save_model(build_model(**kw), str(path))
    return path


def build_conv_model(pre: Preprocess = TINY_PRE, widths=(32, 64, 128, 256), seed: int = 0) -> onnx.ModelProto:
    """A small random CNN (stride-2 3x3 convs + ReLU, global pool, linear, sigmoid) with the ami
    contract: ~120 MFLOPs per 128 px crop, about what a compact edge CNN costs. For timing the
    pipeline with an engine that does real work; its outputs mean nothing."""
    rng = np.random.default_rng(seed)
    s = pre.input_size
    t = float_tensor
    inits = [t("inv255", np.array([1 / 255])), t("mean", np.asarray(pre.mean).reshape(1, 1, 1, 3)),
             t("std", np.asarray(pre.std).reshape(1, 1, 1, 3))]
    nodes = [helper.make_node("Cast", [INPUT_NAME], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xf", "inv255"], ["x01"]), helper.make_node("Sub", ["x01", "mean"], ["xc"]),
             helper.make_node("Div", ["xc", "std"], ["xn"]),
             helper.make_node("Transpose", ["xn"], ["h0"], perm=[0, 3, 1, 2])]
    cin = 3
    for i, cout in enumerate(widths):
        w = rng.normal(0, (2 / (9 * cin)) ** 0.5, (cout, cin, 3, 3))
        inits += [t(f"w{i}", w), t(f"b{i}", np.zeros(cout))]
        nodes += [helper.make_node("Conv", [f"h{i}", f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3],
                                   strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"h{i + 1}"])]
        cin = cout
    k = len(widths)
    inits += [t("fw", rng.normal(0, 0.05, (cin, 1))), t("fb", np.zeros(1)), helper.make_tensor("sq", TensorProto.INT64, [1], [1])]
    nodes += [helper.make_node("GlobalAveragePool", [f"h{k}"], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fw", "fb"], ["z"]),
              helper.make_node("Squeeze", ["z", "sq"], ["z1"]), helper.make_node("Sigmoid", ["z1"], [OUTPUT_NAME])]
    graph = helper.make_graph(nodes, "ami_conv", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", s, s, 3])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N"])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ami-tests")
    model.ir_version = 8
    helper.set_model_props(model, {META_KEY: tiny_meta(pre).to_json()})
    onnx.checker.check_model(model)
    return model
