"""ami-train on this CPU: tiny stand-ins of every registry entry, weight loading, LoRA, the
embedding cache, one end-to-end run, and kill-and-resume. No downloads; the runs train on generated
crops in the real layout whose training part is the pinned folds' crops (conftest's
synthetic_folds_root), so they run without the real data."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ami.train.adapt import HEAD, adapted_modules, classifier_of, embed, merge_lora
from ami.train.foldmodel import load_fold_model
from ami.train.models import WeightsUnavailable, build_backbone, create
from ami.train.registry import REGISTRY, get
from ami.train.weights import WeightsMismatch, load_pretrained

REPO = Path(__file__).resolve().parents[1]
BLOCK_LINEARS = ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and offline mode: nothing may come from the network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tiny(name: str, method: str = "full", seed: int = 0):
    torch.manual_seed(seed)
    cfg = get(name)
    return cfg, create(cfg, method, tiny=True, random_init=cfg.pretrained)


def _expected_dim(cfg, model) -> int:
    if "embed_dim" in cfg.tiny_kwargs and cfg.embedding in ("cls", "cls+mean"):
        return cfg.tiny_kwargs["embed_dim"] * (2 if cfg.embedding == "cls+mean" else 1)
    bb = classifier_of(model).backbone if classifier_of(model) is not None else model.net
    return bb.num_features  # timm's pooled width (CNN / Swin stand-ins)


# -- every entry, as its tiny stand-in ----------------------------------------------------------
@pytest.mark.parametrize("name", list(REGISTRY))
def test_tiny_stand_in_forward_embed_and_one_step(name):
    cfg = get(name)
    s = cfg.preprocess.input_size
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0.0, 1.0])
    for method in cfg.methods:
        _, model = _tiny(name, method)
        assert model(x).shape == (2,)
        with torch.no_grad():
            assert embed(model, x, cfg).shape == (2, _expected_dim(cfg, model))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if method == "linear":
            assert trainable == {f"net.{HEAD}.weight", f"net.{HEAD}.bias"}
        if method == "lora" and "depth" not in cfg.tiny_kwargs:  # a CNN (lite0): every dense convolution
            clf = classifier_of(model)
            # PEFT wraps each adapted conv; the original nn.Conv2d lives on as its base_layer
            want = sorted(f"backbone.{n[:-len('.base_layer')]}" for n, m in clf.backbone.named_modules()
                          if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and n.endswith(".base_layer"))
            dense = [n for n, m in clf.backbone.named_modules() if isinstance(m, torch.nn.Conv2d)
                     and m.groups == 1 and "lora_" not in n and not n.endswith(".base_layer")]
            assert not dense, dense  # no dense convolution was left out
            assert adapted_modules(model) == want and want
        elif method == "lora":
            depth = cfg.tiny_kwargs["depth"]
            want = sorted(f"backbone.blocks.{i}.{m}" for i in range(depth) for m in BLOCK_LINEARS)
            assert adapted_modules(model) == want  # the EXACT list: never patch_embed.proj, nothing else
            lora = {n for n in trainable if ".lora_" in n}
            assert len(lora) == 2 * len(want) and all("patch_embed" not in n for n in lora)
            assert trainable - lora == {f"net.base_model.model.{HEAD}.modules_to_save.default.weight",
                                        f"net.base_model.model.{HEAD}.modules_to_save.default.bias"}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= trainable, (name, method, sorted(changed - trainable)[:3])
        assert torch.isfinite(loss)


@pytest.mark.parametrize("method", ["lora", "linear"])
def test_the_new_head_starts_as_the_recipe_says(method):
    """head_init=timm: the head timm's ViT constructor builds for num_classes=1 (trunc normal, std 0.02, zero
    bias), as the UNI / UNI2-h / Prov-GigaPath LoRA scripts; head_init=linear: nn.Linear's default."""
    from ami.train.adapt import init_head

    cfg = get("uni")
    heads = {}
    for how in ("timm", "linear"):
        torch.manual_seed(0)
        model = create(cfg, method, tiny=True, random_init=True, head_init=how)
        heads[how] = getattr(classifier_of(model), HEAD)
    w, b = heads["timm"].weight.detach(), heads["timm"].bias.detach()
    assert torch.count_nonzero(b) == 0 and 0.01 < float(w.std()) < 0.03
    lw, lb, fan_in = heads["linear"].weight.detach(), heads["linear"].bias.detach(), heads["linear"].in_features
    assert torch.count_nonzero(lb) == 1 and float(lw.abs().max()) <= fan_in ** -0.5
    assert float(lw.std()) > 0.05  # nn.Linear's U(-1/sqrt(fan_in), +): std 1/sqrt(3 fan_in), 0.10 at width 32
    with pytest.raises(ValueError, match="unknown head_init 'zeros': linear or timm"):
        init_head(torch.nn.Linear(4, 1), "zeros")


