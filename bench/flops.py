"""FLOPs per crop of a model: counted on the PyTorch networks (``FlopCounterMode``) or from an ONNX
graph (Conv/Gemm/MatMul and their quantised forms); 2 x multiply-adds, batch 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ami.runtime.preprocess import Preprocess


def torch_flops_per_crop(models: list, pre: Preprocess, device=None) -> float | None:
    """FLOPs of one crop through the networks (FlopCounterMode: 2 x multiply-adds of conv/matmul)."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    s = pre.input_size
    dev = device or next(models[0].parameters()).device
    x = torch.zeros(1, 3, s, s, device=dev)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        for m in models:
            m(x)
    return float(fc.get_total_flops())


def _conv_flops(out_shape, w_shape) -> float | None:
    if out_shape is None or w_shape is None or len(out_shape) < 3:
        return None
    return 2.0 * float(np.prod(out_shape[1:])) * float(np.prod(w_shape[1:]))


# operand positions: the weight input of a convolution, the activation input of a matrix product
CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
MATMUL_ACTIVATION = {"MatMul": 0, "Gemm": 0, "MatMulInteger": 0, "QLinearMatMul": 0}


def _batch_of_one(dims) -> None:
    if dims:
        dims[0].ClearField("dim_param")
        dims[0].dim_value = 1


def _shapes_at_batch_one(m) -> dict[str, list | None] | None:
    """Every tensor's shape with the batch fixed to 1 (None: shape inference failed)."""
    from onnx import shape_inference

    g = m.graph
    inits = {i.name for i in g.initializer}
    for inp in g.input:
        if inp.name not in inits:
            _batch_of_one(inp.type.tensor_type.shape.dim)
    del g.value_info[:]
    for o in g.output:
        _batch_of_one(o.type.tensor_type.shape.dim)
    try:
        m = shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # BLE001
        return None
    shapes: dict[str, list | None] = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims] if dims else None
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _node_flops(node, shape) -> float | None:
    """FLOPs of one Conv/Gemm/MatMul node (``shape(name)``: a full shape or None); None: unknown."""
    if node.op_type in CONV_WEIGHT:
        return _conv_flops(shape(node.output[0]), shape(node.input[CONV_WEIGHT[node.op_type]]))
    a, y = shape(node.input[MATMUL_ACTIVATION[node.op_type]]), shape(node.output[0])
    if a is None or y is None:
        return None
    k = a[-1]
    if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
        k = a[0]
    return 2.0 * float(np.prod(y)) * float(k)


def onnx_flops_per_crop(path: str | Path) -> float | None:
    """FLOPs of one crop counted from an ONNX graph (Conv/Gemm/MatMul and their quantised forms,
    2 x multiply-adds, batch fixed to 1); None when onnx is missing or shapes cannot be inferred."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # BLE001
        return None
    shapes = _shapes_at_batch_one(m)
    if shapes is None:
        return None

    def shape(name):
        s = shapes.get(name)
        return None if s is None or any(d is None for d in s) else s

    flops = [_node_flops(node, shape) for node in m.graph.node
             if node.op_type in CONV_WEIGHT or node.op_type in MATMUL_ACTIVATION]
    if any(f is None for f in flops):
        return None
    return sum(flops, 0.0)
