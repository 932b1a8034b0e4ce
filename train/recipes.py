"""Training recipes: the keys, the augmentation policies, and what each Table-3 script did.

A :class:`Recipe` is everything that decides how one configuration is trained and evaluated
besides the network: optimiser, schedule, early stopping, sampler, the training transform (a
named :class:`AugPolicy` plus per-field overrides), the evaluation geometry and normalisation,
LoRA rank / alpha / dropout / target modules, and the tokens the head reads. Every key can be
set on the command line (``ami-train --set key=value``; ``--set aug.FIELD=value`` for one field
of the augmentation policy).

Defaults of :class:`Recipe` are the paper's *text* and the behaviour ``ami`` had before a key
existed ("entry" = whatever the registry entry says), so a ``config.json`` written before a key
was added still means what it meant (:func:`ami.train.registry.with_recipe_defaults`).

The paper's numbers came from its published scripts, not from its text: what each script did, with
the statement behind every value, is :mod:`ami.train.provenance`. :data:`PAPER_TEXT` here is the
protocol as the text states it; :func:`departures` lists where a configuration's recipe departs
from it.

Import-light (no torch): ``ami-train --list`` and the registry use it anywhere.
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass, field, fields, replace

from ami.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD

IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)  # the runtime's constants: one definition
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
NORMALIZATIONS = {"imagenet": IMAGENET, "half": HALF, "hoptimus": HOPTIMUS}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
EMBEDDINGS = ("cls", "cls+mean", "mean", "pool")
# How the new one-logit head starts: "linear" = PyTorch's nn.Linear default (a script that builds
# nn.Linear(in, 1) or calls reset_classifier); "timm" = what timm's ViT constructor gives a head built
# with num_classes=1 (weight trunc_normal_(std=0.02), bias 0), as the scripts that pass num_classes=1
HEAD_INITS = ("linear", "timm")

# LoRA target sets. PEFT matches a *list* of names by suffix (a module is adapted when its name
# equals an entry or ends with "." + entry) and a *string* as a regex over the whole name; ami
# stores targets as that regex. "script" is the scripts' target_modules=["qkv", "proj", "fc1",
# "fc2"] as PEFT reads it - which also catches patch_embed.proj, the patch-embedding convolution;
# "blocks" is every transformer block's attention qkv/proj and MLP fc1/fc2 linears and nothing else.
SCRIPT_LORA_MODULES = ("qkv", "proj", "fc1", "fc2")
BLOCKS_LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def suffix_regex(names) -> str:
    """The regex (full match) equivalent to PEFT's suffix matching of a list of module names."""
    return r"(.*\.)?(" + "|".join(n.replace(".", r"\.") for n in names) + ")"


LORA_TARGET_SETS = {"script": suffix_regex(SCRIPT_LORA_MODULES), "blocks": BLOCKS_LORA_TARGETS}


