"""The registry knows the whole benchmark: 17 Table-3 configurations, and foundation-model entries
whose architecture (built on the meta device, no memory, no download) is the real one."""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from typer.testing import CliRunner

from ami.train.cli import app
from ami.train.models import resolve_kwargs
from ami.train.registry import REGISTRY, VIT_LORA_TARGETS, get, label, table3_configs

FOUNDATION = [n for n, c in REGISTRY.items() if c.family == "foundation"]  # every entry of the family is checked
# the paper's Table 3, transcribed independently of the registry (H0-mini is named in its text, not in Table 3)
TABLE3_FMS = ["uni", "uni2_h", "virchow", "virchow2", "prov_gigapath", "h_optimus_0", "h_optimus_1"]
TABLE3 = ([("efficientnetv2_m", "full"), ("vit_large_patch16_224", "full"), ("swin_base_patch4_window7_224", "full")]
          + [(m, "linear") for m in TABLE3_FMS] + [(m, "lora") for m in TABLE3_FMS])


def test_the_foundation_family_is_the_papers_and_h0_mini():
    assert FOUNDATION == TABLE3_FMS + ["h0_mini"]


def test_table3_is_exactly_the_papers_17_configurations():
    assert table3_configs() == TABLE3
    assert len(TABLE3) == 17
    from ami.train.registry import PAPER_TABLE3

    assert list(PAPER_TABLE3) == TABLE3  # the published figures: one row per configuration, in table order
    for figures in PAPER_TABLE3.values():  # keyed by test set name, then metric
        assert set(figures) == {"AMi-Br-test", "AtNorM-Br", "AtNorM-MD"}
        assert all(set(f) == {"balanced_accuracy", "auroc"} for f in figures.values())
    assert {n for n, c in REGISTRY.items() if c.table3} == {m for m, _ in TABLE3}


def test_list_prints_every_entry_and_the_17_configurations():
    res = CliRunner().invoke(app, ["--list"])
    assert res.exit_code == 0, res.output
    for name, c in REGISTRY.items():
        line = next((ln for ln in res.output.splitlines() if ln.startswith(name + " ")), None)
        assert line is not None, name
        assert ",".join(c.methods) in line and f"{c.params_m:.1f}M" in line and str(c.embed_dim) in line
        if c.hub_id:
            assert c.hub_id in line
    assert "17 configurations" in res.output
    for name, method in TABLE3:
        assert f"ami-train -m {name} --method {method}" in res.output
        assert label(name, method) in res.output


@pytest.mark.parametrize("name", FOUNDATION)
def test_foundation_entry_fields(name):
    c = get(name)
    assert c.family == "foundation" and c.methods == ("linear", "lora")
    assert c.hub_id and c.hub_id.startswith("hf-hub:")
    assert c.lora_targets == VIT_LORA_TARGETS and c.head == "head"
    assert c.table3 == (name in TABLE3_FMS)
    assert c.tiny_kwargs["depth"] < 4 and c.tiny_kwargs["embed_dim"] <= 64
    json.dumps(c.to_dict())  # kwargs that are classes are stored as importable strings
    assert c.preprocess.input_size == 224


def test_preprocessing_follows_the_protocol():
    assert get("h_optimus_0").preprocess.mean == (0.707223, 0.578729, 0.703617)
    assert get("h_optimus_1").preprocess.std == (0.211883, 0.230117, 0.177517)
    gp = get("prov_gigapath").preprocess
    assert (gp.resize, gp.input_size, gp.interpolation) == (256, 224, "bicubic")
    for n in ("uni", "uni2_h", "prov_gigapath"):
        assert get(n).preprocess.mean == (0.485, 0.456, 0.406)
    assert get("virchow").embedding == get("virchow2").embedding == "cls+mean"
    assert get("virchow2").num_prefix_tokens == 5 and get("uni2_h").num_prefix_tokens == 9


def test_lora_regex_targets_block_linears_only():
    rx = re.compile(VIT_LORA_TARGETS)
    for k in ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.11.mlp.fc1", "backbone.blocks.39.mlp.fc2"):
        assert rx.fullmatch(k), k
    for k in ("patch_embed.proj", "backbone.patch_embed.proj", "blocks.0.attn", "blocks.0.attn.proj_drop",
              "blocks.0.mlp", "head", "logit_head", "blocks.0.norm1", "blocks.0.attn.q_norm"):
        assert not rx.fullmatch(k), k


def _meta_model(c, **extra):
    with torch.device("meta"):
        return timm.create_model(c.arch, pretrained=False, num_classes=0, **resolve_kwargs(c.create_kwargs), **extra)


