"""The ONNX node scopes of an exported ami graph (torch-free).

``export/ensemble.py``'s module names fix them: ``/pre/...`` (preprocessing), ``/folds.K/...``
(fold network K) and ``/post/...`` (sigmoid, fold mean). The int8 and fp16 steps read them to
decide what stays float32, and they run on an ONNX file alone, without torch.
"""

from __future__ import annotations

NETWORK_PREFIX = "/folds."


def is_network_node(name: str) -> bool:
    """A node of one of the fold networks."""
    return name.startswith(NETWORK_PREFIX)


def is_io_node(name: str) -> bool:
    """Pre-/post-processing nodes (top-level scope), which stay float32 in int8 and fp16 graphs."""
    return name.startswith("/") and not name.startswith(NETWORK_PREFIX)
