"""Offline weights are found in the local Hugging Face cache whatever the case of the hub id
(the hub treats `MahmoodLab/UNI` and `MahmoodLab/uni` as one repository; its cache keeps one
folder per spelling), and two cached copies that disagree stop the run with a clear message."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ami.train.models import build_backbone
from ami.train.registry import get
from ami.train.weights import CachedCopiesDisagree, load_pretrained


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def _cache(root, folder: str, sd: dict, rev: str = "0123abcd"):
    repo = root / folder
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("head.")},
              str(repo / "snapshots" / rev / "model.safetensors"))


def _tiny_uni(seed: int):
    torch.manual_seed(seed)
    return build_backbone(get("uni"), tiny=True)


def test_cache_folder_of_another_case_is_found(offline):
    assert get("uni").hub_id == "hf-hub:MahmoodLab/uni"
    src = _tiny_uni(1)
    _cache(offline, "models--MahmoodLab--UNI", src.state_dict())  # downloaded as `hf download MahmoodLab/UNI`
    dst = _tiny_uni(2)
    info = load_pretrained(dst, get("uni"))
    assert info["kind"] == "hub-cache" and info["source"] == "hf-hub:MahmoodLab/uni"
    assert info["cached_as"] == "hf-hub:MahmoodLab/UNI" and info["revision"] == "0123abcd"
    assert torch.equal(dst.state_dict()["blocks.1.mlp.fc1.weight"], src.state_dict()["blocks.1.mlp.fc1.weight"])


def test_two_identical_copies_are_fine_and_the_exact_spelling_wins(offline):
    sd = _tiny_uni(1).state_dict()
    _cache(offline, "models--MahmoodLab--UNI", sd, rev="aaaa")
    _cache(offline, "models--MahmoodLab--uni", sd, rev="bbbb")
    info = load_pretrained(_tiny_uni(2), get("uni"))
    assert info["revision"] == "bbbb" and "cached_as" not in info


def test_two_copies_that_disagree_are_refused_naming_both(offline):
    _cache(offline, "models--MahmoodLab--UNI", _tiny_uni(1).state_dict(), rev="aaaa")
    _cache(offline, "models--MahmoodLab--uni", _tiny_uni(3).state_dict(), rev="bbbb")
    with pytest.raises(CachedCopiesDisagree) as e:
        load_pretrained(_tiny_uni(2), get("uni"))
    msg = str(e.value)
    assert "hf-hub:MahmoodLab/UNI" in msg and "hf-hub:MahmoodLab/uni" in msg and "differ" in msg
    assert "--weights FILE" in msg and "sha256" in msg
