"""Each of the 17 Table-3 configurations resolves to what its published script did.

SCRIPTS below is transcribed by hand from the scripts of DeepMicroscopy/AMi-Br_Benchmark at commit
3acf4da (the commit the data and Table 3 come from). Each value names the script (its path at that
commit) and the statement it was read from; the statement is the citation. This table is
deliberately independent of ami.train.provenance.SCRIPTS: a change to either fails here. With a
copy of the scripts at that commit in $AMI_PAPER_SCRIPTS, every statement ami.train.provenance cites
is also looked up in its script (test_every_citation_is_in_its_script).
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from ami.train.cli import app
from ami.train.recipes import POLICIES, Recipe, parse_value
from ami.train.registry import REGISTRY, configured, get, table3_configs

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
HOPT = ([0.707223, 0.578729, 0.703617], [0.211883, 0.230117, 0.177517])
RRC = "RandomResizedCrop"

# -- the scripts, transcribed --------------------------------------------------------------------
# each entry: script path; then key -> (value, statement in that script)
E2E_TRAIN = {  # End-to-End_DL_Baselines/*/*.py: train_transform = transforms.Compose([...])
    "hflip": (0.5, "transforms.RandomHorizontalFlip()"),
    "rotate_deg": (10, "transforms.RandomRotation(10)"),
    "crop_scale": ((0.8, 1.0), "transforms.RandomResizedCrop(224, scale=(0.8, 1.0))"),
    "jitter": ((0.2, 0.2, 0.2, 0.1), "transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)"),
}
E2E = {
    "lr": (5e-5, "optimizer = optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
    "weight_decay": (1e-5, "optimizer = optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
    "early_stop_patience": (15, "early_stop_patience = 15"),
    "mean_std": (IMAGENET, "transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])"),
    "eval": ((None, "bilinear"), "val_transform: transforms.Resize((224, 224)) (torchvision default bilinear)"),
    "train": (E2E_TRAIN, "train_transform"),
}
LIN = {
    "early_stop_patience": (15, "early_stop_patience = 15"),
    "train": ({"kind": "eval"}, "EmbeddingDataset: embeddings extracted once, evaluation transform"),
}
LORA_CONFIG = 'LoraConfig(r=8, lora_alpha=16, target_modules=["qkv", "proj", "fc1", "fc2"], lora_dropout=0.3)'
LORA = {
    "lr": (5e-5, "optimizer = optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
    "weight_decay": (1e-5, "optimizer = optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
    "early_stop_patience": (10, "early_stop_patience = 10"),
    "lora": ((8, 16, 0.3), LORA_CONFIG),
    "patch_embed_adapted": (True, LORA_CONFIG + ": PEFT suffix-matches 'proj' = patch_embed.proj too"),
}
LORA_RRC_TRAIN = {  # uni / prov-gigapath / h-optimus-0 LoRA
    "hflip": (0.5, "transforms.RandomHorizontalFlip()"), "rotate_deg": (15, "transforms.RandomRotation(15)"),
    "crop_scale": ((0.08, 1.0), "transforms.RandomResizedCrop(224)  (torchvision default scale=(0.08, 1.0))"),
    "jitter": ((0.2, 0.2, 0.0, 0.0), "transforms.ColorJitter(brightness=0.2, contrast=0.2)"),
}
VIRCHOW_LORA_TRAIN = {
    "hflip": (0.5, "transforms.RandomHorizontalFlip()"), "rotate_deg": (0, "(no RandomRotation)"),
    "crop_scale": ((0.8, 1.0), "transforms.RandomResizedCrop(224, scale=(0.8, 1.0))"),
    "jitter": ((0.2, 0.2, 0.2, 0.1), "transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)"),
}
HOPT1_LORA_TRAIN = {
    "hflip": (0.5, "transforms.RandomHorizontalFlip()"), "rotate_deg": (15, "transforms.RandomRotation(15)"),
    "crop_scale": ((1.0, 1.0), "transforms.Resize(224)  (no crop)"),
    "jitter": ((0.2, 0.2, 0.0, 0.0), "transforms.ColorJitter(brightness=0.2, contrast=0.2)"),
}
RESIZE_CROP_224 = ((None, "bilinear"), "val_transform: transforms.Resize(224), transforms.CenterCrop(224)")
RESIZE_224 = ((None, "bilinear"), "val_transform: transforms.Resize(224)")

SCRIPTS = {
    ("efficientnetv2_m", "full"): ("End-to-End_DL_Baselines/efficientnetv2_m/efficientnetv2_m.py",
                                   {**E2E, "pretrained": (False, "timm.create_model('efficientnetv2_m', pretrained=False)"),
                                    "embedding": ("pool", "self.model.classifier = nn.Linear(...in_features, 1)")}),
    ("vit_large_patch16_224", "full"): ("End-to-End_DL_Baselines/vit_large_patch16_224/vit_large_patch16_224.py",
                                        {**E2E, "embedding": ("cls", "self.model.head = nn.Linear(...in_features, 1)")}),
    ("swin_base_patch4_window7_224", "full"): (
        "End-to-End_DL_Baselines/swin_base_patch4_window7_224/swin_base_patch4_window7_224.py",
        {**E2E, "embedding": ("pool", "timm.create_model(..., num_classes=0); nn.Linear(self.model.num_features, 1)")}),
    ("uni", "linear"): ("Foundation_Models/Linear_Probing/uni/uni.py", {
        **LIN, "lr": (5e-5, "optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "weight_decay": (1e-5, "optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "embedding": ("cls", "output = uni_model(image_tensor); nn.Linear(1024, 1)")}),
    ("uni2_h", "linear"): ("Foundation_Models/Linear_Probing/uni2-h/uni2-h.py", {
        **LIN, "lr": (5e-5, "optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "weight_decay": (1e-5, "optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "embedding": ("cls", "nn.Linear(1536, 1)")}),
    ("virchow", "linear"): ("Foundation_Models/Linear_Probing/Virchow/virchow.py", {
        **LIN, "lr": (5e-5, "optimizer = optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "weight_decay": (1e-5, "optimizer = optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "embedding": ("cls+mean", "torch.cat([class_token, patch_tokens.mean(1)], dim=-1); nn.Linear(2560, 1)")}),
    ("virchow2", "linear"): ("Foundation_Models/Linear_Probing/Virchow2/virchow2.py", {
        **LIN, "lr": (5e-5, "optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "weight_decay": (1e-5, "optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "embedding": ("cls+mean", "patch_tokens = output[:, 5:]; torch.cat([class_token, patch_tokens.mean(1)])")}),
    ("prov_gigapath", "linear"): ("Foundation_Models/Linear_Probing/prov-gigapath/prov-gigapath.py", {
        **LIN, "lr": (1e-3, "optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)"),
        "weight_decay": (1e-4, "optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)"),
        "mean_std": (IMAGENET, "transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))"),
        "eval": ((256, "bicubic"), "transforms.Resize(256, interpolation=BICUBIC), transforms.CenterCrop(224)"),
        "embedding": ("cls", "nn.Linear(1536, 1)")}),
    ("h_optimus_0", "linear"): ("Foundation_Models/Linear_Probing/h-optimus-0/hoptimus0.py", {
        **LIN, "lr": (5e-5, "optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "weight_decay": (1e-5, "optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "mean_std": (HOPT, "transforms.Normalize(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, ...))"),
        "eval": ((None, "bicubic"), 'Image.open(img_path).convert("RGB").resize((224, 224))  (Pillow default bicubic)'),
        "embedding": ("cls", "self.classifier = nn.Linear(1536, 1)")}),
    ("h_optimus_1", "linear"): ("Foundation_Models/Linear_Probing/h-optimus-1/hoptimus1.py", {
        **LIN, "lr": (5e-5, "optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "weight_decay": (1e-5, "optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)"),
        "mean_std": (HOPT, "transforms.Normalize(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, ...))"),
        "eval": ((None, "bicubic"), 'Image.open(img_path).convert("RGB").resize((224, 224))')}),
    ("uni", "lora"): ("Foundation_Models/LoRA/uni/uni_lora.py", {
        **LORA, "train": (LORA_RRC_TRAIN, "train_transform"), "mean_std": (IMAGENET, "transforms.Normalize(ImageNet)"),
        "eval": RESIZE_CROP_224, "embedding": ("cls", "create_model(..., num_classes=1): timm head on the class token")}),
    ("uni2_h", "lora"): ("Foundation_Models/LoRA/uni2-h/uni2-h_lora.py", {
        **LORA, "train": ({"kind": "eval"}, "train_transform = create_transform(**resolve_data_config(...)) = val"),
        "embedding": ("cls", "num_classes=1: timm head on the class token")}),
    ("virchow", "lora"): ("Foundation_Models/LoRA/Virchow/virchow_lora.py", {
        **LORA, "train": (VIRCHOW_LORA_TRAIN, "train_transform"),
        "mean_std": (HALF, "transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))"),
        "eval": RESIZE_CROP_224, "embedding": ("cls", "outputs = outputs[:, 0]  # Use CLS token")}),
    ("virchow2", "lora"): ("Foundation_Models/LoRA/Virchow2/virchow2_lora.py", {
        **LORA, "train": (VIRCHOW_LORA_TRAIN, "train_transform"),
        "mean_std": (HALF, "transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))"),
        "eval": RESIZE_CROP_224, "embedding": ("cls", "outputs = outputs[:, 0]  # Use CLS token")}),
    ("prov_gigapath", "lora"): ("Foundation_Models/LoRA/prov-gigapath/prov-gigapath_lora.py", {
        **LORA, "train": (LORA_RRC_TRAIN, "train_transform"), "mean_std": (IMAGENET, "transforms.Normalize(ImageNet)"),
        "eval": RESIZE_CROP_224, "embedding": ("cls", "num_classes=1: timm head on the class token")}),
    ("h_optimus_0", "lora"): ("Foundation_Models/LoRA/h-optimus-0/hoptimus0.py", {
        **LORA, "train": (LORA_RRC_TRAIN, "train_transform"),
        "mean_std": (HOPT, "its own"), "eval": RESIZE_224,
        "embedding": ("cls", "base_model.head = nn.Linear(base_model.num_features, 1)")}),
    ("h_optimus_1", "lora"): ("Foundation_Models/LoRA/h-optimus-1/hoptimus1.py", {
        **LORA, "train": (HOPT1_LORA_TRAIN, "train_transform"), "mean_std": (HOPT, "transforms.Normalize(...)"),
        "eval": RESIZE_224, "embedding": ("cls", "base_model.head = nn.Linear(base_model.num_features, 1)")}),
}
COMMON = {"epochs": 100, "batch_size": 8, "optimizer": "adam", "scheduler": "plateau", "sampling": "balanced",
          "loss": "bce"}  # every script: num_epochs = 100, batch_size = 8, optim.Adam, ReduceLROnPlateau,
# WeightedRandomSampler(sample_weights, len(sample_weights), replacement=True), nn.BCEWithLogitsLoss()


# how the new one-logit head starts (recipe head_init): the three LoRA scripts that build the model with
# num_classes=1 keep timm's constructor head (trunc_normal_(std=.02), zero bias); every other script makes a
# new nn.Linear (or calls reset_classifier, which does)
HEAD_INIT = {("uni", "lora"): ("timm", "create_model('hf-hub:MahmoodLab/uni', pretrained=True, num_classes=1, ...)"),
             ("uni2_h", "lora"): ("timm", "timm_kwargs = {..., 'num_classes': 1, ...}"),
             ("prov_gigapath", "lora"): ("timm", "create_model('hf-hub:prov-gigapath/prov-gigapath', ..., "
                                                 "num_classes=1, ...)")}


def test_the_table_covers_exactly_table_3():
    assert sorted(SCRIPTS) == sorted(table3_configs())


@pytest.mark.parametrize("model,method", list(SCRIPTS))
def test_recipe_is_the_scripts(model, method):
    script, want = SCRIPTS[(model, method)]
    r = get(model).recipe_for(method)
    cfg = configured(model, method)
    for k, v in COMMON.items():
        assert getattr(r, k) == v, (k, script)
    for key in ("lr", "weight_decay", "early_stop_patience"):
        assert getattr(r, key) == want[key][0], (key, want[key][1], script)
    pol = r.policy()
    train, cite = want.get("train", ({}, ""))
    if train.get("kind") == "eval":
        assert pol.kind == "eval", cite
    else:
        assert pol.kind == "affine"
        assert pol.hflip == train["hflip"][0] and pol.rotate_deg == train["rotate_deg"][0], (script, cite)
        assert not pol.any_rotation and pol.vflip == 0
        assert tuple(pol.crop_scale) == train["crop_scale"][0], (script, train["crop_scale"][1])
        assert (pol.brightness, pol.contrast, pol.saturation, pol.hue) == train["jitter"][0], train["jitter"][1]
        assert pol.hed_sigma == pol.hed_bias == 0 and pol.translate == 0 and pol.padding == "zeros"
    pre = cfg.preprocess
    assert pre.input_size == 224
    if "mean_std" in want:
        assert [list(pre.mean), list(pre.std)] == list(want["mean_std"][0]), (script, want["mean_std"][1])
    if "eval" in want:
        assert (pre.resize, pre.interpolation) == want["eval"][0], (script, want["eval"][1])
    if "embedding" in want:
        assert cfg.embedding == want["embedding"][0], (script, want["embedding"][1])
    if "pretrained" in want:
        assert cfg.pretrained == want["pretrained"][0]
    assert r.head_init == HEAD_INIT.get((model, method), ("linear", "nn.Linear(in, 1) / reset_classifier"))[0], script
    if method == "lora":
        assert (r.lora_rank, r.lora_alpha, r.lora_dropout) == want["lora"][0], want["lora"][1]
        rx = re.compile(cfg.lora_targets)
        for name in ("backbone.blocks.0.attn.qkv", "backbone.blocks.3.attn.proj", "backbone.blocks.1.mlp.fc1",
                     "backbone.blocks.1.mlp.fc2"):
            assert rx.fullmatch(name), name
        assert bool(rx.fullmatch("backbone.patch_embed.proj")) == want["patch_embed_adapted"][0]
        for name in ("logit_head", "backbone.blocks.0.attn.proj_drop", "backbone.blocks.0.norm1", "backbone.head"):
            assert not rx.fullmatch(name), name


def test_virchow_lora_head_reads_the_class_token_only():
    lin, lora = configured("virchow2", "linear"), configured("virchow2", "lora")
    assert (lin.embedding, lin.embed_dim) == ("cls+mean", 2560)
    assert (lora.embedding, lora.embed_dim) == ("cls", 1280)


@pytest.mark.parametrize("model,method", list(SCRIPTS))
def test_print_config_is_the_run_record_with_origins(model, method, tmp_path):
    res = CliRunner().invoke(app, ["-m", model, "--method", method, "--print-config",
                                   "--data-root", str(tmp_path / "no-data-here")])
    assert res.exit_code == 0, res.output
    conf = json.loads(res.output)
    script = SCRIPTS[(model, method)][0].split(" ")[0]
    origin = conf["recipe_origin"]
    assert set(origin) == set(conf["recipe"])
    for key in ("lr", "weight_decay", "early_stop_patience", "epochs", "batch_size", "augment"):
        assert origin[key].startswith(script.split("/")[0]) and "`" in origin[key], (key, origin[key])
    assert origin["seed"].startswith("ami default")
    assert conf["augmentation"]["policy"] == conf["recipe"]["augment"]
    assert conf["registry_entry"]["preprocess"] == conf["preprocess"]
    assert not (tmp_path / "no-data-here").exists() and not any(tmp_path.iterdir())
    assert "created" not in conf and "versions" in conf


def test_overrides_reach_the_record_and_are_marked():
    res = CliRunner().invoke(app, ["-m", "uni", "--method", "lora", "--print-config", "--set", "lora_targets=blocks",
                                   "--set", "aug.rotate_deg=0", "--set", "aug.crop_scale=0.5,1", "--set", "lr=1e-4",
                                   "--set", "normalize=half"])
    assert res.exit_code == 0, res.output
    conf = json.loads(res.output)
    assert conf["recipe"]["lora_targets"] == "blocks" and conf["recipe"]["lr"] == 1e-4
    assert conf["recipe"]["augment_params"] == {"rotate_deg": 0.0, "crop_scale": [0.5, 1.0]}
    assert conf["augmentation"]["rotate_deg"] == 0 and conf["augmentation"]["crop_scale"] == [0.5, 1.0]
    assert not re.fullmatch(conf["registry_entry"]["lora_targets"], "backbone.patch_embed.proj")
    assert conf["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    for k in ("lora_targets", "augment_params", "lr", "normalize"):
        assert conf["recipe_origin"][k].startswith("command line"), k


@pytest.mark.parametrize("bad,msg", [("aug.spin=3", "unknown augmentation field"), ("lr=fast", "lr takes a float"),
                                     ("augment=jiggle", "unknown augmentation policy"),
                                     ("lora_targets=most", "lora_targets must be"), ("normalize=0.5", "normalize must"),
                                     ("embedding=avg", "embedding must"), ("nokey=1", "unknown recipe key")])
def test_bad_overrides_are_refused_with_the_choices(bad, msg):
    res = CliRunner().invoke(app, ["-m", "uni", "--method", "lora", "--print-config", "--set", bad])
    assert res.exit_code == 2 and msg in res.output, res.output


def test_list_shows_departures_from_the_text():
    res = CliRunner().invoke(app, ["--list"])
    assert res.exit_code == 0
    block = res.output.split("The paper's Table 3")[1]
    rows = block.split("ami-train -m ")[1:]
    got = {r.split(" --method ")[0] + "/" + r.split(" --method ")[1].split()[0]: r for r in rows}
    assert "lr 0.001 (text 1e-4)" in got["prov_gigapath/linear"] and "weight_decay 0.0001" in got["prov_gigapath/linear"]
    assert "early_stop_patience 10" in got["virchow2/lora"] and "normalisation half" in got["virchow2/lora"]
    assert "patch-embedding convolution" in got["uni/lora"] and "no rotation" in got["virchow/lora"]
    assert "no augmentation" in got["uni2_h/lora"] and "no crop" in got["h_optimus_1/lora"]
    assert "crop area 0.08-1" in got["uni/lora"] and "rotation +-10 deg" in got["vit_large_patch16_224/full"]
    assert "pretrained=False" in got["efficientnetv2_m/full"]


def test_entries_outside_table_3_keep_ami_defaults():
    for name, c in REGISTRY.items():
        if c.family == "edge":
            for m in c.methods:
                assert configured(name, m) is c  # nothing of the recipe changes an edge network
                assert c.recipe_for(m).augment == "edge"
    h0 = get("h0_mini")
    assert h0.recipe_for("lora").lora_targets == "entry" and h0.recipe_for("linear") == Recipe()
    from ami.train.provenance import origins

    t3 = set(table3_configs())
    for name, c in REGISTRY.items():  # edge, lite0, h0_mini ...: no script behind them, nothing claims one
        for m in c.methods:
            if (name, m) not in t3:
                assert all(v.startswith("ami default") for v in origins(name, m, c.recipe_for(m)).values()), name


def test_parse_value_types():
    assert parse_value("aug.hflip", "0.25") == 0.25 and parse_value("aug.any_rotation", "true") is True
    assert parse_value("aug.crop_ratio", "none") is None and parse_value("eval_resize", "256") == 256
    assert parse_value("augment_params", '{"hue": 0.05}') == {"hue": 0.05}
    assert set(POLICIES) >= {"edge", "paper", "none", "eval", "script_e2e", "script_lora_rrc", "script_lora_resize",
                             "script_virchow_lora"}


def test_every_citation_is_in_its_script():
    """Each statement ami.train.provenance cites is in the script it names, at commit 3acf4da (set
    $AMI_PAPER_SCRIPTS to a copy of the scripts at that commit; ``...`` in a citation elides, two spaces and
    a parenthesis start a note)."""
    import os
    from pathlib import Path

    from ami.train.provenance import COMMIT, SCRIPTS

    root = os.environ.get("AMI_PAPER_SCRIPTS")
    if not root:
        pytest.skip(f"set AMI_PAPER_SCRIPTS to a copy of the paper's scripts at {COMMIT}")
    missing = []
    for (model, method), (path, values) in SCRIPTS.items():
        text = " ".join((Path(root) / path).read_text().split())
        for key, (_, code) in values.items():
            for part in code.split("  (")[0].split("..."):
                part = " ".join(part.split()).strip(" ,")
                if part and part not in text:
                    missing.append(f"{model}/{method} {key}: {part!r} not in {path}")
    assert not missing, "\n".join(missing)
