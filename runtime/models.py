"""The models shipped with ami, by name: the one place that maps a name to its packaged file. Torch-free.

Every tool that takes a model (``--model`` of ami-infer and ami-bench, ami-export's ONNX source,
``ami-bench card --model``) resolves what the user typed with :func:`resolve_model`:

- a path to an existing file is used as is;
- otherwise a shipped model's name (``edge``, ``edge-int8``), or its file name (``edge-int8.onnx``),
  is the file inside the installed package, from any folder;
- anything else is one clear error listing the names (:class:`ModelNotFound`, exit 2).

``ami-infer --list-models`` prints :func:`model_lines`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class ShippedModel:
    name: str
    file: str
    description: str

    @property
    def path(self) -> Path:
        return ASSETS / self.file

    def present(self) -> bool:
        return self.path.is_file()


SHIPPED: dict[str, ShippedModel] = {m.name: m for m in (
    ShippedModel("edge", "edge.onnx", "the edge model (RegNetX-400MF, fp32 ONNX): the default everywhere"),
    ShippedModel("edge-int8", "edge-int8.onnx", "the edge model quantised to int8 (static QDQ): fastest on CPUs"),
)}
DEFAULT_MODEL_NAME = "edge"


class ModelNotFound(BadInput, FileNotFoundError):
    """Neither a model file nor the name of a shipped model."""


def shipped_model(ref: str | os.PathLike) -> ShippedModel | None:
    """The shipped model ``ref`` names (``edge``, ``edge-int8`` or its file name), else None."""
    text = os.fspath(ref)
    for m in SHIPPED.values():
        if text in (m.name, m.file):
            return m
    return None


def resolve_model(ref: str | os.PathLike | None = None) -> Path:
    """The model file ``ref`` means: an existing file as is, else a shipped model by name (None: the
    default, ``edge``). Raises :class:`ModelNotFound` when it is neither."""
    if ref is None or os.fspath(ref) == "":
        ref = DEFAULT_MODEL_NAME
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    m = shipped_model(ref)
    if m is not None:
        if not m.present():
            raise ModelNotFound(f"the shipped model {m.name!r} is missing from this install ({m.path} not found)")
        return m.path
    if path.exists():
        raise ModelNotFound(f"model {ref} is not a file")
    raise ModelNotFound(f"model {ref} not found: no such file, and not a shipped model ({', '.join(SHIPPED)}; "
                        "list them with `ami-infer --list-models`)")


def model_lines() -> list[str]:
    """One line per shipped model: name, file, size, what it is (for ``--list-models``)."""
    w = max(len(n) for n in SHIPPED)
    out = []
    for m in SHIPPED.values():
        size = f"{m.path.stat().st_size / 1e6:.1f} MB" if m.present() else "missing from this install"
        out.append(f"{m.name:<{w}}  {m.file} ({size}): {m.description}")
    return out
