"""Writing an ami ONNX file: its metadata, external data for large models, the weights digest.

One writer for every ONNX artefact the export layer makes (float, int8, the fp16 graph of a
TensorRT build, the tiny generated model), so they all describe themselves the same way.
"""

from __future__ import annotations

from pathlib import Path

from ami.runtime import __version__
from ami.runtime.artifact import INPUT_NAME, OUTPUT_NAME, ArtifactMeta, stamp_weights_digest

from .checks import set_meta

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph


def initializer_bytes(model) -> int:
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
    if initializer_bytes(model) > EXTERNAL_DATA_BYTES:
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        stamp_weights_digest(path)  # the weights digest the runtime checks at load
        return [data, path]
    onnx.save_model(model, str(path))
    stamp_weights_digest(path)
    return [path]
