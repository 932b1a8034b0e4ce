"""Turn a registry entry into a network with one atypical logit.

``create(cfg, method)`` is the single door: it builds the timm architecture with the entry's
creation kwargs, loads weights from the entry's source (or refuses, see :mod:`ami.train.weights`),
replaces the classifier by a one-logit head and applies the method (full fine-tuning, frozen
backbone + linear head, or PEFT LoRA on the entry's exact targets; :mod:`ami.train.adapt`).
"""

from __future__ import annotations

import importlib

import timm
from torch import nn

from .adapt import LogitModel as LogitModel  # re-exported: the one-logit wrapper every model is
from .adapt import apply_method, init_head
from .registry import ModelConfig
from .weights import WeightsUnavailable as WeightsUnavailable  # re-exported: create() raises it
from .weights import load_pretrained


def resolve_kwargs(kwargs: dict) -> dict:
    """Registry kwargs may name classes as 'module.Name' strings (kept torch-free); import them."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, str) and v.startswith(("timm.", "torch.")):
            mod, _, attr = v.rpartition(".")
            v = getattr(importlib.import_module(mod), attr)
        out[k] = v
    return out


def build_backbone(cfg: ModelConfig, tiny: bool = False, **overrides) -> nn.Module:
    """The timm network of an entry, randomly initialised, with a 1-logit classifier."""
    kwargs = resolve_kwargs(cfg.create_kwargs)
    arch = cfg.arch
    if tiny:
        arch = cfg.tiny_arch or arch
        kwargs.update(resolve_kwargs(cfg.tiny_kwargs))
    kwargs.update(overrides)
    kwargs.setdefault("num_classes", 1)
    return timm.create_model(arch, pretrained=False, **kwargs)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def fresh_head(net: nn.Module, cfg: ModelConfig, how: str = "linear") -> None:
    """Initialise the one-logit classifier of a pretrained network trained end to end (``full``) by
    :func:`ami.train.adapt.init_head` (recipe key ``head_init``): by default PyTorch's ``nn.Linear``
    init, as the end-to-end scripts do (they replace the head by a new ``nn.Linear(in, 1)``).
    timm's own initialisers assume a many-class head: EfficientNet's draws U(-1/sqrt(fan_out), +)
    and so, with one output, U(-1, 1), which makes the first logits of ImageNet features tens of
    units large and the first fine-tuning steps wreck the pretrained features. (``linear`` and
    ``lora`` read a new ``logit_head`` instead, initialised in :func:`ami.train.adapt.apply_method`.)"""
    try:
        head = net.get_submodule(cfg.head)
    except AttributeError:
        return
    if isinstance(head, nn.Linear) and head.out_features == 1:
        init_head(head, how)


def create(cfg: ModelConfig, method: str = "full", *, weights: str | None = None, random_init: bool = False,
           tiny: bool = False, drop_rate: float = 0.0, drop_path_rate: float = 0.0, head_init: str = "linear",
           **lora_kw) -> LogitModel:
    """Build the model for one (entry, method). Pretrained entries need weights or ``random_init``.
    ``head_init``: how the new one-logit head starts (:func:`ami.train.adapt.init_head`)."""
    if method not in cfg.methods:
        raise ValueError(f"{cfg.name} supports methods {cfg.methods}, not {method!r}")
    over = {}
    if drop_rate:
        over["drop_rate"] = drop_rate
    if drop_path_rate:
        over["drop_path_rate"] = drop_path_rate
    net = build_backbone(cfg, tiny=tiny, **over)
    pretrained = cfg.pretrained and not random_init
    if pretrained or weights:  # --weights also fills an architecture trained from scratch / --random-init
        load_pretrained(net, cfg, weights)
    if pretrained:
        fresh_head(net, cfg, head_init)
    if method == "full":
        return LogitModel(net)
    return apply_method(LogitModel(net), cfg, method, head_init=head_init, **lora_kw)

