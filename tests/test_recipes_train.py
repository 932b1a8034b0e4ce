"""Every Table-3 configuration trains with its own recipe: a tiny stand-in of the same architecture
takes one step with the configuration's augmentation policy, head tokens and LoRA targets; the
LoRA configurations (patch-embedding convolution adapted, as the scripts do) then train through
`ami-train`'s own loop, merge, export to ONNX and pass the parity checks. The edge policies keep
their exact random-number sequence (a resumed edge run continues the augmentation it had)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ami.train import data as D
from ami.train.adapt import adapted_modules, classifier_of, merge_lora
from ami.train.fit import RunSpec
from ami.train.models import create
from ami.train.registry import table3_configs

LORA = [c for c in table3_configs() if c[1] == "lora"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _crops(n=4, size=128, seed=0) -> np.ndarray:
    """Synthetic H&E-ish crops (no data needed): smooth colour fields with dark blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        base = np.stack([0.85 - 0.2 * xx, 0.6 + 0.2 * yy, 0.8 - 0.1 * xx * yy], -1)
        cx, cy = rng.uniform(0.3, 0.7, 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.01)[..., None]
        img = np.clip(base * (1 - 0.6 * blob) + rng.normal(0, 0.03, base.shape), 0, 1)
        out.append((img * 255).astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize("model,method", table3_configs())
def test_one_step_with_the_configurations_policy_and_targets(model, method):
    spec = RunSpec(model=model, method=method, tiny=True, random_init=True)
    cfg, r = spec.cfg, spec.recipe
    policy = r.policy()
    torch.manual_seed(0)
    net = create(cfg, method, tiny=True, random_init=True, lora_rank=r.lora_rank, lora_alpha=r.lora_alpha,
                 lora_dropout=r.lora_dropout)
    crops = _crops()
    if policy.kind == "eval":  # the evaluation transform: crops as evaluated (ami-train loads them so)
        crops = np.stack([cfg.preprocess.to_uint8(Image.fromarray(c)) for c in crops])
    x = D.augment(torch.from_numpy(crops), cfg.preprocess, policy, torch.Generator().manual_seed(1))
    assert x.shape == (4, 3, 224, 224) and torch.isfinite(x).all()
    if method == "lora":
        names = adapted_modules(net)
        assert "backbone.patch_embed.proj" in names  # the scripts' "proj" suffix: the patch-embedding conv too
        assert {n.rsplit(".", 1)[-1] for n in names} == {"proj", "qkv", "fc1", "fc2"}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    loss.backward()
    opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert torch.isfinite(loss) and changed and changed <= trainable
    if method == "lora":
        assert any("patch_embed.proj.lora_" in n for n in changed)


def test_a_lora_conv_merges_exactly():
    """LoRA on the patch-embedding convolution folds into its weight: merged == unmerged."""
    spec = RunSpec(model="uni", method="lora", tiny=True, random_init=True)
    torch.manual_seed(3)
    net = create(spec.cfg, "lora", tiny=True, random_init=True)
    bb = classifier_of(net).backbone
    pe = bb.patch_embed.proj
    with torch.no_grad():  # non-zero adapters, as after training; LayerScale 1e-5 would hide the class
        for p in (pe.lora_A["default"].weight, pe.lora_B["default"].weight):  # token's change: open it
            p.normal_(0, 0.05)
        for b in bb.blocks:
            b.ls1.gamma.fill_(1.0)
            b.ls2.gamma.fill_(1.0)
    base = pe.base_layer.weight.detach().clone()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    net.eval()
    with torch.no_grad():
        want = net(x)
        with net.net.disable_adapter():
            plain = net(x)
    assert (want - plain).abs().max() > 1e-3  # the conv adapter really changes the output
    merged = merge_lora(net, example=x)
    conv = merged.net.backbone.patch_embed.proj
    assert type(conv) is torch.nn.Conv2d and not torch.equal(conv.weight, base)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=1e-5)


def _legacy_edge(x_uint8, pre, g):  # the edge / paper pipelines as they were written before policies
    x = D.to_float(x_uint8)
    x = D.random_affine(x, pre.input_size, g, rotate_deg=0, any_rotation=True, hflip=0.5, vflip=0.0,
                        scale=(0.8, 1.0), translate=0.06)
    x = D.hed_jitter(x, sigma=0.05, bias=0.05, g=g)
    return D.normalize(D.color_jitter(x, 0.15, 0.15, 0.15, 0.02, g), pre)