# --- augmentation policies -----------------------------------------------------------------------
@dataclass(frozen=True)
class AugPolicy:
    """One training transform, as data. ``kind``: ``affine`` = one random affine resample of the
    native crop to the model's input size (flips, rotation, RandomResizedCrop-like zoom and shift)
    then colour jitter; ``resize`` = plain resize, no randomness; ``eval`` = exactly the evaluation
    preprocessing (the crops the model is evaluated on), no randomness."""

    kind: str = "affine"  # affine | resize | eval
    hflip: float = 0.0  # probability
    vflip: float = 0.0
    rotate_deg: float = 0.0  # uniform in +-rotate_deg (ignored with any_rotation)
    any_rotation: bool = False  # uniform in [0, 360)
    crop_scale: tuple[float, float] = (1.0, 1.0)  # area fraction kept (RandomResizedCrop scale); (1, 1) = no crop
    crop_ratio: tuple[float, float] | None = None  # aspect-ratio range (log-uniform), None = square
    translate: float = 0.0  # extra shift, fraction of the half-size
    padding: str = "zeros"  # zeros (torchvision's fill=0) | reflection | border
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    hed_sigma: float = 0.0  # stain jitter (Tellez et al.): 0 = off
    hed_bias: float = 0.0
    source: str = ""  # where this policy comes from

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def override(self, params: dict) -> AugPolicy:
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(params) - set(known) - {"source"})
        if unknown:
            raise KeyError(f"unknown augmentation fields {unknown}; known: {', '.join(k for k in known if k != 'source')}")
        kw = {}
        for k, v in params.items():
            if k in ("crop_scale", "crop_ratio") and v is not None:
                v = tuple(float(a) for a in v)
                if len(v) != 2 or v[0] > v[1]:
                    raise ValueError(f"aug.{k} must be a (low, high) pair, got {params[k]!r}")
            kw[k] = v
        out = replace(self, **kw)
        out.check()
        return out

    def check(self) -> None:
        if self.kind not in ("affine", "resize", "eval"):
            raise ValueError(f"augmentation kind must be affine, resize or eval, got {self.kind!r}")
        if self.padding not in ("zeros", "reflection", "border"):
            raise ValueError(f"aug.padding must be zeros, reflection or border, got {self.padding!r}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"aug.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")


POLICIES: dict[str, AugPolicy] = {
    # ami's own edge recipe: mitoses have no orientation (any rotation + flips), stain jitter
    "edge": AugPolicy(hflip=0.5, any_rotation=True, crop_scale=(0.8, 1.0), translate=0.06, padding="reflection",
                      brightness=0.15, contrast=0.15, saturation=0.15, hue=0.02, hed_sigma=0.05, hed_bias=0.05,
                      source="ami (edge models)"),
    # the paper's text: h-flip, rotation <= 15 deg, colour jitter 0.2/0.2/0.2/0.1, RRC scale 0.8-1
    "paper": AugPolicy(hflip=0.5, rotate_deg=15, crop_scale=(0.8, 1.0), brightness=0.2, contrast=0.2, saturation=0.2,
                       hue=0.1, source="the paper's text"),
    "none": AugPolicy(kind="resize", source="ami: no augmentation (bilinear resize to the input size)"),
    "eval": AugPolicy(kind="eval", source="the evaluation transform (no augmentation)"),
    # the published scripts
    "script_e2e": AugPolicy(hflip=0.5, rotate_deg=10, crop_scale=(0.8, 1.0), crop_ratio=(3 / 4, 4 / 3),
                            brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1,
                            source="end-to-end scripts: Resize((224, 224)), RandomHorizontalFlip(), RandomRotation(10), "
                                   "ColorJitter(0.2, 0.2, 0.2, 0.1), RandomResizedCrop(224, scale=(0.8, 1.0))"),
    "script_lora_rrc": AugPolicy(hflip=0.5, rotate_deg=15, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                                 brightness=0.2, contrast=0.2,
                                 source="uni / prov-gigapath / h-optimus-0 LoRA scripts: RandomResizedCrop(224) "
                                        "(torchvision default scale 0.08-1, ratio 3/4-4/3), RandomHorizontalFlip(), "
                                        "RandomRotation(15), ColorJitter(brightness=0.2, contrast=0.2)"),
    "script_lora_resize": AugPolicy(hflip=0.5, rotate_deg=15, brightness=0.2, contrast=0.2,
                                    source="h-optimus-1 LoRA script: Resize(224) (no crop), RandomHorizontalFlip(), "
                                           "RandomRotation(15), ColorJitter(brightness=0.2, contrast=0.2)"),
    "script_virchow_lora": AugPolicy(hflip=0.5, crop_scale=(0.8, 1.0), crop_ratio=(3 / 4, 4 / 3), brightness=0.2,
                                     contrast=0.2, saturation=0.2, hue=0.1,
                                     source="virchow / virchow2 LoRA scripts: RandomResizedCrop(224, scale=(0.8, 1.0)), "
                                            "RandomHorizontalFlip(), ColorJitter(0.2, 0.2, 0.2, 0.1); no rotation"),
}


# --- the recipe ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters. Defaults are the paper's text; "entry" = the registry entry's value."""

    epochs: int = 100
    batch_size: int = 8
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-4
    weight_decay: float = 1e-5
    scheduler: str = "plateau"  # plateau (on val BA: factor 0.5, patience 3, min 1e-7) | cosine
    warmup_epochs: int = 0
    early_stop_patience: int = 15  # on validation balanced accuracy; 0 = off
    augment: str = "paper"  # a policy of POLICIES
    sampling: str = "balanced"  # balanced (inverse class frequency) | uniform
    loss: str = "bce"  # bce | focal
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # >0: mixup, lambda ~ Beta(a, a) per batch, soft BCE targets; 0 = off
    ema_decay: float = 0.0  # 0 = no weight averaging
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.3
    seed: int = 0
    augment_params: dict = field(default_factory=dict)  # per-field overrides of the policy (--set aug.FIELD=v)
    normalize: str = "entry"  # entry | imagenet | half | hoptimus | "m,m,m/s,s,s"
    eval_resize: int = -1  # -1 = entry; 0 = straight resize to the input size; N = shorter side N + centre crop
    eval_interpolation: str = "entry"  # entry | nearest | bilinear | bicubic | lanczos
    embedding: str = "entry"  # tokens the head reads: entry | cls | cls+mean | mean | pool
    lora_targets: str = "entry"  # entry | script | blocks | suffix:a,b,... | re:REGEX
    head_init: str = "linear"  # the new one-logit head: linear (nn.Linear's default) | timm (trunc normal 0.02, bias 0)

    def override(self, **kw) -> Recipe:
        unknown = set(kw) - set(asdict(self))
        if unknown:
            raise KeyError(f"unknown recipe keys: {sorted(unknown)}; known: {sorted(asdict(self))}")
        out = replace(self, **kw)
        out.check()
        return out

    def check(self) -> None:
        """Reject values no run could use, with the allowed ones (before any work starts)."""
        if self.augment not in POLICIES:
            raise ValueError(f"unknown augmentation policy {self.augment!r}; known: {', '.join(POLICIES)}")
        self.policy()  # validates augment_params
        normalization(self.normalize, IMAGENET)
        if self.eval_interpolation != "entry" and self.eval_interpolation not in INTERPOLATIONS:
            raise ValueError(f"eval_interpolation must be entry or one of {', '.join(INTERPOLATIONS)}")
        if self.embedding != "entry" and self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be entry or one of {', '.join(EMBEDDINGS)}")
        if self.eval_resize < -1:
            raise ValueError("eval_resize must be -1 (entry), 0 (straight resize) or a size in pixels")
        lora_regex(self.lora_targets, None)
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")

    def policy(self) -> AugPolicy:
        """The training transform: the named policy with this recipe's field overrides."""
        return POLICIES[self.augment].override(self.augment_params or {})


def normalization(spec: str, entry: tuple) -> tuple[tuple, tuple]:
    """(mean, std) of a ``normalize`` value; ``entry`` is the entry's own (mean, std)."""
    if spec == "entry":
        return tuple(entry[0]), tuple(entry[1])
    if spec in NORMALIZATIONS:
        return NORMALIZATIONS[spec]
    try:
        m, s = spec.split("/")
        mean, std = tuple(float(v) for v in m.split(",")), tuple(float(v) for v in s.split(","))
    except ValueError:
        mean = std = ()
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"normalize must be entry, {', '.join(NORMALIZATIONS)} or 'm,m,m/s,s,s', got {spec!r}")
    return mean, std


