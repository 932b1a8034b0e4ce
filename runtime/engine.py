"""Compatibility door: ``ami.runtime.engine`` is now the plug-in package :mod:`ami.runtime.engines`.

``load_engine``, ``Engine``, ``EngineError`` and the ONNX Runtime names (``OrtEngine``,
``PROVIDER_NAMES``, ``PROVIDER_CHOICES``) keep working from here; new code imports
:mod:`ami.runtime.engines`.
"""

from __future__ import annotations

from pathlib import Path  # kept for callers that used engine.Path

from .engines import (
    ASSETS,
    DEFAULT_MODEL,
    ENGINE_CHOICES,
    REGISTRY,
    TRT_EP_MAX_BATCH,
    Backend,
    Engine,
    EngineError,
    LoadOptions,
    backend,
    backends,
    candidates,
    choose,
    default_model_path,
    engine_table,
    load_engine,
    resolve_model_path,
)
from .engines.onnxruntime import PROVIDER_CHOICES, PROVIDER_NAMES, OrtEngine
from .engines.tensorrt import PLAN_SUFFIXES

# Everything above is re-exported: this module only forwards names.
__all__ = [
    "ASSETS",
    "DEFAULT_MODEL",
    "ENGINE_CHOICES",
    "PLAN_SUFFIXES",
    "PROVIDER_CHOICES",
    "PROVIDER_NAMES",
    "REGISTRY",
    "TRT_EP_MAX_BATCH",
    "Backend",
    "Engine",
    "EngineError",
    "LoadOptions",
    "OrtEngine",
    "Path",
    "backend",
    "backends",
    "candidates",
    "choose",
    "default_model_path",
    "engine_table",
    "load_engine",
    "resolve_model_path",
]
