"""TensorRT engines from a checked ami ONNX model (TensorRT 10.x and 11.x, Python API).

Precision comes from the graph, not from builder flags (TensorRT 11 removed BuilderFlag.FP16;
10.x deprecated it): for fp16 the network part of the ONNX graph is converted to float16
(:func:`fp16_graph`) while the I/O contract (uint8 pixels in, float32 probability out) and the
pre/post-processing stay float32; the network is then built strongly typed (implicit in 11,
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` in 10). fp32 builds also switch TF32 off.

The builder uses one optimisation profile (min/opt/max batch from ``--batch-size``), a persistent
timing cache, and writes ``X.plan`` plus ``X.plan.json``: the artefact metadata with the
TensorRT version, GPU name and compute capability the plan is tied to.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

from ami.runtime.artifact import INPUT_NAME, OUTPUT_NAME
from ami.runtime.atomic import atomic_write_bytes
from ami.runtime.engines.base import parse_batch_sizes
from ami.runtime.gpu import TRT_MAJORS, tensorrt_major
from ami.runtime.tolerances import FP32_PROB_TOL

from .errors import ExportError, TensorRTUnavailable
from .node_scopes import is_io_node

TOLERANCE = {"fp16": 1e-2, "fp32": FP32_PROB_TOL}  # max |delta p| of the plan vs the float32 ONNX model


def default_timing_cache(version: str = "", compute_capability: str = "") -> Path:
    """One cache per TensorRT version and GPU architecture (a cache only fits the one that made it)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    tag = f"-{version}-sm{compute_capability.replace('.', '')}" if version else ""
    return Path(base) / "ami" / f"tensorrt-timing{tag}.cache"


def _have_cudart() -> bool:
    for module in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6, older cuda-python
        try:
            importlib.import_module(module)
            return True
        except ImportError:
            continue
    return False


def _torch_gpu() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return {"gpu_name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}", "source": "torch.cuda"}
    except Exception:  # a broken CUDA install raises anything
        return None


def gpu_info() -> dict:
    """{'gpu_name', 'compute_capability', 'source'} of CUDA device 0 (the keys of
    :func:`ami.runtime.engines.tensorrt.gpu_info`, plus where they come from): cuda-python, else
    torch.cuda - also when cuda-python is installed but fails (a cuda-python 13 build on a CUDA 12
    driver), in which case 'cuda_python_error' says why. TensorRTUnavailable without a GPU."""
    cuda_error = ""
    if _have_cudart():
        from ami.runtime.engines import EngineError
        from ami.runtime.engines.tensorrt import gpu_info as rt_gpu_info

        try:
            return {**rt_gpu_info(0), "source": "cuda-python"}
        except EngineError as e:
            cuda_error = str(e)
    g = _torch_gpu()
    if g is not None:
        return {**g, **({"cuda_python_error": cuda_error} if cuda_error else {})}
    if cuda_error:
        raise TensorRTUnavailable(f"--engine trt needs a CUDA GPU: cuda-python found none ({cuda_error}) and "
                                  "neither did torch.cuda")
    raise TensorRTUnavailable("--engine trt needs a CUDA GPU, and none is visible on this machine "
                              "(neither cuda-python nor torch.cuda found a device). Build the plan on the GPU it "
                              "will run on.")


def require_tensorrt():
    """(tensorrt module, major version, gpu info), or TensorRTUnavailable with the reason."""
    try:
        import tensorrt as trt
    except ImportError as e:
        from ami.runtime.gpu import trt_install_hint

        raise TensorRTUnavailable(f"--engine trt needs TensorRT {' or '.join(map(str, TRT_MAJORS))} and a CUDA GPU; "
                                  f"the tensorrt Python package is not installed here ({e}). On a GPU machine: "
                                  f"{trt_install_hint()}, and onnxruntime-gpu instead of onnxruntime.") from None
    major = tensorrt_major(trt.__version__)
    if major not in TRT_MAJORS:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is installed; ami-export builds engines with TensorRT "
                                  f"{' or '.join(f'{m}.x' for m in TRT_MAJORS)}")
    return trt, major, gpu_info()


# ---------------------------------------------------------------------------------------------
# fp16 graph


def _cast_to(node) -> int | None:
    for a in node.attribute:
        if a.name == "to":
            return a.i
    return None


