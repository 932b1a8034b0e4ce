"""The pathology foundation models of the paper (and H0-mini): linear probe or LoRA. :data:`ENTRIES`, in
``ami-train --list`` order; :mod:`ami.train.registry` registers every family's."""

from __future__ import annotations

from dataclasses import replace

from ami.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

from .provenance import script_recipe
from .recipes import HOPTIMUS
from .registry_core import VIT_LORA_TARGETS, ModelConfig

ENTRIES: list[ModelConfig] = []

# Pathology foundation models: frozen backbone + linear probe, or LoRA. Creation kwargs follow
# each model card / hub config.json so that the hub checkpoint loads strictly into the registry's
# architecture (the weights are loaded into *this* architecture, never into one timm guesses).
# params_m is the parameter count of that architecture without a head (counted on the meta
# device, see tests/test_registry.py); embed_dim is what the embedding rule produces.
FM_METHODS = ("linear", "lora")
HOPTIMUS_MEAN, HOPTIMUS_STD = HOPTIMUS  # H-optimus' own statistics (ami.train.recipes): one definition
_SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
_TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # same family and special kwargs, shrunk

ENTRIES.append(ModelConfig(
    name="uni", arch="vit_large_patch16_224", display="UNI", family="foundation", methods=FM_METHODS,
    hub_id="hf-hub:MahmoodLab/uni",
    preprocess=Preprocess(224, None, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
    create_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    head="head", embedding="cls", embed_dim=1024, num_prefix_tokens=1, lora_targets=VIT_LORA_TARGETS,
    recipe=script_recipe("uni", "linear"), lora_recipe=script_recipe("uni", "lora"),
    params_m=303.4, tiny_kwargs=dict(_TINY_VIT), table3=True,
    notes="ViT-L/16, LayerScale (init_values 1e-5); model card: Resize(224) + ImageNet mean/std",
))
ENTRIES.append(ModelConfig(
    name="uni2_h", arch="vit_giant_patch14_224", display="UNI2-h", family="foundation", methods=FM_METHODS,
    hub_id="hf-hub:MahmoodLab/UNI2-h",
    preprocess=Preprocess(224, None, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
    create_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                   "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, **_SWIGLU,
                   "reg_tokens": 8, "dynamic_img_size": True},
    head="head", embedding="cls", embed_dim=1536, num_prefix_tokens=9, lora_targets=VIT_LORA_TARGETS,
    recipe=script_recipe("uni2_h", "linear"), lora_recipe=script_recipe("uni2_h", "lora"),
    params_m=681.4, tiny_kwargs=dict(_TINY_VIT), table3=True,
    notes="ViT-H/14-like (1536 wide, 24 deep), SwiGLUPacked + SiLU, 8 register tokens, no_embed_class",
))
ENTRIES.append(ModelConfig(
    name="virchow", arch="vit_huge_patch14_224", display="Virchow", family="foundation", methods=FM_METHODS,
    hub_id="hf-hub:paige-ai/Virchow",
    preprocess=Preprocess(224, None, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    create_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, **_SWIGLU},
    head="head", embedding="cls+mean", embed_dim=2560, num_prefix_tokens=1, lora_targets=VIT_LORA_TARGETS,
    recipe=script_recipe("virchow", "linear"), lora_recipe=script_recipe("virchow", "lora"),
    params_m=631.2, tiny_kwargs=dict(_TINY_VIT), table3=True,
    notes="ViT-H/14, SwiGLUPacked + SiLU; embedding = class token ++ mean of patch tokens; model card "
          "preprocessing (ImageNet mean/std, bicubic) - the paper's Virchow LoRA scripts used mean = std = 0.5",
))
ENTRIES.append(ModelConfig(
    name="virchow2", arch="vit_huge_patch14_224", display="Virchow2", family="foundation", methods=FM_METHODS,
    hub_id="hf-hub:paige-ai/Virchow2",
    preprocess=Preprocess(224, None, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    create_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, **_SWIGLU, "reg_tokens": 4,
                   "dynamic_img_size": True},
    head="head", embedding="cls+mean", embed_dim=2560, num_prefix_tokens=5, lora_targets=VIT_LORA_TARGETS,
    recipe=script_recipe("virchow2", "linear"), lora_recipe=script_recipe("virchow2", "lora"),
    params_m=631.2, tiny_kwargs=dict(_TINY_VIT), table3=True,
    notes="ViT-H/14, SwiGLUPacked + SiLU, 4 register tokens; embedding = class token ++ mean of patch "
          "tokens (register tokens excluded); model card preprocessing (the paper's LoRA scripts used 0.5/0.5)",
))
ENTRIES.append(ModelConfig(
    name="prov_gigapath", arch="vit_giant_patch14_dinov2", display="Prov-GigaPath", family="foundation",
    methods=FM_METHODS, hub_id="hf-hub:prov-gigapath/prov-gigapath",
    preprocess=Preprocess(224, 256, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    create_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                   "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334},
    head="head", embedding="cls", embed_dim=1536, num_prefix_tokens=1, lora_targets=VIT_LORA_TARGETS,
    recipe=script_recipe("prov_gigapath", "linear"), lora_recipe=script_recipe("prov_gigapath", "lora"),
    params_m=1135.0, tiny_kwargs=dict(_TINY_VIT), table3=True,
    notes="ViT-g/16 (timm's DINOv2 giant: SwiGLUPacked + SiLU); resize 256 bicubic, centre crop 224",
))
_H_OPTIMUS_0 = ModelConfig(
    name="h_optimus_0", arch="vit_giant_patch14_reg4_dinov2", display="H-optimus-0", family="foundation",
    methods=FM_METHODS, hub_id="hf-hub:bioptimus/H-optimus-0",
    preprocess=Preprocess(224, None, "bicubic", HOPTIMUS_MEAN, HOPTIMUS_STD),
    create_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
    head="head", embedding="cls", embed_dim=1536, num_prefix_tokens=5, lora_targets=VIT_LORA_TARGETS,
    recipe=script_recipe("h_optimus_0", "linear"), lora_recipe=script_recipe("h_optimus_0", "lora"),
    params_m=1134.8, tiny_kwargs=dict(_TINY_VIT), table3=True,
    notes="ViT-g/14, SwiGLUPacked + SiLU, 4 register tokens; trained at 0.5 um/px (these crops are "
          "0.25 um/px)",
)
ENTRIES.append(_H_OPTIMUS_0)
ENTRIES.append(replace(
    _H_OPTIMUS_0, name="h_optimus_1", display="H-optimus-1", hub_id="hf-hub:bioptimus/H-optimus-1",
    recipe=script_recipe("h_optimus_1", "linear"), lora_recipe=script_recipe("h_optimus_1", "lora"),
    notes="same architecture and loading as H-optimus-0 (model card: init_values 1e-5, "
          "dynamic_img_size False)",
))
ENTRIES.append(ModelConfig(
    name="h0_mini", arch="vit_base_patch14_reg4_dinov2", display="H0-mini", family="foundation",
    methods=FM_METHODS, hub_id="hf-hub:bioptimus/H0-mini",
    preprocess=Preprocess(224, None, "bicubic", HOPTIMUS_MEAN, HOPTIMUS_STD),
    create_kwargs={"img_size": 224, "mlp_ratio": 5.33334, **_SWIGLU},
    head="head", embedding="cls", embed_dim=768, num_prefix_tokens=5, lora_targets=VIT_LORA_TARGETS,
    params_m=85.7, tiny_kwargs=dict(_TINY_VIT),
    notes="ViT-B/14 distilled from H-optimus-0, SwiGLUPacked + SiLU (model card), 4 register tokens; "
          "mlp_ratio 5.33334 = DINOv2's SwiGLU width (2048, packed 4096), which gives the card's 86 M; "
          "class token (768) as embedding (the card also offers ++ patch mean); named in the paper, not in "
          "Table 3",
))