def lora_regex(spec: str, entry: str | None) -> str | None:
    """The regex (PEFT full match over module names) of a ``lora_targets`` value."""
    if spec == "entry":
        return entry
    if spec in LORA_TARGET_SETS:
        return LORA_TARGET_SETS[spec]
    if spec.startswith("suffix:") and spec[7:].strip():
        return suffix_regex([n.strip() for n in spec[7:].split(",") if n.strip()])
    if spec.startswith("re:") and spec[3:]:
        import re

        try:
            re.compile(spec[3:])
        except re.error as e:
            raise ValueError(f"lora_targets {spec!r}: not a regex ({e})") from None
        return spec[3:]
    raise ValueError(f"lora_targets must be entry, {', '.join(LORA_TARGET_SETS)}, suffix:NAME,NAME... or re:REGEX; "
                     f"got {spec!r}")


def parse_value(key: str, text: str):
    """A command-line string as the type of recipe key ``key`` (``aug.FIELD`` for a policy field)."""
    if key.startswith("aug."):
        name = key[4:]
        kinds = {f.name: f for f in fields(AugPolicy)}
        if name not in kinds or name == "source":
            raise KeyError(f"unknown augmentation field {name!r}; known: "
                           f"{', '.join(k for k in kinds if k != 'source')}")
        default = getattr(AugPolicy(), name)
        if name in ("crop_scale", "crop_ratio"):
            if text.strip().lower() in ("none", "null"):
                return None
            v = _literal(text)
            if not (isinstance(v, (list, tuple)) and len(v) == 2):
                raise ValueError(f"aug.{name} takes two numbers, e.g. 0.08,1.0; got {text!r}")
            return tuple(float(a) for a in v)
        return _typed(type(default), text, key)
    fs = {f.name: f for f in fields(Recipe)}
    if key not in fs:
        raise KeyError(f"unknown recipe key {key!r}; known: {', '.join(fs)} (and aug.FIELD)")
    if key == "augment_params":
        v = _literal(text)
        if not isinstance(v, dict):
            raise ValueError(f"augment_params takes a mapping, e.g. '{{\"rotate_deg\": 20}}'; got {text!r}")
        return v
    return _typed(type(getattr(Recipe(), key)), text, key)


