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

The paper's numbers came from its published scripts (repository DeepMicroscopy/AMi-Br_Benchmark),
not from its text. :data:`SCRIPTS` transcribes, for each of the 17 Table-3 configurations, the
value every recipe key had in that configuration's script, each with the statement it comes from
(:class:`Cite`): path, the code as written, and which copy of the script it was read in. The
registry builds each configuration's default recipe from this table (:func:`script_recipe`), and
``ami-train --print-config`` reports the citation beside each value ("ami default" where the
script does not decide it). :data:`PAPER_TEXT` is the protocol as the text states it;
:func:`departures` lists where a configuration's recipe departs from it.

Import-light (no torch): ``ami-train --list`` and the registry use it anywhere.
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass, field, fields, replace

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
NORMALIZATIONS = {"imagenet": IMAGENET, "half": HALF, "hoptimus": HOPTIMUS}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
EMBEDDINGS = ("cls", "cls+mean", "mean", "pool")

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


_TV = "torchvision"
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


# --- what the scripts did --------------------------------------------------------------------------
REPO = "DeepMicroscopy/AMi-Br_Benchmark"
# Where a statement was read. The upstream repository's own files in the search index are an OLDER
# state than the one docs/reproduce.md follows (e.g. ViT-L lr=1e-4 there); the fork below holds the
# scripts in the state that ../shared/docs/paper-scripts.md describes (commit 3acf4da upstream).
FORK = "Git-Vaaaaaaal/optima_lora@93d42e7"
NOTES = "paper-scripts.md"  # stated in the project's reading of commit 3acf4da, no readable copy here


@dataclass(frozen=True)
class Cite:
    """The statement of a script that sets a value: path in the scripts repository, the code as
    written, and the copy it was read in (FORK, an upstream commit, or NOTES when only the
    project's notes state it). Line numbers are not recorded: the copies differ in layout; the
    code is the anchor (``grep -n`` finds it in any version)."""

    script: str
    code: str
    seen: str = FORK

    def __str__(self) -> str:
        return f"{self.script}: `{self.code}` [read in {self.seen}]"


E2E = "End-to-End_DL_Baselines/{m}/{m}.py"
LIN = "Foundation_Models/Linear_Probing/{m}/{f}.py"
LORA = "Foundation_Models/LoRA/{m}/{f}_lora.py"

_COMMON = {"epochs": (100, "num_epochs = 100"), "batch_size": (8, "batch_size = 8"),
           "optimizer": ("adam", "optimizer = optim.Adam(model.parameters(), lr=..., weight_decay=...)"),
           "scheduler": ("plateau", "optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode='max', factor=0.5, "
                                    "patience=3, min_lr=1e-7)"),
           "sampling": ("balanced", "sampler = WeightedRandomSampler(sample_weights, len(sample_weights), "
                                    "replacement=True)"),
           "loss": ("bce", "criterion = nn.BCEWithLogitsLoss()")}


def _adam(lr: str, wd: str) -> str:
    return f"optimizer = optim.Adam(model.parameters(), lr={lr}, weight_decay={wd})"


def _e2e(m: str, seen: str, lr_seen: str | None = None) -> dict:
    lr_seen = lr_seen or seen
    return {
        "lr": (5e-5, _adam("5e-5", "1e-5"), lr_seen), "weight_decay": (1e-5, _adam("5e-5", "1e-5"), lr_seen),
        "early_stop_patience": (15, "early_stop_patience = 15", seen),
        "augment": ("script_e2e", "train_transform = transforms.Compose([transforms.Resize((224, 224)), "
                                  "transforms.RandomHorizontalFlip(), transforms.RandomRotation(10), "
                                  "transforms.ColorJitter(...0.2, 0.2, 0.2, 0.1), "
                                  "transforms.RandomResizedCrop(224, scale=(0.8, 1.0)), ...])", seen),
        "normalize": ("imagenet", "transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])", seen),
        "eval_resize": (0, "val_transform = transforms.Compose([transforms.Resize((224, 224)), ...])", seen),
        "eval_interpolation": ("bilinear", "transforms.Resize((224, 224))  (torchvision's default: bilinear)", seen),
    }