def test_fit_builds_the_model_with_the_recipes_head_init(monkeypatch, synthetic_folds_root, tmp_path):
    """ami-train hands the recipe's head_init (timm for the UNI LoRA script) to create()."""
    from ami.train import fit

    seen = {}

    def fake_create(cfg, method, **kw):
        seen.update(kw)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(fit, "create", fake_create)
    spec = fit.RunSpec(model="uni", method="lora", run_dir=tmp_path / "run", data_root=synthetic_folds_root, tiny=True,
                       random_init=True, max_train=16, max_eval=8, recipe_overrides={"epochs": 1}, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        fit.run(spec, [0], log=lambda *_a, **_k: None)
    assert seen["head_init"] == "timm" == get("uni").recipe_for("lora").head_init


def test_lora_merge_matches_unmerged_output():
    _, model = _tiny("uni", "lora", seed=3)
    clf = classifier_of(model)
    with torch.no_grad():  # LayerScale 1e-5 would hide LoRA's effect in a random model: open the branches
        for b in clf.backbone.blocks:
            b.ls1.gamma.fill_(1.0)
            b.ls2.gamma.fill_(1.0)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), torch.tensor([0.0, 1.0, 1.0])).backward()
        opt.step()
    model.eval()
    qkv = clf.backbone.blocks[0].attn.qkv
    base_w = qkv.base_layer.weight.detach().clone()
    with torch.no_grad():
        want = model(x)
        with model.net.disable_adapter():
            plain = model(x)
    assert (want - plain).abs().max() > 1e-3  # the adapters really change the output
    merged = merge_lora(model, example=x)
    assert type(merged).__name__ == "LogitModel" and not any("lora" in n for n, _ in merged.named_modules())
    assert not torch.equal(merged.net.backbone.blocks[0].attn.qkv.weight, base_w)  # folded into the weights
    with torch.no_grad():
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=1e-5)
    assert merged.merge_check["max_abs_diff"] <= 1e-5


# -- weights -------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_round_trip_bit_exactly(tmp_path, suffix):
    cfg = get("virchow2")
    torch.manual_seed(1)
    src = build_backbone(cfg, tiny=True)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    torch.manual_seed(2)
    dst = build_backbone(cfg, tiny=True)
    info = load_pretrained(dst, cfg, str(path))
    got = dst.state_dict()
    body = [k for k in sd if not k.startswith("head.")]
    assert body and all(torch.equal(got[k], sd[k]) for k in body)
    assert info["kind"] == "file" and info["tensors_loaded"] == len(body) and info["head_tensors_ignored"]


def _assert_promised_message(text: str, *must: str):
    for s in ("refusing to train a random backbone", "Sources tried", "--weights FILE", "hf auth login", "HF_TOKEN",
              "--random-init", *must):
        assert s in text, (s, text)


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.bin"
    torch.save({"model": Evil()}, path)
    with pytest.raises(WeightsUnavailable) as e:
        create(get("uni"), "linear", tiny=True, weights=str(path))
    assert not marker.exists()
    _assert_promised_message(str(e.value), str(path), "holds pickled objects other than tensors", "NOT unpickled")


def test_missing_or_unreadable_file_fails_with_the_promised_message(tmp_path):
    with pytest.raises(WeightsUnavailable) as e:
        create(get("uni"), "lora", tiny=True, weights=str(tmp_path / "nope.safetensors"))
    _assert_promised_message(str(e.value), "nope.safetensors: no such file")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(WeightsUnavailable) as e:
        create(get("uni"), "lora", tiny=True, weights=str(bad))
    _assert_promised_message(str(e.value), "not a readable safetensors file")


def test_no_source_reachable_fails_fast_naming_the_hub_id(no_hub):
    t0 = time.time()
    with pytest.raises(WeightsUnavailable) as e:
        create(get("virchow2"), "linear", tiny=True)
    assert time.time() - t0 < 10
    _assert_promised_message(str(e.value), "hf-hub:paige-ai/Virchow2", "HF_HUB_OFFLINE is set", "paige-ai/Virchow2")


def test_unreachable_hub_is_probed_not_retried(monkeypatch, tmp_path):
    import ami.train.weights as W

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(W, "_probe_hub", lambda: "huggingface.co:443 unreachable (test)")
    with pytest.raises(WeightsUnavailable) as e:
        create(get("uni"), "linear", tiny=True)
    _assert_promised_message(str(e.value), "not in the local Hugging Face cache", "unreachable (test)")


PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
              "no_proxy", "HF_ENDPOINT", "REQUEST_METHOD")


@pytest.mark.parametrize("env,endpoint,want", [
    ({}, None, ("huggingface.co", 443)),
    ({"HTTPS_PROXY": "http://proxy.example:3128"}, None, ("proxy.example", 3128)),
    ({"https_proxy": "proxy.example:8080"}, None, ("proxy.example", 8080)),
    ({"ALL_PROXY": "socks5://socks.example"}, None, ("socks.example", 1080)),
    ({"HTTPS_PROXY": "http://proxy.example:3128", "NO_PROXY": "localhost,huggingface.co"}, None, ("huggingface.co", 443)),
    ({"HTTPS_PROXY": "http://proxy.example:3128", "no_proxy": "*"}, None, ("huggingface.co", 443)),
    ({"HTTPS_PROXY": "http://proxy.example:3128", "HTTP_PROXY": "http://plain.example:80"}, "http://mirror.example:8000",
     ("plain.example", 80)),
    ({"HTTPS_PROXY": "http://proxy.example:3128"}, "https://mirror.example", ("proxy.example", 3128)),
])
def test_the_hub_probe_goes_through_the_proxy_the_environment_names(monkeypatch, env, endpoint, want):
    """On a cluster node behind an HTTPS proxy the probe asks the proxy, as huggingface_hub's client does
    (no raw connection to a host the node cannot reach directly); NO_PROXY sends it straight to the hub."""
    import ami.train.weights as W

    for k in PROXY_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in {**env, **({"HF_ENDPOINT": endpoint} if endpoint else {})}.items():
        monkeypatch.setenv(k, v)
    seen = []

    class Fake:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def connect(address, timeout):
        seen.append(address)
        if address != want:
            raise ConnectionRefusedError("refused (test)")
        return Fake()

    monkeypatch.setattr(W.socket, "create_connection", connect)
    assert W._probe_hub() is None and seen == [want]
    monkeypatch.setattr(W.socket, "create_connection", lambda address, timeout: (_ for _ in ()).throw(OSError("down")))
    reason = W._probe_hub()
    host = urlparse(endpoint or "https://huggingface.co").hostname
    via = f"{want[0]}:{want[1]} unreachable" if want[0] == host else f"proxy {want[0]}:{want[1]} (from "
    assert reason.startswith(via) and reason.endswith("(OSError: down)"), reason


