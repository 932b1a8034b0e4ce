"""The shipped edge model: loads, describes itself completely, matches its PyTorch weights on
real crops, and the README's main job (`ami-infer --sample`) runs and can be repeated."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ami.runtime.artifact import REQUIRED
from ami.runtime.engines import load_engine

ASSETS = Path(__file__).resolve().parents[1] / "runtime" / "assets"


def test_assets_within_size_budget():
    """Issue 4's budget: the exported model and the PyTorch weights it came from, together <= 40 MB.
    The optional int8 engine comes on top; every asset together stays under 48 MB."""
    pair = [ASSETS / n for n in ("edge.onnx", "edge.safetensors")]
    every = pair + [ASSETS / "edge-int8.onnx"] + sorted(ASSETS.glob("edge-card.*")) + sorted((ASSETS / "samples").iterdir())
    assert all(f.is_file() for f in every)
    assert sum(f.stat().st_size for f in pair) <= 40e6
    assert sum(f.stat().st_size for f in every) <= 48e6


def test_shipped_metadata_is_complete():
    eng = load_engine(None, provider="cpu")
    m = eng.meta
    d = json.loads(m.to_json())
    assert all(k in d for k in REQUIRED)
    assert m.model.startswith("edge") and m.precision == "fp32" and m.preprocess.input_size == 128
    assert m.threshold == 0.5 and "held-out fold" in m.threshold_rule
    assert m.source.get("folds_sha256") and m.validation.get("folds")
    card = json.loads((ASSETS / "edge-card.json").read_text())
    assert card["split"]["folds_sha256"] == m.source["folds_sha256"]


def test_shipped_onnx_matches_pytorch_weights_on_real_crops(data_root):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from ami.runtime.datasets import amibr_split
    from ami.runtime.imageio import decode_rgb
    from ami.train import data as D
    from ami.train.models import create
    from ami.train.registry import get

    meta = load_engine(None, provider="cpu").meta
    cfg = get(meta.model)  # the artefact names its registry entry; the entry builds the same network
    assert cfg.arch == meta.source["arch"], (cfg.arch, meta.source["arch"])
    model = create(cfg, "full", random_init=True, drop_rate=cfg.recipe.drop_rate)
    model.load_state_dict(load_file(str(ASSETS / "edge.safetensors")))
    model.eval()
    _, test = amibr_split(data_root)
    crops = np.stack([cfg.preprocess.to_uint8(decode_rgb(s.path)) for s in test[::26]])
    with torch.no_grad():
        ref = torch.sigmoid(model(D.eval_batch(torch.from_numpy(crops), cfg.preprocess))).numpy()
    got = load_engine(None, provider="cpu").predict(crops)
    assert np.abs(got - ref).max() <= 1e-4
    assert ((got >= 0.5) == (ref >= 0.5)).all()


def test_sample_demo_runs_and_repeats(tmp_path):
    cmd = [sys.executable, "-c", "from ami.runtime.cli.infer import main; main()", "--sample", "--no-progress"]
    for _ in range(2):  # the demo replaces its own output file
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    rows = (tmp_path / "ami-sample.csv").read_text().splitlines()
    assert len(rows) == 33 and "agreement with the experts' labels" in res.stdout