def _linear(lr: str, wd: str, seen: str, *, geometry: str, normalize: str, embedding: str,
            patience_code: str = "early_stop_patience = 15") -> dict:
    code = _adam(lr, wd)
    return {"lr": (float(lr), code, seen), "weight_decay": (float(wd), code, seen),
            "early_stop_patience": (15, patience_code, seen),
            "augment": ("eval", "embeddings extracted once from the evaluation transform (EmbeddingDataset)", seen),
            "eval_resize": (-1, geometry, seen), "eval_interpolation": ("entry", geometry, seen),
            "normalize": ("entry", normalize, seen), "embedding": ("entry", embedding, seen)}


def _lora(seen: str, augment: tuple, *, normalize=None, geometry: tuple | None = None, embedding=None,
          lr_seen: str | None = None) -> dict:
    lora = "LoraConfig(r=8, lora_alpha=16, target_modules=[\"qkv\", \"proj\", \"fc1\", \"fc2\"], lora_dropout=0.3, " \
           "bias=\"none\", modules_to_save=[\"head\"])"
    lr_seen = lr_seen or seen
    out = {"lr": (5e-5, _adam("5e-5", "1e-5"), lr_seen), "weight_decay": (1e-5, _adam("5e-5", "1e-5"), lr_seen),
           "early_stop_patience": (10, "early_stop_patience = 10", seen),
           "lora_rank": (8, lora, seen), "lora_alpha": (16, lora, seen), "lora_dropout": (0.3, lora, seen),
           "lora_targets": ("script", lora + "  (PEFT suffix match: also patch_embed.proj)", seen),
           "augment": augment}
    if normalize:
        out["normalize"] = normalize
    if geometry:
        out["eval_resize"], out["eval_interpolation"] = geometry
    if embedding:
        out["embedding"] = embedding
    return out


_RRC = ("script_lora_rrc", "train_transform = transforms.Compose([transforms.RandomResizedCrop(224), "
                           "transforms.RandomHorizontalFlip(), transforms.RandomRotation(15), "
                           "transforms.ColorJitter(brightness=0.2, contrast=0.2), ...])")
_RESIZE_CROP = ((0, "val_transform = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), ...])"),
                ("bilinear", "transforms.Resize(224)  (torchvision's default: bilinear)"))
_RESIZE = ((0, "val_transform = transforms.Compose([transforms.Resize(224), ...])"),
           ("bilinear", "transforms.Resize(224)  (torchvision's default: bilinear)"))
_UP = "upstream {} (older state)"
_TIMM_TF = "timm resolve_data_config(model.pretrained_cfg) + create_transform of the hub model " \
           "(ami: the entry's model-card preprocessing; the hub's pretrained_cfg is not readable offline)"


# (model, method) -> script path, {key: (value, code, seen)}
def _virchow_lora(commit: str):
    """Virchow and Virchow2 LoRA: the same script body (RRC 0.8-1, flip, jitter, no rotation;
    0.5/0.5 normalisation; logit from the class token), read at each script's own commit."""
    return _lora(_UP.format(commit),
                 ("script_virchow_lora", "transforms.RandomResizedCrop(224, scale=(0.8, 1.0)), "
                                         "transforms.RandomHorizontalFlip(), transforms.ColorJitter("
                                         "brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)"),
                 normalize=("half", "transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))"),
                 geometry=_RESIZE_CROP,
                 embedding=("cls", "base_model.reset_classifier(num_classes=1) ... "
                                   "outputs = outputs[:, 0]  # Use CLS token"))