def _literal(text: str):
    for load in (json.loads, ast.literal_eval):
        try:
            return load(text)
        except (ValueError, SyntaxError):
            pass
    if "," in text:
        return [p.strip() for p in text.split(",")]
    raise ValueError(f"cannot read {text!r}")


def _typed(typ, text: str, key: str):
    try:
        if typ is bool:
            if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if typ is int:
            return int(text)
        return typ(text)
    except ValueError:
        raise ValueError(f"{key} takes a {typ.__name__}, got {text!r}") from None


# --- the paper's text ---------------------------------------------------------------------------
PAPER_TEXT = Recipe(normalize="imagenet", eval_resize=0, lora_targets="blocks")
TEXT_SAYS = {
    "lr": "1e-4", "weight_decay": "1e-5", "early_stop_patience": "15",
    "augment": "resize 224, flip, rotation, colour jitter, random resized crop (all configurations)",
    "normalize": "ImageNet mean/std", "eval_resize": "resize to 224",
    "lora_targets": "attention and MLP layers of the transformer blocks",
}
TEXT_NOTES = {
    ("efficientnetv2_m", "full"): ["weights: trained from scratch, pretrained=False (text: ImageNet pre-trained)"],
    ("virchow", "lora"): ["head reads the class token only (linear probe: class token ++ patch mean)"],
    ("virchow2", "lora"): ["head reads the class token only (linear probe: class token ++ patch mean)"],
}


def describe(p: AugPolicy) -> str:
    """A short human summary of a policy's parameters."""
    if p.kind == "eval":
        return "no augmentation (the evaluation transform)"
    if p.kind == "resize":
        return "no augmentation (resize only)"
    parts = []
    if p.hflip:
        parts.append("h-flip" if p.hflip == 0.5 else f"h-flip p={p.hflip:g}")
    if p.vflip:
        parts.append(f"v-flip p={p.vflip:g}")
    if p.any_rotation:
        parts.append("any rotation")
    elif p.rotate_deg:
        parts.append(f"rotation +-{p.rotate_deg:g} deg")
    else:
        parts.append("no rotation")
    parts.append("no crop" if tuple(p.crop_scale) == (1.0, 1.0) else
                 f"crop area {p.crop_scale[0]:g}-{p.crop_scale[1]:g}" + ("" if p.crop_ratio is None else " (RRC ratio)"))
    jit = [f"{v:g}" for v in (p.brightness, p.contrast, p.saturation, p.hue)]
    if any(v != "0" for v in jit):
        parts.append("jitter " + "/".join(jit))
    if p.hed_sigma or p.hed_bias:
        parts.append(f"HED {p.hed_sigma:g}/{p.hed_bias:g}")
    return ", ".join(parts)


def departures(model: str, method: str, recipe: Recipe, mean_std: tuple | None = None,
               resize: int | str | None = "?") -> list[str]:
    """Where ``recipe`` (of configuration model/method) departs from the paper's text, one short
    item each. ``mean_std``/``resize``: the configuration's effective normalisation and eval resize
    (entry values resolved), when known."""
    out = []
    text = asdict(PAPER_TEXT)
    mine = asdict(recipe)
    for k in ("lr", "weight_decay", "early_stop_patience"):
        if mine[k] != text[k]:
            out.append(f"{k} {mine[k]:g} (text {TEXT_SAYS[k]})")
    if recipe.augment != "paper" or recipe.augment_params:
        out.append(f"augment {recipe.augment}: {describe(recipe.policy())} (text: {describe(POLICIES['paper'])})")
    if mean_std is not None and (tuple(mean_std[0]), tuple(mean_std[1])) != IMAGENET:
        name = next((k for k, v in NORMALIZATIONS.items() if v == (tuple(mean_std[0]), tuple(mean_std[1]))), None)
        out.append(f"normalisation {name or list(mean_std)} (text ImageNet)")
    if resize not in ("?", None, 0):
        out.append(f"evaluation resize {resize} + centre crop 224 (text: resize to 224)")
    if method == "lora" and lora_regex(recipe.lora_targets, BLOCKS_LORA_TARGETS) != BLOCKS_LORA_TARGETS:
        out.append(f"LoRA targets {recipe.lora_targets}: the blocks and the patch-embedding convolution "
                   f"(text: {TEXT_SAYS['lora_targets']})")
    out += TEXT_NOTES.get((model, method), [])
    return out