def _legacy_paper(x_uint8, pre, g):
    x = D.random_affine(D.to_float(x_uint8), pre.input_size, g, rotate_deg=15, any_rotation=False, hflip=0.5,
                        vflip=0.0, scale=(0.8, 1.0), translate=0.0, padding="zeros")
    return D.normalize(D.color_jitter(x, 0.2, 0.2, 0.2, 0.1, g), pre)


@pytest.mark.parametrize("name,legacy", [("edge", _legacy_edge), ("paper", _legacy_paper)])
def test_named_policies_replay_the_old_pipelines_bit_for_bit(name, legacy):
    from ami.train.registry import get

    pre = get("edge").preprocess
    crops = torch.from_numpy(_crops(6))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(D.augment(crops, pre, name, g1), legacy(crops, pre, g2))
    assert torch.equal(g1.get_state(), g2.get_state())  # same draws: a resumed run continues identically


def test_rrc_window_has_the_declared_area_and_ratio():
    """RandomResizedCrop-like windows: read back from an image that encodes its own coordinates."""
    n, size = 64, 128
    ramp = torch.linspace(0, 1, size)
    img = torch.stack([ramp.view(1, size).expand(size, size), ramp.view(size, 1).expand(size, size),
                       torch.zeros(size, size)]).expand(n, 3, size, size)
    g = torch.Generator().manual_seed(0)
    out = D.random_affine(img, 224, g, rotate_deg=0, any_rotation=False, hflip=0, vflip=0, scale=(0.08, 1.0),
                          translate=0, padding="zeros", ratio=(3 / 4, 4 / 3))
    wx = out[:, 0].amax((1, 2)) - out[:, 0].amin((1, 2))  # window width / height, as fractions of the crop
    wy = out[:, 1].amax((1, 2)) - out[:, 1].amin((1, 2))
    area = wx * wy
    assert (area > 0.08 * 0.9).all() and (area <= 1.0 + 1e-3).all() and area.std() > 0.1
    unclipped = (wx < 0.98) & (wy < 0.98)
    ratio = (wx / wy)[unclipped]
    assert ratio.numel() > n // 2 and (ratio > 0.75 * 0.95).all() and (ratio < 4 / 3 * 1.05).all()
    assert (out[:, 0].amin((1, 2)) >= -1e-3).all() and (out[:, 0].amax((1, 2)) <= 1 + 1e-3).all()  # inside the crop


# -- LoRA: ami-train's loop -> merge -> ONNX -> parity, per configuration ---------------------------
@pytest.mark.parametrize("model,method", LORA)
def test_lora_configuration_trains_merges_and_exports(model, method, synthetic_folds_root, tmp_path):
    import json

    from ami.export import onnx_export as OE
    from ami.export.checks import validate_contract
    from ami.train.fit import run

    data_root = synthetic_folds_root  # generated crops; their training part is the pinned folds'
    d = tmp_path / f"{model}-{method}"
    spec = RunSpec(model=model, method=method, run_dir=d, data_root=data_root, tiny=True, random_init=True,
                   max_train=8, max_eval=4, recipe_overrides={"epochs": 1}, eval_sets=(), threads=1)
    run(spec, [0], log=lambda *a: None)
    conf = json.loads((d / "config.json").read_text())
    assert {k: v for k, v in conf.items() if k != "created"} == json.loads(json.dumps(spec.record()))  # = --print-config
    assert conf["recipe"]["lora_targets"] == "script" and conf["augmentation"]["policy"] == spec.recipe.augment
    out = tmp_path / "m.onnx"
    OE.export_onnx(d, out, data_root=data_root, check_crops=4, check_batch=4, threads=1, log=lambda *a: None)
    meta = validate_contract(out)
    assert meta.extra["lora_merge"]["0"]["merged"] and meta.extra["lora_merge"]["0"]["max_abs_diff"] <= 1e-5
    assert meta.extra["self_check"]["max_abs_diff"] <= 1e-4
    assert list(meta.preprocess.mean) == conf["preprocess"]["mean"]  # the configuration's normalisation ships