SCRIPTS: dict[tuple[str, str], tuple[str, dict]] = {
    ("efficientnetv2_m", "full"): (E2E.format(m="efficientnetv2_m"), _e2e("efficientnetv2_m", FORK)),
    ("vit_large_patch16_224", "full"): (E2E.format(m="vit_large_patch16_224"),
                                        _e2e("vit_large_patch16_224", _UP.format("bb58e45"), lr_seen=FORK)),
    ("swin_base_patch4_window7_224", "full"): (E2E.format(m="swin_base_patch4_window7_224"),
                                               _e2e("swin_base_patch4_window7_224", FORK)),
    ("uni", "linear"): (LIN.format(m="uni", f="uni"),
                        _linear("5e-5", "1e-5", FORK, geometry=_TIMM_TF, normalize=_TIMM_TF,
                                embedding="output = uni_model(image_tensor)  (timm's pooled class token); "
                                          "self.classifier = nn.Linear(1024, 1)")),
    ("uni2_h", "linear"): (LIN.format(m="uni2-h", f="uni2-h"),
                           _linear("5e-5", "1e-5", NOTES, geometry=_TIMM_TF, normalize=_TIMM_TF,
                                   embedding="output = uni2h_model(image_tensor)  (class token); "
                                             "self.classifier = nn.Linear(1536, 1)")),
    ("virchow", "linear"): (LIN.format(m="Virchow", f="virchow"),
                            _linear("5e-5", "1e-5", NOTES, geometry=_TIMM_TF, normalize=_TIMM_TF,
                                    embedding="embedding = torch.cat([class_token, patch_tokens.mean(1)], dim=-1)  "
                                              "(patch_tokens = output[:, 1:])")),
    ("virchow2", "linear"): (LIN.format(m="Virchow2", f="virchow2"),
                             _linear("5e-5", "1e-5", FORK, geometry=_TIMM_TF, normalize=_TIMM_TF,
                                     embedding="embedding = torch.cat([class_token, patch_tokens.mean(1)], dim=-1)  "
                                               "(patch_tokens = output[:, 5:])")),
    ("prov_gigapath", "linear"): (LIN.format(m="prov-gigapath", f="prov-gigapath"),
                                  _linear("1e-3", "1e-4", FORK,
                                          geometry="transforms.Resize(256, interpolation=transforms.InterpolationMode."
                                                   "BICUBIC), transforms.CenterCrop(224)",
                                          normalize="transforms.Normalize(mean=(0.485, 0.456, 0.406), "
                                                    "std=(0.229, 0.224, 0.225))",
                                          embedding="output = gigapath_model(image_tensor)  (class token); "
                                                    "self.classifier = nn.Linear(1536, 1)")),
    ("h_optimus_0", "linear"): ("Foundation_Models/Linear_Probing/h-optimus-0/hoptimus0.py (fork name; upstream: "
                                "h-optimus-0.py)",
                                _linear("5e-5", "1e-5", FORK, patience_code="early_stopping_patience = 15",
                                        geometry="Image.open(img_path).convert(\"RGB\").resize((224, 224))  "
                                                 "(Pillow's default filter: bicubic)",
                                        normalize="transforms.Normalize(mean=(0.707223, 0.578729, 0.703617), "
                                                  "std=(0.211883, 0.230117, 0.177517))",
                                        embedding="features = hoptimus_model(tensor)  (class token); "
                                                  "self.classifier = nn.Linear(1536, 1)")),
    ("h_optimus_1", "linear"): (LIN.format(m="h-optimus-1", f="h-optimus-1"),
                                _linear("5e-5", "1e-5", _UP.format("78b5dd0"), patience_code="early_stopping_patience = 15",
                                        geometry="Image.open(img_path).convert(\"RGB\").resize((224, 224))  "
                                                 "(Pillow's default filter: bicubic)",
                                        normalize="transforms.Normalize(mean=(0.707223, 0.578729, 0.703617), "
                                                  "std=(0.211883, 0.230117, 0.177517))",
                                        embedding="features = hoptimus_model(tensor)  (class token)")),
    ("uni", "lora"): (LORA.format(m="uni", f="uni"),
                      _lora(_UP.format("cc54045"), _RRC, geometry=_RESIZE_CROP,
                            normalize=("imagenet", "transforms.Normalize(mean=[0.485, 0.456, 0.406], "
                                                   "std=[0.229, 0.224, 0.225])"))),
    ("uni2_h", "lora"): (LORA.format(m="uni2-h", f="uni2-h"),
                         _lora(_UP.format("9703f39"), ("eval", "train_transform = create_transform(**resolve_data_config("
                                                              "model.pretrained_cfg, model=model))  (= val_transform)"))),
    ("virchow", "lora"): (LORA.format(m="Virchow", f="virchow"),
                          _virchow_lora("405b185")),
    ("virchow2", "lora"): (LORA.format(m="Virchow2", f="virchow2"),
                           _virchow_lora("fc3a199")),
    ("prov_gigapath", "lora"): (LORA.format(m="prov-gigapath", f="prov-gigapath"),
                                _lora(_UP.format("5c56efb"), _RRC, geometry=_RESIZE_CROP,
                                      normalize=("imagenet", "transforms.Normalize(mean=[0.485, 0.456, 0.406], "
                                                             "std=[0.229, 0.224, 0.225])"))),
    ("h_optimus_0", "lora"): (LORA.format(m="h-optimus-0", f="h-optimus-0"),
                              _lora(NOTES, _RRC, geometry=_RESIZE)),
    ("h_optimus_1", "lora"): ("Foundation_Models/LoRA/h-optimus-1/hoptimus1.py (fork name; upstream: "
                              "h-optimus-1_lora.py)",
                              _lora(FORK, ("script_lora_resize", "train_transform = transforms.Compose(["
                                                                 "transforms.Resize(224), transforms.RandomHorizontalFlip(), "
                                                                 "transforms.RandomRotation(15), transforms.ColorJitter("
                                                                 "brightness=0.2, contrast=0.2), ...])"),
                                    geometry=_RESIZE)),
}
# keys common to every script, cited from the configuration's own script
for _k, (_path, _vals) in SCRIPTS.items():
    _seen = next(iter(_vals.values()))[2] if _vals and len(next(iter(_vals.values()))) == 3 else FORK
    for _key, (_v, _code) in _COMMON.items():
        _vals.setdefault(_key, (_v, _code, _seen))
    for _key, _val in list(_vals.items()):
        if len(_val) == 2:
            _vals[_key] = _val + (_seen,)

