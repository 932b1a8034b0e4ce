"""The registry's mechanics: :class:`ModelConfig`, registering and looking up entries, a run's
recorded entry, and how a recipe configures an entry. The entries themselves live in one module per
family (:mod:`ami.train.entries_edge`, :mod:`ami.train.entries_e2e`,
:mod:`ami.train.entries_foundation`, :mod:`ami.train.entries_imagenet`); :mod:`ami.train.registry`
loads them all and is the one door the rest of the package imports.

Import-light (no torch).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from ami.runtime.preprocess import Preprocess

from .recipes import BLOCKS_LORA_TARGETS, Recipe, lora_regex, normalization

METHODS = ("full", "linear", "lora")

# LoRA targets: the attention qkv/proj and MLP fc1/fc2 linears of every transformer block, and
# nothing else (a bare "proj" suffix would also catch patch_embed.proj, the stem convolution).
# The Table-3 LoRA recipes use the scripts' target set instead (recipe key lora_targets="script",
# which adapts patch_embed.proj too); this blocks-only regex stays each entry's own definition
# and the recipe option "blocks".
VIT_LORA_TARGETS = BLOCKS_LORA_TARGETS
SWIN_LORA_TARGETS = r".*layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"

PAPER_RECIPE = Recipe()
LORA_RECIPE = Recipe(lr=5e-5, early_stop_patience=10)  # lr / patience of the public LoRA scripts (entries outside Table 3)


@dataclass(frozen=True)
class ModelConfig:
    name: str  # registry key, e.g. "virchow2"
    arch: str  # timm architecture name
    display: str  # name used in tables, e.g. "Virchow2"
    family: str  # "edge" | "e2e" | "foundation" | "pretrained" (ImageNet weights run with every method)
    methods: tuple[str, ...]
    preprocess: Preprocess
    hub_id: str | None = None  # e.g. "hf-hub:paige-ai/Virchow2"; None = timm's own ImageNet weights or none
    # weights inside an installed Python package, "pkg:DIST_MODULE/relative/path.pth" (found through
    # importlib.resources, no download); used when there is no hub id. weights_extra names the
    # optional dependency group that installs that package (for the error message).
    weights_file: str | None = None
    weights_extra: str | None = None
    # explicit key renaming of a foreign checkpoint into timm's names: ordered (regex, replacement)
    # pairs, each applied once per key with re.sub (after the first rule that matches a key, the
    # later rules still see the renamed key); empty = the checkpoint already uses timm's names
    weights_rename: tuple[tuple[str, str], ...] = ()
    pretrained: bool = True  # False: the benchmark trains this architecture from scratch
    create_kwargs: dict = field(default_factory=dict)  # timm kwargs; "timm.layers.X" strings are resolved
    head: str = "head"  # attribute path of the classifier (the module replaced / kept trainable)
    embedding: str = "cls"  # cls | cls+mean (class token ++ mean of patch tokens) | pool (timm's pooled features)
    embed_dim: int = 0
    num_prefix_tokens: int = 1  # class + register tokens: excluded from the patch mean
    lora_targets: str | None = None  # regex over module names
    params_m: float = 0.0  # parameter count of the real model, millions (paper / model card)
    recipe: Recipe = PAPER_RECIPE
    lora_recipe: Recipe = LORA_RECIPE
    tiny_kwargs: dict = field(default_factory=dict)  # shrink depth/width for the CPU test stand-in
    tiny_arch: str | None = None  # timm architecture of the CPU test stand-in (None: ``arch`` itself)
    table3: bool = False  # one of the paper's Table-3 models (every method its family has there)
    notes: str = ""

    def recipe_for(self, method: str) -> Recipe:
        return self.lora_recipe if method == "lora" else self.recipe

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocess"] = asdict(self.preprocess)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of :meth:`to_dict` (a run's recorded ``registry_entry``); keys of other versions are ignored."""
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in upgrade_entry(d).items() if k in known}
        recipe_keys = set(Recipe.__dataclass_fields__)
        kw["preprocess"] = Preprocess(**{k: (tuple(v) if isinstance(v, list) else v)
                                         for k, v in d["preprocess"].items()})
        for k in ("recipe", "lora_recipe"):
            if isinstance(kw.get(k), dict):
                kw[k] = Recipe(**{kk: vv for kk, vv in kw[k].items() if kk in recipe_keys})
        if "methods" in kw:
            kw["methods"] = tuple(kw["methods"])
        if "weights_rename" in kw:
            kw["weights_rename"] = tuple(tuple(r) for r in kw["weights_rename"])
        return cls(**kw)