def test_offline_hub_cache_is_used(no_hub, tmp_path):
    cfg = get("h0_mini")
    torch.manual_seed(4)
    src = build_backbone(cfg, tiny=True)
    repo = tmp_path / "hf" / "models--bioptimus--H0-mini"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("head.")},
              str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    torch.manual_seed(5)
    dst = build_backbone(cfg, tiny=True)
    info = load_pretrained(dst, cfg)
    assert (info["kind"], info["revision"], info["source"]) == ("hub-cache", "0123abcd", "hf-hub:bioptimus/H0-mini")
    assert torch.equal(dst.state_dict()["blocks.1.mlp.fc1.weight"], src.state_dict()["blocks.1.mlp.fc1.weight"])


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.manual_seed(0)
    other = build_backbone(get("virchow2"), tiny=True)  # reg tokens + SwiGLU: does not fit UNI
    path = tmp_path / "virchow2.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(WeightsMismatch) as e:
        create(get("uni"), "linear", tiny=True, weights=str(path))
    assert "does not fit uni" in str(e.value) and "reg_token" in str(e.value) and "shape mismatches" in str(e.value)


@pytest.mark.parametrize("change", [{"img_size": 112}, {"patch_size": 8}])
def test_a_checkpoint_that_fits_only_by_resampling_is_refused(tmp_path, change):
    """timm's checkpoint filter would resample a position or patch embedding of another image or patch
    size to fit; ami refuses and names the tensor and both shapes (the load is strict)."""
    from ami.train.weights import ShapeConverted

    cfg = get("uni")
    torch.manual_seed(0)
    other = build_backbone(cfg, tiny=True, **change)
    sd = {k: v.contiguous() for k, v in other.state_dict().items()}
    path = tmp_path / "other.safetensors"
    save_file(sd, str(path))
    dst = build_backbone(cfg, tiny=True)
    key = "pos_embed" if "img_size" in change else "patch_embed.proj.weight"
    want = f"{key}: {tuple(sd[key].shape)} -> {tuple(dst.state_dict()[key].shape)}"
    with pytest.raises(ShapeConverted, match=re.escape(want)) as e:
        load_pretrained(dst, cfg, str(path))
    assert f"{path} fits uni (vit_large_patch16_224) only if timm's checkpoint filter changes the shape" in str(e.value)
    assert isinstance(e.value, WeightsMismatch)  # a checkpoint that does not fit: the same family of refusal


def test_a_foreign_key_layout_is_renamed_by_timms_converter_and_loads_exactly(tmp_path):
    """A conversion that only renames keys (here OpenCLIP's ``visual.trunk.`` prefix) is accepted, recorded
    as converted, and loads every tensor bit for bit."""
    cfg = get("uni")
    torch.manual_seed(0)
    src = build_backbone(cfg, tiny=True)
    sd = {k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("head.")}
    path = tmp_path / "open_clip.safetensors"
    save_file({f"visual.trunk.{k}": v for k, v in sd.items()}, str(path))
    torch.manual_seed(1)
    dst = build_backbone(cfg, tiny=True)
    info = load_pretrained(dst, cfg, str(path))
    assert info["converted_by_timm_filter"] and info["tensors_loaded"] == len(sd)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())


def test_even_a_lossless_reshape_by_the_converter_is_refused(tmp_path):
    """Strict means strict: a flattened (linear) patch embedding that timm would reshape into the convolution
    is refused as well, naming the tensor and both shapes."""
    cfg = get("uni")
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in build_backbone(cfg, tiny=True).state_dict().items()}
    w = sd["patch_embed.proj.weight"]
    sd["patch_embed.proj.weight"] = w.flatten(1).contiguous()
    path = tmp_path / "linear-patch.safetensors"
    save_file(sd, str(path))
    want = f"patch_embed.proj.weight: {tuple(w.flatten(1).shape)} -> {tuple(w.shape)}"
    with pytest.raises(WeightsMismatch, match=re.escape(want)):
        load_pretrained(build_backbone(cfg, tiny=True), cfg, str(path))


