"""Exporting LoRA and linear-probe runs: merge in float32, check merged == unmerged on training
crops, export the plain network. Uses tiny random stand-ins of a foundation-model ViT (the real
weights are gated on the hub), trained for one epoch on a few generated crops in the real layout
(conftest's synthetic_folds_root: its training part is the pinned folds' crops)."""

from __future__ import annotations

import numpy as np
import pytest

from ami.export import onnx_export as OE
from ami.export.checks import CheckFailed, session, validate_contract

adapt = pytest.importorskip("ami.train.adapt", reason="LoRA export needs ami.train.adapt (merge_lora)")
pytest.importorskip("peft", reason="LoRA needs peft")

FAST = dict(check_crops=12, check_batch=6, threads=1)


def _lora_entry() -> str:
    from ami.train.registry import REGISTRY

    for name, c in REGISTRY.items():
        if "lora" in c.methods and c.tiny_kwargs and c.arch.startswith("vit"):
            return name
    pytest.skip("no registry entry with LoRA and a tiny ViT stand-in")


def _run(tmp_path_factory, synthetic_folds_root, method: str):
    import torch

    from ami.train.fit import RunSpec, run

    torch.set_num_threads(1)
    name = _lora_entry()
    d = tmp_path_factory.mktemp(method) / f"{name}-{method}"
    spec = RunSpec(model=name, method=method, run_dir=d, data_root=synthetic_folds_root, tiny=True, random_init=True,
                   max_train=16, max_eval=16, recipe_overrides={"epochs": 1, "batch_size": 8}, eval_sets=(),
                   threads=1, cache_dir=d.parent / "cache")
    run(spec, [0], log=lambda *a: None)
    return d


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, synthetic_folds_root):
    return _run(tmp_path_factory, synthetic_folds_root, "lora")


def test_lora_run_exports_merged_and_checked(lora_run, synthetic_folds_root, tmp_path):
    out = tmp_path / "lora.onnx"
    OE.export_onnx(lora_run, out, data_root=synthetic_folds_root, **FAST, log=lambda *a: None)
    meta = validate_contract(out)
    assert meta.method == "lora" and meta.folds == [0] and "TINY" in meta.display
    merge = meta.extra["lora_merge"]["0"]
    assert merge["merged"] and merge["max_abs_diff"] <= 1e-5 and merge["n_crops"] == 12
    assert meta.extra["self_check"]["max_abs_diff"] <= 1e-4
    assert "peft" in meta.versions
    import onnx

    names = [n.name for n in onnx.load(str(out)).graph.node]
    assert not any("lora" in n.lower() for n in names)  # plain backbone weights, no adapter branches
    x = np.random.default_rng(0).integers(0, 256, (3, meta.preprocess.input_size, meta.preprocess.input_size, 3),
                                          dtype=np.uint8)
    s = session(out, 1)
    p3 = s.run(None, {"pixels": x})[0]
    p1 = np.concatenate([s.run(None, {"pixels": x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(p1, p3, atol=1e-5)


def test_bad_merge_is_refused_with_the_difference(lora_run, synthetic_folds_root, tmp_path, monkeypatch):
    import torch

    real = adapt.merge_lora

    def sloppy(model, *a, **kw):  # a merge that drifts, as merging in low precision does
        merged = real(model, *a, **kw)
        with torch.no_grad():
            for p in merged.parameters():
                p.add_(1e-2 * torch.randn_like(p))
        return merged

    monkeypatch.setattr(adapt, "merge_lora", sloppy)
    out = tmp_path / "lora.onnx"
    with pytest.raises(CheckFailed, match=r"merged and unmerged models differ by max \|delta probability\| \S+"):
        OE.export_onnx(lora_run, out, data_root=synthetic_folds_root, **FAST, log=lambda *a: None)
    assert not out.exists() and not [p for p in tmp_path.iterdir()]


def test_linear_probe_run_exports(tmp_path_factory, synthetic_folds_root, tmp_path):
    d = _run(tmp_path_factory, synthetic_folds_root, "linear")
    out = tmp_path / "linear.onnx"
    OE.export_onnx(d, out, data_root=synthetic_folds_root, **FAST, log=lambda *a: None)
    meta = validate_contract(out)
    assert meta.method == "linear" and meta.extra["self_check"]["max_abs_diff"] <= 1e-4
    assert "lora_merge" not in meta.extra
