"""int8 keeps shape arithmetic (run-time 'same' padding of timm's tf_* models) in float."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ami.export.quantize import count_float_shape_math, excluded_nodes, shape_arithmetic_nodes


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _tf_same_pad_graph():
    """x -> Pad(amount computed from Shape(x) in float, Cast to int64) -> Conv -> Relu: the pattern of
    timm's Conv2dSame as the TorchScript exporter writes it."""
    inits = [_const("two", 2.0), _const("one", 1.0), _const("idx", 2, np.int64), _const("w", np.ones((2, 3, 3, 3)))]
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="/folds.0/net/conv_stem/Shape"),
        helper.make_node("Gather", ["s", "idx"], ["h"], name="/folds.0/net/conv_stem/Gather", axis=0),
        helper.make_node("Cast", ["h"], ["hf"], name="/folds.0/net/conv_stem/Cast", to=TensorProto.FLOAT),
        helper.make_node("Div", ["hf", "two"], ["d"], name="/folds.0/net/conv_stem/Div"),
        helper.make_node("Ceil", ["d"], ["ce"], name="/folds.0/net/conv_stem/Ceil"),
        helper.make_node("Sub", ["ce", "one"], ["p"], name="/folds.0/net/conv_stem/Sub"),
        helper.make_node("Cast", ["p"], ["pi"], name="/folds.0/net/conv_stem/Cast_1", to=TensorProto.INT64),
        helper.make_node("Concat", ["pi", "pi", "pi", "pi", "pi", "pi", "pi", "pi"], ["pads"],
                         name="/folds.0/net/conv_stem/Concat", axis=0),
        helper.make_node("Pad", ["x", "pads"], ["xp"], name="/folds.0/net/conv_stem/Pad"),
        helper.make_node("Conv", ["xp", "w"], ["y"], name="/folds.0/net/conv_stem/Conv"),
        helper.make_node("Relu", ["y"], ["z"], name="/folds.0/net/act/Relu"),
        helper.make_node("Add", ["z", "z"], ["out"], name="/folds.0/net/Add"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g)


def test_shape_arithmetic_is_found_and_kept_float():
    m = _tf_same_pad_graph()
    shape = shape_arithmetic_nodes(m)
    suffixes = sorted(n.rsplit("/", 1)[1] for n in shape)
    assert suffixes == ["Cast", "Cast_1", "Ceil", "Concat", "Div", "Gather", "Shape", "Sub"]
    # the image path (Pad of x, the convolution, its activation, the residual Add) stays quantisable
    excl, n_net = excluded_nodes(m, heads=[])
    assert set(shape) <= set(excl)
    assert not {"/folds.0/net/conv_stem/Pad", "/folds.0/net/conv_stem/Conv", "/folds.0/net/act/Relu",
                "/folds.0/net/Add"} & set(excl)
    assert n_net == len(m.graph.node)
    assert count_float_shape_math(m) == 3  # Div, Ceil, Sub


def test_a_static_graph_has_no_shape_arithmetic():
    from pathlib import Path

    edge = Path(__file__).resolve().parents[1] / "runtime" / "assets" / "edge.onnx"
    m = onnx.load(str(edge))
    # the shipped edge model's only shape nodes are integer reshapes of the output: nothing to damage
    assert count_float_shape_math(m) == 0
    assert all(n.op_type in ("Shape", "Gather", "Unsqueeze", "Concat", "Constant", "Cast")
               for n in m.graph.node if n.name in set(shape_arithmetic_nodes(m)))


def test_quantising_an_onnx_file_needs_no_torch():
    """int8 and TensorRT steps start from an ONNX file: an export box without torch can run them."""
    import subprocess
    import sys

    code = ("import sys; import ami.export.quantize, ami.export.tensorrt; "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr or "importing ami.export.quantize / tensorrt imported torch"