@pytest.mark.parametrize("name", FOUNDATION)
def test_full_size_architecture_matches_the_entry(name):
    """The real-size network (meta device: shapes only) has the entry's parameters, width and tokens."""
    c = get(name)
    m = _meta_model(c)
    n = sum(p.numel() for p in m.parameters()) / 1e6
    assert abs(n - c.params_m) / c.params_m < 0.002, (n, c.params_m)
    assert m.num_features * (2 if c.embedding == "cls+mean" else 1) == c.embed_dim
    assert m.num_prefix_tokens == c.num_prefix_tokens
    assert m.patch_embed.img_size == (224, 224)
    mlp = type(m.blocks[0].mlp).__name__
    assert mlp == ("Mlp" if name == "uni" else "GluMlp"), mlp  # SwiGLU everywhere but UNI (GELU MLP)
    if "init_values" in c.create_kwargs or "dinov2" in c.arch:
        assert hasattr(m.blocks[0].ls1, "gamma")  # LayerScale: checkpoints carry ls1.gamma / ls2.gamma


@pytest.mark.parametrize("name", FOUNDATION)
def test_tiny_stand_in_keeps_the_family(name):
    """Tiny = same architecture family and special kwargs, only depth/width shrunk."""
    c = get(name)
    full = _meta_model(c)
    with torch.device("meta"):
        tiny = timm.create_model(c.arch, pretrained=False, num_classes=0,
                                 **{**resolve_kwargs(c.create_kwargs), **resolve_kwargs(c.tiny_kwargs)})
    assert type(tiny) is type(full)
    assert tiny.num_prefix_tokens == full.num_prefix_tokens
    assert tiny.patch_embed.patch_size == full.patch_embed.patch_size
    assert type(tiny.blocks[0].mlp) is type(full.blocks[0].mlp)
    assert type(tiny.blocks[0].ls1) is type(full.blocks[0].ls1)
    assert len(tiny.blocks) < len(full.blocks) and tiny.num_features < full.num_features


@pytest.mark.parametrize("name", [n for n, c in REGISTRY.items() if c.family == "edge"])
def test_edge_entries_match_their_architecture(name):
    """Edge entries: from scratch, 128 px, and the entry's parameter count / width are the network's.

    Built for real on the CPU (a few million parameters, well under a second), not on the meta device:
    timm's RegNet constructor calls ``torch.unique``, which has no meta kernel in some torch releases
    (``aten::_unique2`` with torch 2.11 and timm 1.0.29)."""
    c = get(name)
    assert not c.pretrained and c.hub_id is None and c.preprocess.input_size == 128
    m = timm.create_model(c.arch, pretrained=False, num_classes=1, **resolve_kwargs(c.create_kwargs))
    n = sum(p.numel() for p in m.parameters()) / 1e6
    assert abs(n - c.params_m) / c.params_m < 0.005, (n, c.params_m)
    assert m.num_features == c.embed_dim


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_entry_round_trips_through_a_run_record(name):
    """config.json records the entry as JSON; ModelConfig.from_dict gives the same entry back."""
    from ami.train.registry import ModelConfig

    c = get(name)
    back = ModelConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert json.dumps(back.to_dict(), sort_keys=True) == json.dumps(c.to_dict(), sort_keys=True)
    assert (back.arch, back.preprocess, back.recipe, back.methods) == (c.arch, c.preprocess, c.recipe, c.methods)


def test_an_entry_recorded_with_the_old_tiny_arch_key_still_matches():
    """Runs recorded before ``tiny_arch`` was a field kept it as ``tiny_kwargs["_tiny_arch"]``: such a record
    has today's definition and rebuilds the same tiny stand-in."""
    from ami.train.registry import ModelConfig, current_name, definition

    c = get("efficientnetv2_m")
    assert c.tiny_arch == "efficientnetv2_rw_t" and c.tiny_kwargs == {}
    old = {k: v for k, v in json.loads(json.dumps(c.to_dict())).items() if k not in ("tiny_arch", "table3")}
    old["tiny_kwargs"] = {"_tiny_arch": "efficientnetv2_rw_t"}
    assert definition(old) == definition(c.to_dict())
    assert current_name({"model": "efficientnetv2_m", "method": "full", "registry_entry": old}) == "efficientnetv2_m"
    back = ModelConfig.from_dict(old)
    assert (back.tiny_arch, back.tiny_kwargs) == ("efficientnetv2_rw_t", {})


def test_a_run_rebuilds_the_entry_it_was_trained_with(tmp_path):
    """A run made before an entry changed (the edge model's v1) exports its own network, not today's."""
    from dataclasses import replace

    from ami.export.source import RunSource

    old = replace(get("edge"), arch="regnetx_002", embed_dim=368)
    src = RunSource(run_dir=tmp_path, config={"model": "edge", "method": "full",
                                              "registry_entry": json.loads(json.dumps(old.to_dict()))},
                    split={}, folds=["all"], metrics={})
    assert src.cfg.arch == "regnetx_002" and src.cfg.name == "edge"
    assert RunSource(run_dir=tmp_path, config={"model": "edge", "method": "full"}, split={}, folds=["all"],
                     metrics={}).cfg == get("edge")