def _toposort(graph) -> None:
    avail = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                ordered.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ExportError(f"fp16 graph is not a DAG (unresolved inputs of {rest[0].name})")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _drop_roundtrips(graph, fp32_nodes: set[str]) -> int:
    """The converter casts fp32 outputs of blocked nodes to fp16 and back before the next blocked
    node; such fp32->fp16->fp32 pairs only lose precision. Replace the second cast by Identity of
    the original fp32 tensor and drop the first when nothing else reads it."""
    from onnx import TensorProto, helper

    producer = {o: n for n in graph.node for o in n.output}
    fp32_tensors = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    for n in graph.node:
        if n.name in fp32_nodes:
            fp32_tensors.update(n.output)
    fixed = 0
    new_nodes = []
    for n in graph.node:
        a = producer.get(n.input[0]) if n.op_type == "Cast" and n.input else None
        if (a is not None and _cast_to(n) == TensorProto.FLOAT and a.op_type == "Cast"
                and _cast_to(a) == TensorProto.FLOAT16 and a.input[0] in fp32_tensors):
            new_nodes.append(helper.make_node("Identity", [a.input[0]], list(n.output), name=n.name + "_roundtrip_removed"))
            fixed += 1
        else:
            new_nodes.append(n)
    used = {i for n in new_nodes for i in n.input} | {o.name for o in graph.output}
    new_nodes = [n for n in new_nodes if not (n.op_type == "Cast" and all(o not in used for o in n.output))]
    del graph.node[:]
    graph.node.extend(new_nodes)
    return fixed


def fp16_graph(model):
    """float32 ami graph -> float16 network part, float32 pre/post-processing and I/O.

    Uses onnxruntime.transformers.float16 (keep_io_types, the pre/post nodes blocked), then
    removes the converter's fp32->fp16->fp32 round trips and re-sorts the graph.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp32_nodes = {n.name for n in model.graph.node if is_io_node(n.name)}
    if len(fp32_nodes) == len(model.graph.node):
        raise ExportError("no network nodes ('/folds.K/...') in the graph: fp16 needs a graph exported by ami-export")
    m16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(fp32_nodes),
                                   disable_shape_infer=not _small(model))
    _drop_roundtrips(m16.graph, fp32_nodes)
    _toposort(m16.graph)
    return m16


def _small(model) -> bool:
    try:
        return model.ByteSize() < 2_000_000_000
    except Exception:  # protobuf refuses to size > 2 GB messages on some builds
        return False


# ---------------------------------------------------------------------------------------------
# build


def parse_batches(batch) -> tuple[int, int, int]:
    """'1,32,128' / [1, 32, 128] -> (min, opt, max) of the optimisation profile; one value -> a static profile."""
    try:
        vals = parse_batch_sizes(batch)
    except ValueError as e:
        raise ExportError(f"--batch-size {e}") from None
    return vals[0], vals[len(vals) // 2], vals[-1]


def build_engine(onnx_path: Path, plan_path: Path, *, input_size: int, batches=(1, 32, 128), precision: str = "fp16",
                 timing_cache: Path | None = None, workspace_gb: float = 0.0, log=print) -> dict:
    """Build and serialise a plan; returns the TensorRT record stored beside it."""
    trt, major, gpu = require_tensorrt()
    bmin, bopt, bmax = parse_batches(batches)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major == 10:  # 11: every network is strongly typed (the flag is deprecated and ignored)
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT {trt.__version__}'s ONNX parser refused the graph: " + " | ".join(errs[:5]))
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [INPUT_NAME]:
        raise ExportError(f"the graph's inputs are {names}, expected ['{INPUT_NAME}']")
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 on request means fp32, not TF32 matmuls
    profile = builder.create_optimization_profile()
    s = input_size
    profile.set_shape(INPUT_NAME, (bmin, s, s, 3), (bopt, s, s, 3), (bmax, s, s, 3))
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__, gpu["compute_capability"])
    save_cache, cache_state = attach_timing_cache(config, cache_path, log)
    log(f"trt: building a {precision} engine with TensorRT {trt.__version__} for {gpu['gpu_name']} "
        f"(sm {gpu['compute_capability']}), batch {bmin}/{bopt}/{bmax}; this takes a while")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT could not build the engine (its log above says why)")
    Path(plan_path).write_bytes(bytes(serialized))
    del serialized
    try:
        if not save_cache:
            raise OSError("it belongs to another TensorRT version or GPU")
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    except OSError as e:
        log(f"trt: timing cache not saved ({e})")
    return {"version": trt.__version__, "major": major, "strongly_typed": True, "gpu_name": gpu["gpu_name"],
            "compute_capability": gpu["compute_capability"], "precision": precision,
            "profile": {"input": INPUT_NAME, "min": bmin, "opt": bopt, "max": bmax, "input_size": s},
            "tf32": precision != "fp32", "timing_cache": str(cache_path), "timing_cache_state": cache_state}


def attach_timing_cache(config, cache_path: Path, log=print) -> tuple[bool, str]:
    """Give the builder config the timing cache at ``cache_path``; (save it after the build?, state).

    state: 'absent' (no file: a fresh cache, saved after the build), 'reused', 'corrupt' (unreadable
    or not a TensorRT timing cache: treated as absent, with a warning, and replaced after the build)
    or 'foreign' (a valid cache of another TensorRT version/GPU: a fresh one is used and the file kept)."""
    try:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
    except OSError as e:
        log(f"trt: warning: timing cache {cache_path} is unreadable ({e}); building without it")
        blob, state = b"", "corrupt"
    else:
        state = "reused" if blob else "absent"
    cache = None
    if blob:
        try:
            cache = config.create_timing_cache(blob)
        except Exception as e:  # TensorRT raises its own types for bad blobs
            log(f"trt: warning: timing cache {cache_path} is not a TensorRT timing cache ({_first(e)}); treating it "
                "as absent (a fresh one replaces it after the build)")
            cache, state = None, "corrupt"
        else:
            if cache is None:
                log(f"trt: warning: timing cache {cache_path} could not be read by TensorRT; treating it as absent "
                    "(a fresh one replaces it after the build)")
                state = "corrupt"
    if cache is not None:
        try:
            fits = config.set_timing_cache(cache, ignore_mismatch=False)
        except Exception as e:  # BLE001
            log(f"trt: warning: timing cache {cache_path} was refused by TensorRT ({_first(e)}); treating it as absent")
            fits, state = True, "corrupt"
            cache = None
        else:
            if fits:
                return True, state
            log(f"trt: timing cache {cache_path} does not fit this TensorRT/GPU; using a fresh one (the file is kept)")
            state = "foreign"
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return state != "foreign", state


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def trt_predict(plan_path: Path, images: np.ndarray, batch: int, min_batch: int = 1) -> np.ndarray:
    """Run a plan on uint8 NHWC crops in chunks of ``batch`` (torch CUDA buffers; TensorRT 10/11
    name-based I/O API). A last chunk below the profile's ``min_batch`` is padded, then cut."""
    trt, _, _ = require_tensorrt()
    try:
        import torch
    except ImportError:
        raise ExportError("the plan self-check needs torch with CUDA on this machine") from None
    if not torch.cuda.is_available():
        raise ExportError("the plan self-check needs torch with CUDA on this machine (torch.cuda is unavailable)")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT could not load the plan it just built ({plan_path})")
    ctx = engine.create_execution_context()
    stream = torch.cuda.Stream()
    out = []
    with torch.cuda.stream(stream):
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            n = len(chunk)
            if n < min_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], min_batch - n, axis=0)])
            x = torch.from_numpy(np.ascontiguousarray(chunk)).cuda()
            y = torch.empty(x.shape[0], dtype=torch.float32, device="cuda")
            ctx.set_input_shape(INPUT_NAME, tuple(x.shape))
            ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
            ctx.set_tensor_address(OUTPUT_NAME, y.data_ptr())
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise ExportError("TensorRT execution failed")
            stream.synchronize()
            out.append(y.cpu().numpy()[:n])
    return np.concatenate(out).astype(np.float64)


