"""The paper's end-to-end baselines (timm, one-logit head, whole network trained). :data:`ENTRIES`, in
``ami-train --list`` order; :mod:`ami.train.registry` registers every family's."""

from __future__ import annotations

from ami.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

from .provenance import script_recipe
from .registry_core import SWIN_LORA_TARGETS, VIT_LORA_TARGETS, ModelConfig

ENTRIES: list[ModelConfig] = []

# End-to-end baselines of the paper (timm, single-logit head, whole network trained).
ENTRIES.append(ModelConfig(
    name="efficientnetv2_m", arch="efficientnetv2_m", display="EfficientNetV2", family="e2e",
    methods=("full",), pretrained=False, preprocess=Preprocess(224, None, "bicubic"),
    head="classifier", embedding="pool", embed_dim=1280, params_m=54.1,
    tiny_arch="efficientnetv2_rw_t", table3=True, recipe=script_recipe("efficientnetv2_m", "full"),
    notes="the public script builds it with no pretrained weights",
))
ENTRIES.append(ModelConfig(
    name="vit_large_patch16_224", arch="vit_large_patch16_224", display="ViT-L (e2e)", family="e2e",
    methods=("full",), hub_id="timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
    preprocess=Preprocess(224, None, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    head="head", embedding="cls", embed_dim=1024, lora_targets=VIT_LORA_TARGETS, params_m=304.3,
    tiny_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2}, table3=True,
    recipe=script_recipe("vit_large_patch16_224", "full"),
    notes="ImageNet weights; the script normalises with ImageNet statistics (recipe), not the 0.5/0.5 "
          "of this timm tag",
))
ENTRIES.append(ModelConfig(
    name="swin_base_patch4_window7_224", arch="swin_base_patch4_window7_224", display="Swin-B (e2e)",
    family="e2e", methods=("full",), hub_id="timm/swin_base_patch4_window7_224.ms_in22k_ft_in1k",
    preprocess=Preprocess(224, None, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    head="head.fc", embedding="pool", embed_dim=1024, lora_targets=SWIN_LORA_TARGETS, params_m=87.8,
    tiny_kwargs={"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4)},
    recipe=script_recipe("swin_base_patch4_window7_224", "full"), table3=True, notes="ImageNet weights",
))
