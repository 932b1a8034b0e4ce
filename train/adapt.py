"""Adapting a backbone to the one-logit task: linear probe, LoRA, and merging LoRA for export.

After :func:`apply_method` a model is ``LogitModel(net)`` where ``net`` is

- ``linear``: :class:`EmbeddingClassifier` - the timm backbone (frozen, kept in eval mode) and a
  new ``nn.Linear(embed_dim, 1)`` at ``net.logit_head`` fed by the entry's embedding rule;
- ``lora``:   a PEFT ``PeftModel`` around that same :class:`EmbeddingClassifier`, with LoRA on the
  modules matched by the entry's ``lora_targets`` regex (PEFT full-matches a string against each
  module name) and ``logit_head`` as ``modules_to_save``; everything else frozen. The Table-3
  recipes set that regex to the scripts' suffix list (recipe ``lora_targets="script"``), which
  also adapts ``patch_embed.proj``, the patch-embedding convolution (PEFT ``lora.Conv2d``; it
  merges into the convolution's weight like a linear layer's); ``"blocks"`` keeps the blocks only.

Embedding rules (``ModelConfig.embedding``), on the backbone's final (normed) token sequence:
``cls`` = class token; ``cls+mean`` = class token ++ mean of the patch tokens, every prefix
(class + register) token excluded; ``mean`` = mean of the patch tokens; ``pool`` = timm's own
pooled pre-logits features (CNNs, Swin).

Every network of the package is a :class:`LogitModel` (one atypical logit per crop), built by
:func:`ami.train.models.create`.

The new head is called ``logit_head`` (not ``head``) because PEFT matches ``modules_to_save`` by
name suffix, and every timm ViT already has a (reset) ``head``.
"""

from __future__ import annotations

import torch
from torch import nn

from ami.runtime.errors import Fault

from .registry import ModelConfig

HEAD = "logit_head"
RULES = ("cls", "cls+mean", "mean", "pool")


class LogitModel(nn.Module):
    """Wraps any classifier so that forward returns shape (N,) logits for the atypical class."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(x.shape[0], -1)[:, 0]


def embedding_dim(backbone: nn.Module, rule: str) -> int:
    n = int(backbone.num_features)
    return 2 * n if rule == "cls+mean" else n


def tokens_to_embedding(backbone: nn.Module, x: torch.Tensor, rule: str, num_prefix_tokens: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, D] by the embedding rule (see module docstring)."""
    if rule not in RULES:
        raise ValueError(f"unknown embedding rule {rule!r}; known: {', '.join(RULES)}")
    feats = backbone.forward_features(x)
    if rule == "pool":
        return backbone.forward_head(feats, pre_logits=True)
    if feats.ndim != 3:
        raise ValueError(f"embedding rule {rule!r} needs a token sequence, {type(backbone).__name__} gives "
                         f"{tuple(feats.shape)}")
    if rule == "cls":
        return feats[:, 0]
    patches = feats[:, num_prefix_tokens:].mean(dim=1)
    if rule == "mean":
        return patches
    return torch.cat([feats[:, 0], patches], dim=1)