def upgrade_entry(entry: dict) -> dict:
    """A recorded registry entry in today's field names (a copy; the recorded one is not changed).
    Entries recorded before ``tiny_arch`` was a field carried it as ``tiny_kwargs["_tiny_arch"]``."""
    tiny = entry.get("tiny_kwargs")
    if not isinstance(tiny, dict) or "_tiny_arch" not in tiny:
        return entry
    out = {**entry, "tiny_kwargs": {k: v for k, v in tiny.items() if k != "_tiny_arch"}}
    out.setdefault("tiny_arch", tiny["_tiny_arch"])
    return out


REGISTRY: dict[str, ModelConfig] = {}


def register(cfg: ModelConfig) -> ModelConfig:
    if cfg.name in REGISTRY:
        raise KeyError(f"model {cfg.name!r} is already registered")
    bad = set(cfg.methods) - set(METHODS)
    if bad:
        raise ValueError(f"{cfg.name}: unknown methods {bad}")
    REGISTRY[cfg.name] = cfg
    return cfg


def get(name: str) -> ModelConfig:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; `ami-train --list` shows the registry: "
                       f"{', '.join(sorted(REGISTRY))}") from None


def run_entry(conf: dict) -> ModelConfig:
    """The entry a run was trained with: the copy its config.json recorded (so a run made before an
    entry changed still rebuilds its own network), else today's entry of that name."""
    entry = conf.get("registry_entry")
    if isinstance(entry, dict) and entry.get("arch") and entry.get("preprocess"):
        return ModelConfig.from_dict(entry)
    return get(conf["model"])


def with_recipe_defaults(conf: dict) -> dict:
    """A run's config.json written before a recipe key existed, with that key at its default (which
    is the behaviour such a run had): adding a recipe option never locks an older run out of resuming
    nor splits it from identical newer runs in a table. Modifies and returns ``conf``."""
    defaults = asdict(Recipe())
    entry = conf.get("registry_entry") if isinstance(conf.get("registry_entry"), dict) else {}
    for holder, key in ((conf, "recipe"), (entry, "recipe"), (entry, "lora_recipe")):
        if isinstance(holder.get(key), dict):
            holder[key] = {**{k: v for k, v in defaults.items() if k not in holder[key]}, **holder[key]}
    return conf


def configure(cfg: ModelConfig, recipe: Recipe) -> ModelConfig:
    """The entry as one configuration trains it: the recipe's evaluation geometry, normalisation,
    head tokens (embedding) and LoRA targets applied to the entry's own. With every such key at
    "entry" (the default) this is ``cfg`` itself, so entries whose recipes do not set them (the
    edge models) record exactly what they recorded before these keys existed. The result is what a
    run's config.json records as its ``registry_entry``, so export and evaluation rebuild the
    network and preprocessing the run was trained with."""
    pre = cfg.preprocess
    mean, std = normalization(recipe.normalize, (pre.mean, pre.std))
    pre = replace(pre, mean=tuple(mean), std=tuple(std))
    if recipe.eval_resize >= 0:
        pre = replace(pre, resize=recipe.eval_resize or None)
    if recipe.eval_interpolation != "entry":
        pre = replace(pre, interpolation=recipe.eval_interpolation)
    changes = {}
    if pre != cfg.preprocess:
        changes["preprocess"] = pre
    if recipe.embedding != "entry" and recipe.embedding != cfg.embedding:
        width = cfg.embed_dim // 2 if cfg.embedding == "cls+mean" else cfg.embed_dim
        changes["embedding"] = recipe.embedding
        changes["embed_dim"] = 2 * width if recipe.embedding == "cls+mean" else width
    targets = lora_regex(recipe.lora_targets, cfg.lora_targets)
    if targets != cfg.lora_targets:
        changes["lora_targets"] = targets
    return replace(cfg, **changes) if changes else cfg


def configured(name: str, method: str, recipe: Recipe | None = None) -> ModelConfig:
    """Today's entry ``name`` as configuration (name, method) trains it with ``recipe`` (default: its own)."""
    cfg = get(name)
    return configure(cfg, recipe if recipe is not None else cfg.recipe_for(method))


_DESCRIPTIVE = ("name", "display", "notes", "recipe", "lora_recipe", "table3")


def current_name(conf: dict) -> str | None:
    """Today's registry name of the entry a run recorded: the recorded name while that entry is
    unchanged, else the entry that now carries the same definition (the edge model's v1 was trained
    as 'edge' and is 'edge_200mf' today); None when no entry matches any more. Only the network
    definition counts (architecture, weights, preprocessing, head, embedding, LoRA targets): names,
    display text, notes and default recipes do not, since a recipe is given by flags. A recorded entry
    that the run's recipe configured (:func:`configure`: normalisation, head tokens, LoRA targets)
    matches today's entry under that same recipe."""
    entry = conf.get("registry_entry")
    if not isinstance(entry, dict):
        return conf.get("model")

    want = definition(entry)
    recipe = None
    if isinstance(conf.get("recipe"), dict):
        known = set(Recipe.__dataclass_fields__)
        try:
            recipe = Recipe(**{**asdict(Recipe()), **{k: v for k, v in conf["recipe"].items() if k in known}})
        except TypeError:
            recipe = None
    names = [conf.get("model")] + [n for n in REGISTRY if n != conf.get("model")]
    for n in names:
        if n not in REGISTRY:
            continue
        if definition(REGISTRY[n].to_dict()) == want:
            return n
        if recipe is not None:
            try:
                if definition(configure(REGISTRY[n], recipe).to_dict()) == want:
                    return n
            except ValueError:
                pass
    return None


def definition(entry: dict) -> str:
    """A registry entry's network definition (a to_dict() or a recorded copy) as a canonical string:
    everything but its name, display text, notes, Table-3 membership and default recipes."""
    d = upgrade_entry(json.loads(json.dumps(entry, default=list)))
    return json.dumps({k: v for k, v in d.items() if k not in _DESCRIPTIVE and not _at_default(k, v)},
                      sort_keys=True)


def _at_default(key: str, value) -> bool:
    """True when a recorded field holds its default: an entry recorded before that field existed
    (and so without it) has the same definition as today's entry with the field at its default."""
    f = ModelConfig.__dataclass_fields__.get(key)
    if f is None or key in ("preprocess",):
        return False
    from dataclasses import MISSING

    default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                         else MISSING)
    return default is not MISSING and json.loads(json.dumps(default, default=list)) == value


def label(name: str, method: str, entry: dict | None = None) -> str:
    """Row label of a configuration as the paper's tables write it, e.g. 'Virchow2 (LoRA)'.
    With ``entry`` (a run's recorded registry entry) its display name wins over today's registry,
    so a run made under an entry that has since changed (the edge model's v1) keeps its own name."""
    if entry and entry.get("display"):
        display, family = entry["display"], entry.get("family")
    else:
        c = get(name)
        display, family = c.display, c.family
    if family not in ("foundation", "pretrained"):
        return display
    return f"{display} ({'LoRA' if method == 'lora' else method})"


def table3_configs() -> list[tuple[str, str]]:
    """The 17 (model, method) configurations of the paper's Table 3, in table order."""
    out = [(n, "full") for n, c in REGISTRY.items() if c.table3 and c.family == "e2e"]
    fms = [n for n, c in REGISTRY.items() if c.table3 and c.family == "foundation"]
    out += [(n, "linear") for n in fms] + [(n, "lora") for n in fms]
    return out