# -- the embedding cache -------------------------------------------------------------------------
def test_embedding_cache_extracts_once_and_refuses_other_inputs(synthetic_root, tmp_path):
    from ami.runtime.datasets import amibr_split
    from ami.train import data as D
    from ami.train.fit import predict
    from ami.train.linear import EmbeddingCache, EmbeddingCacheError, extractor_identity

    cfg, model = _tiny("virchow2", "linear")
    model.eval()
    samples = amibr_split(synthetic_root)[0][:10]
    ident = extractor_identity(cfg, model, tiny=True, random_init=True, seed=0, amp="none")
    cache = EmbeddingCache(tmp_path / "cache", log=lambda s: None)
    first = cache.get(model, ident, "AMi-Br-train", samples, cfg.preprocess, torch.device("cpu"))
    assert first.extracted and first.x.shape == (10, 64)
    again = cache.get(model, ident, "AMi-Br-train", list(reversed(samples)), cfg.preprocess, torch.device("cpu"))
    assert not again.extracted and torch.equal(again.x, first.x)
    # a head on the cached vectors predicts what the whole model predicts on the crops
    x, _, _ = first.take(samples)
    head = getattr(classifier_of(model), HEAD)
    with torch.no_grad():
        p_cache = torch.sigmoid(head(x).squeeze(1)).numpy()
    p_model = predict(model, D.load_crops(samples, cfg.preprocess), cfg, torch.device("cpu"))
    assert abs(p_cache - p_model).max() < 1e-5
    # other inputs -> another entry, never an overwrite
    other = dict(ident, amp="bf16")
    assert cache.entry_dir(other, "AMi-Br-train", "x") != cache.entry_dir(ident, "AMi-Br-train", "x")
    manifest = first.entry / "manifest.json"
    m = json.loads(manifest.read_text())
    m["inputs"]["extractor"]["preprocess"]["interpolation"] = "nearest"
    manifest.write_text(json.dumps(m))
    with pytest.raises(EmbeddingCacheError, match=r"built from different inputs.*extractor\.preprocess"):
        cache.get(model, ident, "AMi-Br-train", samples, cfg.preprocess, torch.device("cpu"))
    m["inputs"]["extractor"]["preprocess"]["interpolation"] = cfg.preprocess.interpolation
    manifest.write_text(json.dumps(m))
    (first.entry / "embeddings.safetensors").write_bytes(b"truncated")
    with pytest.raises(EmbeddingCacheError, match="sha256"):
        cache.get(model, ident, "AMi-Br-train", samples, cfg.preprocess, torch.device("cpu"))


# -- end to end (generated crops, the pinned folds) ---------------------------------------------
SMALL = ["--tiny", "--folds", "0,1", "--epochs", "1", "--max-train", "64", "--max-eval", "32", "--threads", "1"]


def _train(args: list[str]):
    from ami.train.cli import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def test_end_to_end_runs_and_table(synthetic_folds_root, tmp_path):
    data_root = synthetic_folds_root
    from ami.runtime.datasets import TEST_SETS, available_eval_sets

    runs = {"lora": tmp_path / "uni-lora", "linear": tmp_path / "uni-linear"}
    for method, out in runs.items():
        _train(["-m", "uni", "--method", method, "--random-init", "--out", str(out), "--data-root", str(data_root),
                "--cache-dir", str(tmp_path / "cache"), *SMALL])
    present = {k: not isinstance(v, str) for k, v in available_eval_sets(data_root).items()}
    for method, out in runs.items():
        assert (out / "config.json").is_file() and (out / "split.json").is_file()
        conf = json.loads((out / "config.json").read_text())
        assert conf["random_init"] and "NOT the pretrained model" in conf["weights_source"]
        for k in (0, 1):
            fdir = out / f"fold{k}"
            assert (fdir / "best.safetensors").is_file() and (fdir / "history.csv").is_file()
            assert not (fdir / "state.pt").exists()
            m = json.loads((fdir / "metrics.json").read_text())
            assert (m["fold"], m["method"], m["best_epoch"], m["epochs_run"]) == (k, method, 0, 1)
            assert m["random_init"] is True and m["tiny_stand_in"] is True
            assert m["validation"]["n"] == 32 and len(m["predictions"]["validation"]) == 32
            for ds in TEST_SETS:
                if present[ds]:
                    assert m["tests"][ds]["n"] == 32 and len(m["predictions"][ds]) == 32
                else:
                    assert "absent" in m["tests"][ds] and ds not in m["predictions"]
    # completed folds are not retrained
    stamp = (runs["linear"] / "fold0" / "metrics.json").stat().st_mtime_ns
    out = _train(["-m", "uni", "--method", "linear", "--random-init", "--out", str(runs["linear"]),
                  "--data-root", str(data_root), "--cache-dir", str(tmp_path / "cache"), *SMALL])
    assert out.count("already complete, skipping") == 2
    assert (runs["linear"] / "fold0" / "metrics.json").stat().st_mtime_ns == stamp
    # the saved fold model reproduces its recorded validation predictions
    from ami.runtime.datasets import amibr_split
    from ami.train import data as D
    from ami.train.fit import predict

    m = json.loads((runs["linear"] / "fold0" / "metrics.json").read_text())
    rows = m["predictions"]["validation"][:6]
    by_name = {s.name: s for s in amibr_split(data_root)[0]}
    model = load_fold_model(runs["linear"], 0)
    p = predict(model, D.load_crops([by_name[r[0]] for r in rows], get("uni").preprocess), get("uni"),
                torch.device("cpu"))
    assert abs(p - [r[2] for r in rows]).max() < 1e-5
    # the table
    import typer

    from ami.bench.table import register

    bench = typer.Typer()
    register(bench)
    bench.command("noop")(lambda: None)  # a second command keeps `table` a sub-command
    res = CliRunner().invoke(bench, ["table", str(runs["lora"]), str(runs["linear"]), "--paper",
                                     "--long", str(tmp_path / "long.csv")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("| model | folds | AMi-Br BA | paper |")
    row = next(ln for ln in lines if ln.startswith("| UNI (linear) [random init, tiny stand-in, subset 64/32]"))
    assert "| 0,1 |" in row and "0.6477 ± 0.0108" in row  # the paper's figure, beside ours
    if not present["AtNorM-Br"]:
        assert "| absent |" in row
    assert any(ln.startswith("| UNI (LoRA) [random init") for ln in lines)
    assert len((tmp_path / "long.csv").read_text().splitlines()) > 2 * 2 * 4 * 2


@pytest.mark.slow
@pytest.mark.parametrize("name,method", [("uni", "lora"), ("vit_large_patch16_224", "full")])
def test_lora_and_full_runs_record_the_weights_they_started_from(synthetic_folds_root, tmp_path, name, method):
    """metrics.json of a LoRA or full run names its starting weights (source, SHA-256), as a linear run's does."""
    from ami.runtime import hashing
    from ami.train.fit import RunSpec, run

    cfg = get(name)
    torch.manual_seed(0)
    path = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in build_backbone(cfg, tiny=True).state_dict().items()}, str(path))
    spec = RunSpec(model=name, method=method, run_dir=tmp_path / "run", data_root=synthetic_folds_root, tiny=True,
                   weights=str(path), max_train=16, max_eval=8, recipe_overrides={"epochs": 1}, threads=1,
                   device="cpu", eval_sets=())
    run(spec, [0], log=lambda *_a, **_k: None)
    m = json.loads((tmp_path / "run" / "fold0" / "metrics.json").read_text())
    w = m["weights"]
    assert (w["kind"], w["source"], w["sha256"]) == ("file", str(path), hashing.file_sha256(path))
    assert w["tensors_loaded"] > 0 and m["random_init"] is False


