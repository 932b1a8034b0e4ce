"""One registry of model configurations, in the spirit of timm's (and eva's layout).

Each :class:`ModelConfig` knows everything needed to build, adapt, train and export a model:
timm architecture and creation kwargs, weight source, preprocessing, where the classifier head
lives, how an embedding is formed from the backbone's tokens, and the exact LoRA targets.
Adding a model is one ``register(ModelConfig(...))`` call in its family's module.

The registry is this one door; behind it each concept has its own module:

- :mod:`ami.train.registry_core`: the mechanics (:class:`ModelConfig`, :func:`register`,
  :func:`get`, a run's recorded entry, :func:`configure`, :func:`table3_configs`, ...);
- the entries, one module per family: :mod:`ami.train.entries_edge`, :mod:`ami.train.entries_e2e`,
  :mod:`ami.train.entries_foundation`, :mod:`ami.train.entries_imagenet` (imported here, in
  that order, which is the order of ``ami-train --list`` and of Table 3);
- :mod:`ami.train.paper`: the paper's published Table 3;
- :mod:`ami.train.provenance`: what each Table-3 script did (the default recipes, cited).

Import-light (no torch) so that ``ami-train --list`` and the export/runtime metadata can use it
anywhere; :mod:`ami.train.models` turns an entry into a network.
"""

from __future__ import annotations

from . import entries_e2e, entries_edge, entries_foundation, entries_imagenet
from .paper import PAPER_CITATION, PAPER_TABLE3
from .recipes import Recipe
from .registry_core import (
    LORA_RECIPE,
    METHODS,
    PAPER_RECIPE,
    REGISTRY,
    SWIN_LORA_TARGETS,
    VIT_LORA_TARGETS,
    ModelConfig,
    configure,
    configured,
    current_name,
    definition,
    get,
    label,
    register,
    run_entry,
    table3_configs,
    upgrade_entry,
    with_recipe_defaults,
)

for _family in (entries_edge, entries_e2e, entries_foundation, entries_imagenet):  # the --list / Table-3 order
    for _entry in _family.ENTRIES:
        register(_entry)

__all__ = ["LORA_RECIPE", "METHODS", "PAPER_CITATION", "PAPER_RECIPE", "PAPER_TABLE3", "REGISTRY", "SWIN_LORA_TARGETS",
           "VIT_LORA_TARGETS", "ModelConfig", "Recipe", "configure", "configured", "current_name", "definition", "get",
           "label", "register", "run_entry", "table3_configs", "upgrade_entry", "with_recipe_defaults"]
