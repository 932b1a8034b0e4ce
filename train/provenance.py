"""What each Table-3 script did: every recipe value with the statement it comes from.

The paper's numbers came from its published scripts (repository DeepMicroscopy/AMi-Br_Benchmark at
commit 3acf4da, the commit the data and Table 3 come from), not from its text. :data:`SCRIPTS`
transcribes, for each of the 17 Table-3 configurations, the value every recipe key had in that
configuration's script, each with the statement it was read from (:class:`Cite`: the script's path
at that commit and the code as written there). The registry builds each configuration's default
recipe from this table (:func:`script_recipe`), and ``ami-train --print-config`` reports the
citation beside each value ("ami default" where the script does not decide it, :func:`origins`).

Import-light (no torch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .recipes import Recipe

REPO = "DeepMicroscopy/AMi-Br_Benchmark"
COMMIT = "3acf4da"  # the commit the data and Table 3 come from; every statement below was read there


@dataclass(frozen=True)
class Cite:
    """The statement of a script that sets a value: its path in the scripts repository at
    :data:`COMMIT` and the code as written there (``...`` elides, two spaces and a parenthesis start
    a note). Line numbers are not recorded: the code is the anchor (``grep -n`` finds it)."""

    script: str
    code: str

    def __str__(self) -> str:
        return f"{self.script}: `{self.code}` [{REPO}@{COMMIT}]"


E2E = "End-to-End_DL_Baselines/{m}/{m}.py"
LIN = "Foundation_Models/Linear_Probing/{m}/{f}.py"
LORA = "Foundation_Models/LoRA/{m}/{f}.py"

COMMON = {"epochs": (100, "num_epochs = 100"), "batch_size": (8, "batch_size = 8"),
          "optimizer": ("adam", "optimizer = optim.Adam(model.parameters(), lr=..., weight_decay=...)"),
          "scheduler": ("plateau", "optim.lr_scheduler.ReduceLROnPlateau(  (mode='max', factor=0.5, patience=3, "
                                   "min_lr=1e-7)"),
          "sampling": ("balanced", "sampler = WeightedRandomSampler(sample_weights, len(sample_weights), "
                                   "replacement=True)"),
          "loss": ("bce", "criterion = nn.BCEWithLogitsLoss()")}


def _adam(lr: str, wd: str) -> str:
    return f"optimizer = optim.Adam(model.parameters(), lr={lr}, weight_decay={wd})"


_E2E_HEAD = {"efficientnetv2_m": "self.model.classifier = nn.Linear(self.model.classifier.in_features, 1)",
             "vit_large_patch16_224": "self.model.head = nn.Linear(self.model.head.in_features, 1)",
             "swin_base_patch4_window7_224": "nn.Linear(self.model.num_features, 1)"}
_E2E_NORM = {"swin_base_patch4_window7_224": "transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])"}
_E2E_JITTER = {"swin_base_patch4_window7_224": "transforms.ColorJitter(0.2, 0.2, 0.2, 0.1)"}


def _e2e(m: str) -> dict:
    jitter = _E2E_JITTER.get(m, "transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)")
    return {
        "head_init": ("linear", _E2E_HEAD[m]),
        "lr": (5e-5, _adam("5e-5", "1e-5")), "weight_decay": (1e-5, _adam("5e-5", "1e-5")),
        "early_stop_patience": (15, "early_stop_patience = 15"),
        "augment": ("script_e2e", "transforms.Resize((224, 224)), ... transforms.RandomRotation(10), "
                                  f"{jitter}, transforms.RandomResizedCrop(224, scale=(0.8, 1.0))"),
        "normalize": ("imagenet", _E2E_NORM.get(m, "transforms.Normalize(mean=[0.485, 0.456, 0.406], "
                                                   "std=[0.229, 0.224, 0.225])")),
        "eval_resize": (0, "transforms.Resize((224, 224))  (val_transform)"),
        "eval_interpolation": ("bilinear", "transforms.Resize((224, 224))  (torchvision's default: bilinear)"),
    }


def _linear(lr: str, wd: str, *, head: str, geometry: str, normalize: str, embedding: str,
            patience: str = "early_stop_patience = 15") -> dict:
    code = _adam(lr, wd)
    return {"lr": (float(lr), code), "weight_decay": (float(wd), code), "early_stop_patience": (15, patience),
            "augment": ("eval", "class EmbeddingDataset(Dataset):  (embeddings extracted once, evaluation "
                                "transform)"),
            "head_init": ("linear", head),
            "eval_resize": (-1, geometry), "eval_interpolation": ("entry", geometry),
            "normalize": ("entry", normalize), "embedding": ("entry", embedding)}


_LORA_CONFIG = 'LoraConfig( ... target_modules=["qkv", "proj", "fc1", "fc2"], lora_dropout=0.3,'


def _lora(augment: tuple, head: tuple, *, normalize=None, geometry: tuple | None = None, embedding=None) -> dict:
    out = {"lr": (5e-5, _adam("5e-5", "1e-5")), "weight_decay": (1e-5, _adam("5e-5", "1e-5")),
           "early_stop_patience": (10, "early_stop_patience = 10"),
           "lora_rank": (8, "r=8,"), "lora_alpha": (16, "lora_alpha=16,"), "lora_dropout": (0.3, "lora_dropout=0.3,"),
           "lora_targets": ("script", _LORA_CONFIG + "  (PEFT suffix match: also patch_embed.proj)"),
           "augment": augment, "head_init": head}
    if normalize:
        out["normalize"] = normalize
    if geometry:
        out["eval_resize"], out["eval_interpolation"] = geometry
    if embedding:
        out["embedding"] = embedding
    return out


_RRC = ("script_lora_rrc", "transforms.RandomResizedCrop(224), ... transforms.RandomRotation(15), "
                           "transforms.ColorJitter(brightness=0.2, contrast=0.2),")
_RESIZE_CROP = ((0, "transforms.Resize(224), transforms.CenterCrop(224),  (val_transform)"),
                ("bilinear", "transforms.Resize(224),  (torchvision's default: bilinear)"))
_RESIZE = ((0, "transforms.Resize(224),  (val_transform)"),
           ("bilinear", "transforms.Resize(224),  (torchvision's default: bilinear)"))
_IMAGENET_LORA = ("imagenet", "transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),")
_TIMM_TF = "resolve_data_config(  (timm's data config of the hub model; ami: the entry's model-card " \
           "preprocessing, the hub's pretrained_cfg is not readable offline)"
_HOPT_NORM = "mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517)"
_PIL_RESIZE = 'Image.open(img_path).convert("RGB").resize((224, 224))  (Pillow\'s default filter: bicubic)'
_HOPT_HEAD = ("linear", "base_model.head = nn.Linear(base_model.num_features, 1)")
_TIMM_HEAD = "num_classes=1,  (timm's constructor builds the head: trunc_normal_(std=.02), zero bias)"


def _virchow_lora() -> dict:
    """Virchow and Virchow2 LoRA: the same script body (RRC 0.8-1, flip, jitter, no rotation;
    0.5/0.5 normalisation; logit from the class token of a reset_classifier head)."""
    return _lora(("script_virchow_lora", "transforms.RandomResizedCrop(224, scale=(0.8, 1.0)), ... "
                                         "transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, "
                                         "hue=0.1),  (no rotation)"),
                 ("linear", "base_model.reset_classifier(num_classes=1)"),
                 normalize=("half", "transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))"),
                 geometry=_RESIZE_CROP,
                 embedding=("cls", "outputs = outputs[:, 0]"))


def _linear_vit(name: str, model_var: str, dim: int, embedding: str) -> dict:
    """UNI, UNI2-h, Virchow, Virchow2 linear probes: Adam 5e-5 / 1e-5, timm's data config, a new
    ``nn.Linear(dim, 1)`` classifier."""
    return _linear("5e-5", "1e-5", head=f"self.classifier = nn.Linear({dim}, 1)", geometry=_TIMM_TF,
                   normalize=_TIMM_TF, embedding=embedding.format(model=model_var))


# (model, method) -> (script path at COMMIT, {recipe key: (value, code)})
SCRIPTS: dict[tuple[str, str], tuple[str, dict]] = {
    ("efficientnetv2_m", "full"): (E2E.format(m="efficientnetv2_m"), _e2e("efficientnetv2_m")),
    ("vit_large_patch16_224", "full"): (E2E.format(m="vit_large_patch16_224"), _e2e("vit_large_patch16_224")),
    ("swin_base_patch4_window7_224", "full"): (E2E.format(m="swin_base_patch4_window7_224"),
                                               _e2e("swin_base_patch4_window7_224")),
    ("uni", "linear"): (LIN.format(m="uni", f="uni"),
                        _linear_vit("uni", "uni_model", 1024, "output = {model}(  (timm's pooled class token)")),
    ("uni2_h", "linear"): (LIN.format(m="uni2-h", f="uni2-h"),
                           _linear_vit("uni2_h", "uni2h_model", 1536, "self.classifier = nn.Linear(1536, 1)  "
                                                                      "(on the model's pooled class token)")),
    ("virchow", "linear"): (LIN.format(m="Virchow", f="virchow"),
                            _linear_vit("virchow", "virchow_model", 2560,
                                        "embedding = torch.cat([class_token, patch_tokens.mean(1)], dim=-1)  "
                                        "(patch_tokens = output[:, 1:])")),
    ("virchow2", "linear"): (LIN.format(m="Virchow2", f="virchow2"),
                             _linear_vit("virchow2", "virchow_model", 2560,
                                         "embedding = torch.cat([class_token, patch_tokens.mean(1)], dim=-1)  "
                                         "(patch_tokens = output[:, 5:])")),
    ("prov_gigapath", "linear"): (LIN.format(m="prov-gigapath", f="prov-gigapath"),
                                  _linear("1e-3", "1e-4", head="self.classifier = nn.Linear(1536, 1)",
                                          geometry="transforms.Resize(256, interpolation=transforms.InterpolationMode."
                                                   "BICUBIC), transforms.CenterCrop(224),",
                                          normalize="transforms.Normalize(mean=(0.485, 0.456, 0.406), "
                                                    "std=(0.229, 0.224, 0.225))",
                                          embedding="self.classifier = nn.Linear(1536, 1)  (on the model's "
                                                    "class token)")),
    ("h_optimus_0", "linear"): (LIN.format(m="h-optimus-0", f="hoptimus0"),
                                _linear("5e-5", "1e-5", head="self.classifier = nn.Linear(1536, 1)",
                                        patience="early_stopping_patience = 15", geometry=_PIL_RESIZE,
                                        normalize=_HOPT_NORM, embedding="self.classifier = nn.Linear(1536, 1)  "
                                                                        "(on the model's class token)")),
    ("h_optimus_1", "linear"): (LIN.format(m="h-optimus-1", f="hoptimus1"),
                                _linear("5e-5", "1e-5", head="self.classifier = nn.Linear(1536, 1)",
                                        patience="early_stopping_patience = 15", geometry=_PIL_RESIZE,
                                        normalize=_HOPT_NORM, embedding="self.classifier = nn.Linear(1536, 1)  "
                                                                        "(on the model's class token)")),
    ("uni", "lora"): (LORA.format(m="uni", f="uni_lora"),
                      _lora(_RRC, ("timm", _TIMM_HEAD), geometry=_RESIZE_CROP, normalize=_IMAGENET_LORA)),
    ("uni2_h", "lora"): (LORA.format(m="uni2-h", f="uni2-h_lora"),
                         _lora(("eval", "train_transform = create_transform(**resolve_data_config(model.pretrained_cfg, "
                                        "model=model))  (= val_transform)"),
                               ("timm", "'num_classes': 1,  (in timm_kwargs; timm's constructor builds the head: "
                                        "trunc_normal_(std=.02), zero bias)"))),
    ("virchow", "lora"): (LORA.format(m="Virchow", f="virchow_lora"), _virchow_lora()),
    ("virchow2", "lora"): (LORA.format(m="Virchow2", f="virchow2_lora"), _virchow_lora()),
    ("prov_gigapath", "lora"): (LORA.format(m="prov-gigapath", f="prov-gigapath_lora"),
                                _lora(_RRC, ("timm", _TIMM_HEAD), geometry=_RESIZE_CROP, normalize=_IMAGENET_LORA)),
    ("h_optimus_0", "lora"): (LORA.format(m="h-optimus-0", f="hoptimus0"), _lora(_RRC, _HOPT_HEAD, geometry=_RESIZE)),
    ("h_optimus_1", "lora"): (LORA.format(m="h-optimus-1", f="hoptimus1"),
                              _lora(("script_lora_resize", "transforms.Resize(224), ... transforms.RandomRotation(15), "
                                                           "transforms.ColorJitter(brightness=0.2, contrast=0.2),  "
                                                           "(train_transform: no crop)"),
                                    _HOPT_HEAD, geometry=_RESIZE)),
}
for _path, _vals in SCRIPTS.values():  # keys common to every script, cited from the configuration's own script
    for _key, _val in COMMON.items():
        _vals.setdefault(_key, _val)


def script_recipe(model: str, method: str, base: Recipe | None = None) -> Recipe:
    """The recipe of a Table-3 configuration: what its script did, on top of ``base`` (the text)."""
    _, vals = SCRIPTS[(model, method)]
    return replace(base or Recipe(), **{k: v[0] for k, v in vals.items()})


_NOT_IN_SCRIPTS = {k: "the scripts have none: off" for k in ("warmup_epochs", "label_smoothing", "mixup_alpha",
                                                              "ema_decay", "drop_rate", "drop_path_rate")}
_NOT_IN_SCRIPTS["seed"] = "the scripts set no seed"
_NOT_IN_SCRIPTS["augment_params"] = "the policy as declared"


def origins(model: str, method: str, recipe: Recipe, overridden=()) -> dict[str, str]:
    """Each recipe key's origin: the script statement, the command line, or "ami default"."""
    script = SCRIPTS.get((model, method))
    out = {}
    for k, v in asdict(recipe).items():
        if k in overridden:
            out[k] = "command line (--set / --config / --epochs)"
        elif script and k in script[1] and script[1][k][0] == v:
            out[k] = str(Cite(script[0], script[1][k][1]))
        elif script and k in script[1]:
            out[k] = f"ami default (differs from the script's {script[1][k][0]!r})"
        elif k in _NOT_IN_SCRIPTS and v == getattr(Recipe(), k):
            out[k] = f"ami default ({_NOT_IN_SCRIPTS[k]})"
        else:
            out[k] = "ami default"
    return out