def run_plan(plan_path: Path, images: np.ndarray, min_batch: int, max_batch: int, n_single: int = 4, log=print):
    """(probabilities of all crops in chunks of ``max_batch``, probabilities of the first few at
    batch 1 or None when the profile starts above 1). Uses the runtime's TrtPlanEngine (the code
    ami-infer runs, with its version/GPU checks) when cuda-python is present and works, else
    torch.cuda (also when cuda-python fails its CUDA calls, e.g. a CUDA 13 build on a CUDA 12 driver)."""
    if _have_cudart():
        from ami.runtime.engines import EngineError
        from ami.runtime.engines.tensorrt import TrtPlanEngine

        try:
            eng = TrtPlanEngine(plan_path)
        except EngineError as e:
            if "CUDA call failed" not in str(e) or _torch_gpu() is None:
                raise ExportError(f"the plan just built does not run: {e}") from None
            log(f"trt: cuda-python cannot drive this GPU ({e}); checking the plan through torch.cuda instead")
        else:
            try:
                p_all = eng.predict(images).astype(np.float64)
                p_one = (np.concatenate([eng.predict(images[i:i + 1]) for i in range(min(n_single, len(images)))])
                         .astype(np.float64) if min_batch == 1 else None)
            except (EngineError, ValueError) as e:
                raise ExportError(f"the plan just built does not run: {e}") from None
            finally:
                eng.close()
            return p_all, p_one
    p_all = trt_predict(plan_path, images, max_batch, min_batch=min_batch)
    p_one = trt_predict(plan_path, images[:n_single], 1) if min_batch == 1 else None
    return p_all, p_one