class EmbeddingClassifier(nn.Module):
    """Backbone -> embedding (entry's rule) -> ``logit_head`` (one logit)."""

    def __init__(self, backbone: nn.Module, rule: str, num_prefix_tokens: int, freeze_backbone: bool = False):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown embedding rule {rule!r}; known: {', '.join(RULES)}")
        npt = getattr(backbone, "num_prefix_tokens", None)
        if rule in ("cls+mean", "mean") and npt is not None and npt != num_prefix_tokens:
            raise ValueError(f"registry says {num_prefix_tokens} prefix tokens, the backbone has {npt}")
        self.backbone = backbone
        self.rule = rule
        self.num_prefix_tokens = num_prefix_tokens if npt is None else int(npt)
        self.embed_dim = embedding_dim(backbone, rule)
        self.frozen = freeze_backbone
        setattr(self, HEAD, nn.Linear(self.embed_dim, 1))
        if freeze_backbone:
            for p in backbone.parameters():
                p.requires_grad_(False)
            backbone.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return tokens_to_embedding(self.backbone, x, self.rule, self.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, HEAD)(self.features(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen backbone never runs dropout / drop-path / batch-norm updates
            self.backbone.eval()
        return self


def _is_peft(m: nn.Module) -> bool:
    return hasattr(m, "get_base_model") and hasattr(m, "peft_config")


def classifier_of(model: nn.Module) -> EmbeddingClassifier | None:
    """The EmbeddingClassifier inside LogitModel / PeftModel wrappers (None for plain timm nets)."""
    m = model.net if isinstance(model, LogitModel) else model
    if _is_peft(m):
        m = m.get_base_model()
    return m if isinstance(m, EmbeddingClassifier) else None


def embed(model_or_backbone: nn.Module, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Embedding [N, D] by the entry's rule, from an adapted model or a bare timm backbone."""
    clf = classifier_of(model_or_backbone)
    if clf is not None:
        return clf.features(x)
    m = model_or_backbone.net if isinstance(model_or_backbone, LogitModel) else model_or_backbone
    return tokens_to_embedding(m, x, cfg.embedding, getattr(m, "num_prefix_tokens", cfg.num_prefix_tokens))


def adapted_modules(model: nn.Module) -> list[str]:
    """Names (relative to the EmbeddingClassifier) of the modules carrying LoRA adapters, sorted."""
    from peft.tuners.lora import LoraLayer

    clf = classifier_of(model)
    root = clf if clf is not None else model
    return sorted(n for n, m in root.named_modules() if isinstance(m, LoraLayer))


def apply_method(model: LogitModel, cfg: ModelConfig, method: str, lora_rank: int = 8, lora_alpha: int = 16,
                 lora_dropout: float = 0.3) -> LogitModel:
    """``full``: unchanged; ``linear``: frozen backbone + new linear head; ``lora``: PEFT LoRA + new head."""
    if method == "full":
        return model
    if method not in ("linear", "lora"):
        raise ValueError(f"unknown method {method!r}")
    net = model.net
    if isinstance(net, EmbeddingClassifier) or _is_peft(net):
        raise ValueError("model is already adapted")
    net.reset_classifier(0)  # the timm head becomes Identity; the logit comes from logit_head
    clf = EmbeddingClassifier(net, cfg.embedding, cfg.num_prefix_tokens, freeze_backbone=True)
    if method == "linear":
        return LogitModel(clf)
    if not cfg.lora_targets:
        raise ValueError(f"{cfg.name} has no LoRA targets in the registry")
    from peft import LoraConfig, get_peft_model

    clf.frozen = False  # LoRA dropout lives inside the backbone: it must follow train()/eval()
    conf = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                      target_modules=cfg.lora_targets, modules_to_save=[HEAD])
    peft_model = get_peft_model(clf, conf)
    names = adapted_modules(peft_model)
    bad = [n for n in names if not n.startswith("backbone.")]
    if not names or bad:
        raise ValueError(f"{cfg.name}: LoRA regex {cfg.lora_targets!r} adapted {bad or 'nothing'}")
    from .recipes import BLOCKS_LORA_TARGETS

    if cfg.lora_targets == BLOCKS_LORA_TARGETS and any("patch_embed" in n for n in names):
        raise ValueError(f"{cfg.name}: the blocks-only LoRA targets adapted the patch embedding")
    return LogitModel(peft_model)


# -- saving only what was trained ---------------------------------------------------------------
def trainable_names(model: nn.Module) -> set[str]:
    """State-dict keys of what training changes: the parameters being trained (LoRA adapters + head,
    or the head) and, when the backbone is not frozen in eval mode (LoRA), the running statistics
    of its batch-norm layers, which training updates (CNNs such as EfficientNet-Lite; a ViT has none).
    Without them a reloaded LoRA CNN would pair the trained adapters with ImageNet statistics."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    clf = classifier_of(model)
    if clf is not None and not clf.frozen:
        bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
        bn = {n for n, m in model.named_modules() if isinstance(m, bn_types) and m.track_running_stats}
        names |= {n for n, _ in model.named_buffers() if n.rpartition(".")[0] in bn}
    return names


# -- merging LoRA for export --------------------------------------------------------------------
class MergeMismatch(Fault, RuntimeError):
    """The merged network does not compute what the adapted one did."""


@torch.no_grad()
def merge_lora(model: LogitModel, example: torch.Tensor | None = None, atol: float = 1e-4) -> LogitModel:
    """Fold the LoRA adapters into the base weights (in float32) and return a plain LogitModel.

    The trained ``logit_head`` copy replaces the original (PEFT ``merge_and_unload``). The output
    on ``example`` (default: two fixed random images at the backbone's input size) is checked
    before and after merging; a difference above ``atol`` (scaled by the logit magnitude) raises
    :class:`MergeMismatch`. The check result is kept as ``merged.merge_check``. The adapted
    model is consumed: its modules now belong to the merged one.
    """
    peft_model = model.net
    if not _is_peft(peft_model):
        raise ValueError("merge_lora needs a LoRA model (LogitModel around a PeftModel)")
    model.float().eval()
    dev = next(model.parameters()).device
    if example is None:
        size = getattr(getattr(classifier_of(model).backbone, "patch_embed", None), "img_size", (224, 224))
        g = torch.Generator().manual_seed(0)
        example = torch.randn(2, 3, *tuple(size), generator=g)
    example = example.to(dev, torch.float32)
    before = model(example)
    merged = LogitModel(peft_model.merge_and_unload(progressbar=False)).eval()
    if any("lora_" in n for n, _ in merged.named_parameters()):
        raise MergeMismatch("LoRA parameters remain after merge_and_unload")
    after = merged(example)
    diff = float((before - after).abs().max())
    tol = atol * max(1.0, float(before.abs().max()))
    merged.merge_check = {"max_abs_diff": diff, "tolerance": tol, "n": int(example.shape[0])}
    if not diff <= tol:
        raise MergeMismatch(f"merged logits differ from the adapted model's by {diff:.3g} (> {tol:.3g})")
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged
