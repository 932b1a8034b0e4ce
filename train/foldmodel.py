"""Rebuilding a trained network from its checkpoint: the one place that does it.

:func:`load_fold_model` gives the network of ``RUN/fold{k}/best.safetensors`` (or ``RUN/all``) as
training left it: export, parity, the model card and the tests all call it. :func:`load_model` is
the same rebuild for a registry entry and a bare checkpoint file (the shipped
``runtime/assets/edge.safetensors``), and :func:`load_state_file` loads a checkpoint into a built
network; both know the two kinds of checkpoint ``ami-train`` writes:

* complete: every tensor. The network is built from random init and needs no weight source;
* trainable-only (metadata ``contents=trainable``; linear probe and LoRA on pretrained weights):
  the trained tensors only. The frozen backbone comes from the run's weight source
  (:class:`~ami.runtime.rundir.WeightsSource`), or from ``weights`` (a local file or hub id) when
  given.

Every failure is a :class:`FoldModelError` that names the file and what to do; export and parity
pass its text on as their own error. Importing this module does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ami.runtime.errors import BadInput
from ami.runtime.rundir import CONFIG, RunDir, RunDirError, WeightsSource

from .registry import ModelConfig, run_entry

if TYPE_CHECKING:
    from torch import nn

    from .models import LogitModel

LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout")  # recipe keys the LoRA network is built with


class FoldModelError(BadInput, ValueError):
    """A trained network cannot be rebuilt (unreadable or unfitting weights, no weight source)."""


def _unreadable(path: Path, e: Exception) -> FoldModelError:
    return FoldModelError(f"{path}: unreadable weights ({type(e).__name__}: {e})")


def is_partial(path: Path) -> bool:
    """:func:`ami.train.weights.is_partial`; an unreadable file raises :class:`FoldModelError`."""
    from safetensors import SafetensorError

    from .weights import is_partial as partial

    try:
        return partial(path)
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


def load_state_file(model: nn.Module, path: Path) -> None:
    """:func:`ami.train.weights.load_weights` (tensors that do not fit raise RuntimeError / KeyError,
    as ``load_state_dict`` does); an unreadable file raises :class:`FoldModelError`."""
    from safetensors import SafetensorError

    from .weights import load_weights

    try:
        load_weights(model, path)
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None


def run_model_entry(config: dict, where: Path | str) -> ModelConfig:
    """The registry entry a run's config.json says its network was trained as (its recorded copy, see
    ``registry.run_entry``), checked against the method. ``where``: the run, for the messages."""
    try:
        cfg = run_entry(config)
    except (TypeError, ValueError) as e:
        raise FoldModelError(f"{where}: {CONFIG}'s registry_entry is unreadable ({e})") from None
    except KeyError as e:
        raise FoldModelError(f"{where}: {e.args[0]}") from None
    if config.get("method") == "lora" and not cfg.lora_targets:
        raise FoldModelError(f"{where}: {CONFIG} says method lora, but registry entry {cfg.name!r} has no "
                             "LoRA targets (lora_targets), so no LoRA run of it exists: the run's config is wrong")
    return cfg


def load_model(cfg: ModelConfig, method: str, path: Path, *, source: WeightsSource | None = None,
               weights: str | None = None, tiny: bool = False, lora: dict | None = None, exportable: bool = True,
               described: str = "") -> LogitModel:
    """The network of entry ``cfg`` / ``method`` with the tensors of checkpoint ``path``: eval mode, float32.

    A complete checkpoint is loaded over a random init; a trainable-only one over the frozen backbone
    from ``weights`` if given, else from ``source`` (None: the entry's own weight source). ``tiny``
    and ``lora`` (rank / alpha / dropout) as the network was trained; ``exportable``: built in
    timm's exportable mode (no fused attention), as export traces it. ``described`` ends the
    "do not fit" message (e.g. " as config.json describes it")."""
    path = Path(path)
    if not path.is_file():
        raise FoldModelError(f"{path} is missing")
    if is_partial(path):
        random_init = source is not None and not source.pretrained
        w = weights or (source.override() if source is not None else None)
    else:
        random_init, w = True, None
    model = _create(cfg, method, path, weights=w, random_init=random_init, tiny=tiny, lora=lora or {},
                    exportable=exportable)
    try:
        load_state_file(model, path)
    except (RuntimeError, KeyError) as e:
        first = "; ".join(str(e).splitlines()[:3])
        raise FoldModelError(f"{path}: these weights do not fit {cfg.name}/{method}"
                             f"{' (tiny stand-in)' if tiny else ''}{described}: {first[:400]}") from None
    return model.float().eval()


def _create(cfg: ModelConfig, method: str, path: Path, *, weights, random_init: bool, tiny: bool, lora: dict,
            exportable: bool) -> LogitModel:
    from contextlib import nullcontext

    from .models import WeightsUnavailable, create

    try:
        from timm.layers import set_layer_config

        with set_layer_config(exportable=True) if exportable else nullcontext():
            return create(cfg, method, weights=weights, random_init=random_init, tiny=tiny, **lora)
    except WeightsUnavailable as e:
        raise FoldModelError(f"{path} holds only the trained tensors; the frozen backbone must come from its weight "
                             f"source, which is not reachable here: {e} (pass --weights LOCAL_FILE)") from None
    except (ImportError, ValueError) as e:
        raise FoldModelError(f"cannot build {cfg.name}/{method}: {e}") from None


def load_fold_model(run: RunDir | Path | str, fold=0, weights: str | None = None, *,
                    exportable: bool = True) -> LogitModel:
    """The network of one fold of a run (``fold``: 0..4, or ``"all"`` / None for the all-crops model),
    rebuilt from the run's config.json (entry, method, tiny stand-in, LoRA options, weight source)
    and the fold's best.safetensors on the CPU: eval mode, float32, for LoRA still unmerged.
    ``weights`` replaces the run's weight source for a trainable-only checkpoint (a local copy of the
    hub file, say). Raises :class:`FoldModelError`."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    try:
        config = run.config()
        path = run.fold(fold).require_weights()
    except RunDirError as e:
        raise FoldModelError(str(e)) from None
    if "method" not in config:
        raise FoldModelError(f"{run.config_path} lacks 'method': not a run written by ami-train")
    recipe = config.get("recipe") or {}
    return load_model(run_model_entry(config, run.path), config["method"], path,
                      source=WeightsSource.from_config(config), weights=weights,
                      tiny=bool(config.get("tiny_stand_in", False)),
                      lora={k: recipe[k] for k in LORA_OPTIONS if k in recipe}, exportable=exportable,
                      described=f" as {CONFIG} describes it")
