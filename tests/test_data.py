"""Datasets, data-root resolution and ami-data: on generated crops in the real layout (conftest's
synthetic_root) and broken copies of them, and on the real data for what only the real data can
show (the release's counts, split and pinned content fingerprints)."""

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ami.runtime import datasets as ds
from ami.runtime.cli.data import app
from synthetic_data import SMALL

runner = CliRunner()


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("AMI_DATA_ROOT", str(tmp_path / "env"))
    assert ds.resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    assert ds.resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("AMI_DATA_ROOT")
    assert ds.resolve_data_root(None) == ds.default_data_root()


def test_counts_and_split(data_root):
    amibr = ds.scan(data_root, "AMi-Br")
    assert len(amibr) == 3720 and sum(s.label for s in amibr) == 832
    train, test = ds.amibr_split(data_root)
    assert (len(train), len(test)) == (2894, 826)
    assert not {s.name for s in train} & {s.name for s in test}
    assert all(s.slide for s in train)
    md = ds.scan(data_root, "AtNorM-MD")
    assert len(md) == 2107 and sum(s.label for s in md) == 219
    sets = ds.available_eval_sets(data_root)
    assert len(sets["AMi-Br-test"]) == 826 and len(sets["AtNorM-MD"]) == 2107


def test_missing_dataset_is_reported_not_faked(synthetic_root):
    """The generated tree holds AtNorM-Br back, as the CI copy of the real data does."""
    root = synthetic_root
    assert not (root / "AtNorM-Br").exists()
    with pytest.raises(ds.DatasetMissing, match=r"dataset AtNorM-Br is not present: expected .*AtNorM-Br"):
        ds.scan(root, "AtNorM-Br")
    sets = ds.available_eval_sets(root)
    assert isinstance(sets["AtNorM-Br"], str) and "not present" in sets["AtNorM-Br"]
    assert str(root / "AtNorM-Br") in sets["AtNorM-Br"] and "AMI_DATA_ROOT" in sets["AtNorM-Br"]
    assert len(sets["AMi-Br-test"]) == SMALL.count("AMi-Br-test")
    assert len(sets["AtNorM-MD"]) == SMALL.count("AtNorM-MD")
    train, test = ds.amibr_split(root)
    assert len(train) == SMALL.count("AMi-Br-train") and all(s.slide for s in train)
    assert not {s.name for s in train} & {s.name for s in test}


def test_verify_cli_on_real_data(data_root):
    res = runner.invoke(app, ["verify", "--data-root", str(data_root), "--quick"])
    assert res.exit_code == 0, res.output
    assert "832/832" in res.output and "2888/2888" in res.output and "219/219" in res.output
    assert "AtNorM-Br  MISSING" in res.output


def _mini_copy(src_root: Path, dst: Path, n: int = 6) -> Path:
    """A small copy of AtNorM-MD, the dataset verify checks class by class."""
    for cls in ("Atypical", "Normal"):
        (dst / "AtNorM-MD" / cls).mkdir(parents=True)
        for p in sorted((src_root / "AtNorM-MD" / cls).iterdir())[:n]:
            shutil.copy(p, dst / "AtNorM-MD" / cls / p.name)
    return dst


def test_verify_finds_every_kind_of_damage(synthetic_root, tmp_path):
    root = _mini_copy(synthetic_root, tmp_path)
    rep = ds.verify_dataset(root, "AtNorM-MD")
    assert rep.present
    assert rep.problems == ["Atypical: found 6 crops, expected 219", "Normal: found 6 crops, expected 1888"]
    a = root / "AtNorM-MD" / "Atypical"
    n = root / "AtNorM-MD" / "Normal"
    both = sorted(a.iterdir())[0].name
    assert not (n / both).exists()
    shutil.copy(a / both, n / both)  # in both folders
    (a / "notes.txt").write_text("x")  # extra file
    (a / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")  # unreadable
    rep = ds.verify_dataset(root, "AtNorM-MD")
    text = "\n".join(rep.problems)
    assert f"{both} is in both Normal/ and Atypical/" in text
    assert "extra file Atypical/notes.txt" in text
    assert "broken.png: unreadable" in text
    res = runner.invoke(app, ["verify", "--data-root", str(root)])
    assert res.exit_code == 1
    assert "AMi-Br     MISSING" in res.output and "AtNorM-MD  MISMATCH" in res.output


def test_fingerprint_changes_with_content(synthetic_root, tmp_path):
    root = _mini_copy(synthetic_root, tmp_path, n=2)
    s = ds.scan(root, "AtNorM-MD")
    f1 = ds.fingerprint(s)
    assert f1 == ds.fingerprint(list(reversed(s)))  # order-independent
    p = s[0].path
    p.write_bytes(p.read_bytes() + b"\0")
    assert ds.fingerprint(s) != f1


def test_download_offline_fails_fast_with_alternative(tmp_path):
    res = runner.invoke(app, ["download", "--data-root", str(tmp_path / "d"), "--timeout", "3"])
    assert res.exit_code == 1
    assert "--data-root" in res.output
    assert not (tmp_path / "d" / "AMi-Br").exists()  # nothing half-written


def _linked_copy(data_root: Path, dst: Path, name: str = "AtNorM-MD") -> Path:
    """A full copy of one dataset made of symbolic links (fast): verify reads through them."""
    for cls in ("Atypical", "Normal"):
        (dst / name / cls).mkdir(parents=True)
        for p in (data_root / name / cls).iterdir():
            os.symlink(p, dst / name / cls / p.name)
    return dst


def test_verify_pins_the_release_and_finds_swapped_content(data_root, tmp_path):
    """Issue 14: a crop replaced by another crop's bytes keeps every count right; before, verify passed."""
    root = _linked_copy(data_root, tmp_path)
    rep = ds.verify_dataset(root, "AtNorM-MD", check_images=False)
    assert rep.ok and rep.fingerprint == rep.pinned == ds.PINNED_FINGERPRINTS["AtNorM-MD"], rep.problems
    a = sorted((root / "AtNorM-MD" / "Atypical").iterdir())
    victim, donor = a[0], a[1]
    victim.unlink()
    shutil.copy(donor, victim)  # same name, another crop's bytes
    rep = ds.verify_dataset(root, "AtNorM-MD", check_images=False)
    text = "\n".join(rep.problems)
    assert not rep.ok
    assert f"identical content under 2 names: Atypical/{donor.name}, Atypical/{victim.name}" in text or \
        f"identical content under 2 names: Atypical/{victim.name}, Atypical/{donor.name}" in text
    assert "differs from the public release" in text
    res = runner.invoke(app, ["verify", "--data-root", str(root), "--quick"])
    assert res.exit_code == 1 and "!= public release" in res.output


def test_verify_real_data_matches_the_pins(data_root):
    for name in ("AMi-Br", "AtNorM-MD"):
        rep = ds.verify_dataset(data_root, name, check_images=False)
        assert rep.ok and rep.fingerprint == ds.PINNED_FINGERPRINTS[name], (name, rep.problems)