def test_kill_and_resume(synthetic_folds_root, tmp_path):
    """SIGKILL after the first epoch's checkpoint; the same command continues from the next epoch."""
    torch.manual_seed(7)
    weights = tmp_path / "uni_tiny.safetensors"  # pretrained-style source: checkpoints hold the LoRA part only
    save_file({k: v.contiguous() for k, v in build_backbone(get("uni"), tiny=True).state_dict().items()},
              str(weights))
    out = tmp_path / "run"
    args = ["-m", "uni", "--method", "lora", "--tiny", "--weights", str(weights), "--folds", "0", "--epochs", "4",
            "--max-train", "32", "--max-eval", "16", "--threads", "1", "--out", str(out),
            "--data-root", str(synthetic_folds_root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from ami.train.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    state = out / "fold0" / "state.pt"
    deadline = time.time() + 900  # generous: a loaded CI machine may take minutes to import torch
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate()[0].decode()
    assert state.exists(), "no checkpoint appeared before the run ended:\n" + log
    assert not (out / "fold0" / "metrics.json").exists()
    st = torch.load(state, map_location="cpu", weights_only=True)  # atomic: never a half-written file
    done = st["epoch"]
    assert done < 3 and st["model_contents"] == "trainable"
    first_rows = st["history"]
    res = _train(args)
    assert f"resuming after epoch {done}" in res
    assert f"epoch {done + 2}/4" in res and f"epoch {done + 1}/4" not in res
    m = json.loads((out / "fold0" / "metrics.json").read_text())
    assert m["epochs_run"] == 4 and not state.exists()
    with (out / "fold0" / "history.csv").open() as f:
        hist = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in hist] == [0, 1, 2, 3]
    for before, after in zip(first_rows, hist):  # epochs finished before the kill are kept, not redone
        assert float(after["train_loss"]) == pytest.approx(before["train_loss"])


def test_autocast_modes():
    """bf16 autocast trains on CPU; CPU evaluation stays float32 (the shipped engine's precision)."""
    from ami.train.loop import autocast

    cpu = torch.device("cpu")
    lin = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with autocast(cpu, "bf16", training=True):
        assert lin(x).dtype == torch.bfloat16
    with autocast(cpu, "bf16"):
        assert lin(x).dtype == torch.float32
    with autocast(cpu, "none", training=True):
        assert lin(x).dtype == torch.float32
    with pytest.raises(ValueError, match="CUDA only"):
        autocast(cpu, "fp16", training=True)
    with pytest.raises(ValueError, match="unknown amp"):
        autocast(cpu, "int4")


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # a CUDA device object, no GPU
def test_float32_on_cuda_turns_tf32_off_and_restores_it(monkeypatch):
    """Whatever calls itself float32 on a GPU (--amp none, the training evaluation, the export's reference)
    runs with TF32 off for matmuls and cuDNN convolutions; the settings come back afterwards, also after an
    error. The CUDA flags are fakes here, so the test needs no GPU."""
    import types

    from ami.train.loop import autocast

    matmul, cudnn = types.SimpleNamespace(allow_tf32=True), types.SimpleNamespace(allow_tf32=True)
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    cuda = torch.device("cuda")
    for training in (True, False):
        with autocast(cuda, "none", training=training):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
    with pytest.raises(RuntimeError, match="boom"), autocast(cuda, "none"):
        raise RuntimeError("boom")
    assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
    cudnn.allow_tf32 = False  # a user's own setting is kept, not forced back on
    with autocast(cuda, "none"):
        assert not cudnn.allow_tf32
    assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, False)
    with autocast(cuda, "bf16"):  # mixed precision is not float32: the flags are left alone
        assert matmul.allow_tf32
    with autocast(torch.device("cpu"), "none"):  # no TF32 on a CPU: nothing to change
        assert matmul.allow_tf32


def test_the_exports_reference_runs_in_float32(monkeypatch):
    """ami.export's reference probabilities go through the same float32 context (TF32 off on CUDA)."""
    import numpy as np

    from ami.export.ensemble import reference_probs
    from ami.train import loop

    seen = []
    real = loop.float32

    def spy(device):
        seen.append(device)
        return real(device)

    monkeypatch.setattr(loop, "float32", spy)
    cfg = get("edge")
    size = cfg.preprocess.input_size
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, 1), torch.nn.Flatten(0))
    images = np.zeros((2, size, size, 3), np.uint8)
    assert reference_probs([net], cfg.preprocess, images).shape == (2,)
    assert seen == [torch.device("cpu")]