# Where the older upstream copies in the search index disagree with the state followed here
# (recorded in docs/reproduce.md; a reader holding upstream 3acf4da can check these statements).
OLDER_UPSTREAM = {
    ("vit_large_patch16_224", "full"): "upstream bb58e45: lr=1e-4",
    ("swin_base_patch4_window7_224", "full"): "upstream 171a665: lr=1e-4",
    ("uni", "linear"): "upstream 86cf2fd: lr=1e-3, weight_decay=1e-4",
    ("uni2_h", "linear"): "upstream 2ab2666: lr=1e-3, weight_decay=1e-4",
    ("virchow", "linear"): "upstream 1874ab4: lr=1e-3, weight_decay=1e-4",
    ("virchow2", "linear"): "upstream 75898c2: lr=1e-3, weight_decay=1e-4",
    ("h_optimus_0", "linear"): "upstream 222d79e: head Linear(1536,512)-ReLU-Dropout(0.5)-Linear(512,1)",
    ("h_optimus_1", "linear"): "upstream 78b5dd0: head Linear(1536,512)-ReLU-Dropout(0.3)-Linear(512,1)",
    ("h_optimus_0", "lora"): "upstream 0489d19: lr=1e-3, weight_decay=1e-4; train transform Resize(224) (no crop)",
    ("h_optimus_1", "lora"): "upstream e9d02744: lr=1e-3, weight_decay=1e-4",
}


def script_recipe(model: str, method: str, base: Recipe | None = None) -> Recipe:
    """The recipe of a Table-3 configuration: what its script did, on top of ``base`` (the text)."""
    _, vals = SCRIPTS[(model, method)]
    return replace(base or Recipe(), **{k: v[0] for k, v in vals.items()})


def origins(model: str, method: str, recipe: Recipe, overridden=()) -> dict[str, str]:
    """Each recipe key's origin: the script statement, the command line, or "ami default"."""
    script = SCRIPTS.get((model, method))
    out = {}
    for k, v in asdict(recipe).items():
        if k in overridden:
            out[k] = "command line (--set / --config / --epochs)"
        elif script and k in script[1] and script[1][k][0] == v:
            out[k] = str(Cite(script[0], script[1][k][1], script[1][k][2]))
        elif script and k in script[1]:
            out[k] = f"ami default (differs from the script's {script[1][k][0]!r})"
        elif k in _NOT_IN_SCRIPTS and v == getattr(Recipe(), k):
            out[k] = f"ami default ({_NOT_IN_SCRIPTS[k]})"
        else:
            out[k] = "ami default"
    return out


_NOT_IN_SCRIPTS = {k: "the scripts have none: off" for k in ("warmup_epochs", "label_smoothing", "mixup_alpha",
                                                              "ema_decay", "drop_rate", "drop_path_rate")}
_NOT_IN_SCRIPTS["seed"] = "the scripts set no seed"
_NOT_IN_SCRIPTS["augment_params"] = "the policy as declared"


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
