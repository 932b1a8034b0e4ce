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
    assert "128/128" in res.output and "618/618" in res.output
    assert res.output.count("= public release") == 3 and "!= public release" not in res.output
    assert ("AtNorM-Br: 27 groups of byte-identical crops (35 extra copies, 2 groups with conflicting labels) "
            "are the public release's own, as listed") in res.output
    assert "a crop replaced by another's bytes" not in res.output


def test_verify_fails_on_a_missing_dataset_unless_it_is_left_out(synthetic_root):
    """The benchmark needs all three sets: a missing one fails verify (exit 1); --dataset checks a
    partial data root on purpose."""
    res = runner.invoke(app, ["verify", "--data-root", str(synthetic_root), "--quick"])
    assert res.exit_code == 1, res.output
    assert "AtNorM-Br  MISSING" in res.output and "dataset AtNorM-Br is not present" in res.output
    res = runner.invoke(app, ["verify", "--data-root", str(synthetic_root), "--quick", "--dataset", "AtNorM-Br"])
    assert res.exit_code == 1 and "AtNorM-Br  MISSING" in res.output
    res = runner.invoke(app, ["verify", "--data-root", str(synthetic_root), "--quick", "--dataset", "Nope"])
    assert res.exit_code == 2 and "unknown dataset 'Nope'; known: AMi-Br, AtNorM-Br, AtNorM-MD" in res.output


def test_known_duplicates_of_the_release_and_the_deduplicated_set(data_root):
    known = ds.known_duplicates("AtNorM-Br")
    assert len(known) == 27 and sum(len(v) - 1 for v in known.values()) == 35
    assert ds.known_duplicates("AMi-Br") == {} and ds.known_duplicates("AtNorM-MD") == {}
    samples = ds.scan(data_root, "AtNorM-Br")
    dd = ds.deduplicate(samples)
    assert [g.describe() for g in dd.groups if g.conflicting] == [
        "Normal/391.png, Normal/398.png, Normal/404.png, Normal/410.png, Atypical/390.png",
        "Normal/425.png, Atypical/428.png"]
    assert len(dd.dropped_conflicts) == 7 and len(dd.dropped_copies) == 30
    assert (len(dd.kept), sum(s.label for s in dd.kept)) == (709, 122)
    assert len({ds.file_sha256(s.path) for s in dd.kept}) == 709  # every kept crop is distinct


def test_verify_tells_the_releases_duplicates_from_tampering(data_root, tmp_path):
    """A duplicate the release does not list is tampering; one listed group broken up is too."""
    root = _linked_copy(data_root, tmp_path, "AtNorM-Br")
    rep = ds.verify_dataset(root, "AtNorM-Br", check_images=False)
    assert rep.ok and rep.fingerprint == rep.pinned, rep.problems
    assert len(rep.notes) == 1 and rep.notes[0].startswith("27 groups of byte-identical crops")
    a = root / "AtNorM-Br" / "Atypical"
    (a / "101.png").unlink()
    shutil.copy(a / "103.png", a / "101.png")  # a new duplicate, not the release's
    (a / "165.png").unlink()
    shutil.copy(a / "106.png", a / "165.png")  # breaks the listed group 160 = 165
    rep = ds.verify_dataset(root, "AtNorM-Br", check_images=False)
    assert not rep.ok
    assert "identical content under 2 names: Atypical/101.png, Atypical/103.png (a crop replaced by another's bytes?)" \
        in rep.problems
    assert "identical content under 2 names: Atypical/106.png, Atypical/165.png (a crop replaced by another's bytes?)" \
        in rep.problems
    assert "1 of the release's 27 known duplicate groups are not as listed" in rep.problems
    assert rep.notes[0].startswith("26 groups of byte-identical crops")


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
    assert res.exit_code == 3, res.output  # the network is something this machine lacks (errors.EXIT_CODES)
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
    for name in ("AMi-Br", "AtNorM-Br", "AtNorM-MD"):
        rep = ds.verify_dataset(data_root, name, check_images=False)
        assert rep.ok and rep.fingerprint == ds.PINNED_FINGERPRINTS[name], (name, rep.problems)