def test_each_method_has_one_fold_trainer():
    from ami.train.fit import EndToEndTrainer, trainer_for
    from ami.train.linear import LinearProbeTrainer
    from ami.train.loop import FoldTrainer
    from ami.train.registry import METHODS

    assert all(isinstance(trainer_for(m), FoldTrainer) for m in METHODS)
    assert type(trainer_for("linear")) is LinearProbeTrainer
    assert type(trainer_for("full")) is type(trainer_for("lora")) is EndToEndTrainer
    with pytest.raises(ValueError, match="unknown method 'probe'"):
        trainer_for("probe")


def test_mixup_blends_inputs_and_targets_reproducibly():
    from ami.train.loop import mixup

    x = torch.eye(8).reshape(8, 2, 2, 2)  # crop i is the i-th basis vector: its mix partner is readable
    y = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0])
    xa, ya = mixup(x, y, 0.4, torch.Generator().manual_seed(3))
    xb, yb = mixup(x, y, 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same generator state, same mixes (resume)
    flat = xa.reshape(8, 8)
    diag = flat.diagonal()
    mixed = diag[diag < 1 - 1e-6]  # rows whose partner is another crop: their own weight is lam
    assert mixed.numel() > 0 and torch.allclose(mixed, mixed[0].expand_as(mixed))
    lam = mixed[0].item()
    assert 0.0 <= lam <= 1.0 and torch.allclose(flat.sum(1), torch.ones(8))
    for i in range(8):
        j = int(torch.argmax(torch.where(torch.arange(8) == i, -1.0, flat[i]))) if flat[i, i] < 1 else i
        assert flat[i, i].item() == pytest.approx(lam + (1 - lam) * (j == i), abs=1e-6)
        assert ya[i].item() == pytest.approx(lam * y[i].item() + (1 - lam) * y[j].item(), abs=1e-6)
    assert not torch.equal(xa, x)  # something was mixed


def test_an_older_config_without_a_new_recipe_key_still_resumes(tmp_path, synthetic_folds_root):
    """Adding a recipe option, or changing an entry's default recipe, must not lock runs made before
    it out of `ami-train` resume; changing the network must."""
    data_root = synthetic_folds_root
    from ami.train.fit import Run as Trainer
    from ami.train.fit import RunSpec

    spec = RunSpec(model="edge", method="full", run_dir=tmp_path, data_root=data_root)
    Trainer(spec, log=lambda *_: None).prepare()
    conf = json.loads((tmp_path / "config.json").read_text())
    for holder in (conf["recipe"], conf["registry_entry"]["recipe"]):
        del holder["mixup_alpha"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    Trainer(spec, log=lambda *_: None).prepare()  # no "different configuration" exit
    # the entry's default recipe moved on since (e.g. 60 -> 100 epochs) but the run's own recipe is
    # the same: still resumable; a different network definition is not
    conf["registry_entry"]["recipe"]["epochs"] += 40
    conf["registry_entry"]["display"] = "an older display name"
    (tmp_path / "config.json").write_text(json.dumps(conf))
    Trainer(spec, log=lambda *_: None).prepare()
    conf["registry_entry"]["arch"] = "regnetx_002"
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(SystemExit, match="differs in: registry_entry"):
        Trainer(spec, log=lambda *_: None).prepare()
    conf["registry_entry"]["arch"] = get("edge").arch
    (tmp_path / "config.json").write_text(json.dumps(conf))
    spec2 = RunSpec(model="edge", method="full", run_dir=tmp_path, data_root=data_root,
                    recipe_overrides={"mixup_alpha": 0.2})
    with pytest.raises(SystemExit, match="different configuration"):
        Trainer(spec2, log=lambda *_: None).prepare()
