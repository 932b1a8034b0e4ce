"""ami-infer --slides: crops cut from real pyramidal TIFF slides give the probabilities of the
original crops; resolution is honoured (pyramid level, resampling, refusal without it); bad slides
and bad rows become one error row each; summary, Wilson interval and QuPath GeoJSON are right.

The slides are written in the tests (tests/slide_factory.py): the 32 real AMi-Br / AtNorM-MD crops
shipped in the package pasted at known positions on a tissue-like background. The model is the
shipped edge model, so the probabilities are real ones."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("openslide", reason="the slides extra is not installed (pip install -e '.[slides]')")
pytest.importorskip("tifffile", reason="tifffile (the dev extra) writes the test slides")

from ami.runtime import slides as S
from ami.runtime.artifact import AMIBR_CROP, ArtifactError, ArtifactMeta
from ami.runtime.cli.infer import app
from ami.runtime.engines import ASSETS, load_engine
from ami.runtime.infer import InputError, run_inference
from ami.runtime.preprocess import Preprocess
from slide_factory import paste, write_slide

SAMPLES = sorted((ASSETS / "samples").glob("*.png"))
RESAMPLED_MPP = 32 / 141  # ~0.227 um/px, a Hamamatsu-40x-like resolution: 128-px crops become 141 px
RESAMPLE_TOL = 0.05  # |delta p| allowed after resampling (measured: max 0.02, mean 0.004)


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        assert tuple(r.fieldnames) == S.COLUMNS
        return list(r)


def _detections(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "x", "y", "id", "score"])  # "score": another column, ignored
        for r in rows:
            w.writerow([*r, "0.9"][:5])
    return path


@pytest.fixture(scope="module")
def engine():
    return load_engine(None, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def ref(engine, tmp_path_factory) -> dict[str, float]:
    """The original crops' probabilities, through the ordinary PNG path."""
    assert len(SAMPLES) >= 16, "the package ships its sample crops"
    out = tmp_path_factory.mktemp("ref") / "crops.csv"
    s = run_inference([str(p) for p in SAMPLES], engine, out, progress=False, workers=2)
    assert s.ok == len(SAMPLES)
    with open(out, newline="") as f:
        return {Path(r["path"]).name: float(r["prob_atypical"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Slides (with their detections files) at 0.25 um/px (TIFF tags), 0.125 um/px (Aperio description,
    pyramid level 1 at 0.25), ~0.227 um/px (no level at 0.25: resampled), and one without resolution."""
    d = tmp_path_factory.mktemp("slides")
    out = {}
    for name, mpp, style, kw in [("native.tif", 0.25, "tiff", {}), ("fine.svs", 0.125, "aperio", {"nearest": True}),
                                 ("resampled.tif", RESAMPLED_MPP, "tiff", {}), ("nores.tif", 0.25, "none", {})]:
        img, placed = paste(SAMPLES, mpp, seed=len(out), **kw)
        write_slide(d / name, img, mpp, style=style)
        det = _detections(d / f"{name}.csv", [(name, p.x, p.y, p.name) for p in placed])
        out[name] = {"slide": d / name, "csv": det, "placed": placed, "shape": img.shape}
    out["dir"] = d
    return out


def _probs(rows: list[dict]) -> dict[str, float]:
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    return {r["id"]: float(r["prob_atypical"]) for r in rows}


# -- parity with the original crops --------------------------------------------------------------

def test_slide_at_the_models_resolution_gives_the_crops_probabilities(engine, ref, lab, tmp_path):
    out = tmp_path / "native.csv"
    summary, _ = S.run_slides(lab["native.tif"]["csv"], engine, out, progress=False, workers=2)
    assert (summary.ok, summary.failed, summary.exit_code) == (len(SAMPLES), 0, 0)
    rows = _rows(out)
    got = _probs(rows)
    assert set(got) == set(ref)
    assert max(abs(got[k] - ref[k]) for k in ref) <= 1e-6  # the same pixels: the same numbers
    assert all(r["padded"] == "0" for r in rows)
    assert all(r["label"] == ("Atypical" if ref[r["id"]] >= 0.5 else "Normal") for r in rows)
    assert S.open_slide(lab["native.tif"]["slide"]).best_level(0.25) == 0


def test_finer_slide_is_read_from_the_pyramid_level_at_the_models_resolution(engine, ref, lab, tmp_path):
    sl = S.open_slide(lab["fine.svs"]["slide"])
    assert sl.vendor == "aperio" and math.isclose(sl.mpp_x, 0.125) and sl.mpp_source == "slide metadata"
    assert sl.best_level(0.25) == 1 and sl.level_downsamples[1] == 2
    out = tmp_path / "fine.csv"
    _, sums = S.run_slides(lab["fine.svs"]["csv"], engine, out, progress=False, workers=2)
    assert "crops from level 1 (0.25 um/px), not resampled" in sums[0].info
    got = _probs(_rows(out))
    assert max(abs(got[k] - ref[k]) for k in ref) <= 1e-6


def test_slide_at_another_resolution_is_resampled_to_the_models(engine, ref, lab, tmp_path):
    sl = S.open_slide(lab["resampled.tif"]["slide"])
    assert math.isclose(sl.mpp_x, RESAMPLED_MPP, rel_tol=1e-4) and sl.best_level(0.25) == 0
    out = tmp_path / "resampled.csv"
    S.run_slides(lab["resampled.tif"]["csv"], engine, out, progress=False, workers=2)
    got = _probs(_rows(out))
    diffs = np.array([abs(got[k] - ref[k]) for k in ref])
    assert diffs.max() <= RESAMPLE_TOL and diffs.mean() <= 0.01, diffs
    clear = [k for k in ref if abs(ref[k] - 0.5) > RESAMPLE_TOL]
    assert all((got[k] >= 0.5) == (ref[k] >= 0.5) for k in clear)


def test_a_wrong_resolution_changes_the_answers_beyond_the_tolerance(engine, ref, lab, tmp_path):
    """The control for the tolerance above: the same crops read at twice the field of view (a slide
    taken for 0.125 um/px when it is 0.25, the paper's H-optimus mismatch) move by far more."""
    out = tmp_path / "wrong.csv"
    S.run_slides(lab["nores.tif"]["csv"], engine, out, slide_mpp=0.125, progress=False, workers=2)
    got = _probs(_rows(out))
    assert max(abs(got[k] - ref[k]) for k in ref) > 4 * RESAMPLE_TOL


def test_process_pool_reads_slides_too(engine, ref, lab, tmp_path):
    out = tmp_path / "proc.csv"
    summary, _ = S.run_slides(lab["native.tif"]["csv"], engine, out, progress=False, workers=2, pool="process")
    assert summary.ok == len(SAMPLES)
    got = _probs(_rows(out))
    assert max(abs(got[k] - ref[k]) for k in ref) <= 1e-6


# -- bad slides and bad rows ---------------------------------------------------------------------

def test_bad_slides_and_rows_give_one_error_row_each_and_the_good_ones_go_on(engine, ref, lab, tmp_path):
    d = lab["dir"]
    native = lab["native.tif"]
    h, w = native["shape"][:2]
    p0 = native["placed"][0]
    (tmp_path / "notaslide.svs").write_text("this is not a slide\n")
    data = native["slide"].read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 2])
    # a slide that opens but one of its tiles is garbage: only the detection on that tile fails
    import tifffile
    with tifffile.TiffFile(native["slide"]) as tf:
        page = tf.pages[0]
        tiles_across = -(-w // page.tilewidth)
        k = (int(p0.y) // page.tilelength) * tiles_across + int(p0.x) // page.tilewidth
        off, n = page.dataoffsets[k], page.databytecounts[k]
    bad = bytearray(data)
    bad[off:off + n] = b"\xff" * n
    (tmp_path / "corrupt.tif").write_bytes(bytes(bad))
    shutil.copy(lab["nores.tif"]["slide"], tmp_path / "nores.tif")
    shutil.copy(native["slide"], tmp_path / "native.tif")
    det = _detections(tmp_path / "mixed.csv", [
        ("native.tif", p0.x, p0.y, "good"),
        ("native.tif", 20, 30, "edge"),  # the crop reaches past the top-left corner: padded, ok
        ("native.tif", w + 5, 10, "outside"),
        ("missing.svs", 100, 100, "missing"),
        ("notaslide.svs", 100, 100, "notaslide"),
        ("truncated.tif", w - 70, h - 70, "truncated"),
        ("nores.tif", 100, 100, "nores"),
        ("native.tif", "abc", 10, "badx"),
        ("", 10, 10, "noslide"),
        (str(d / "native.tif"), p0.x, p0.y, "absolute"),  # an absolute path
        ("corrupt.tif", p0.x, p0.y, "corrupt-tile"),
        ("corrupt.tif", w - 70, h - 70, "corrupt-other"),  # another tile of the same slide
    ])
    out = tmp_path / "mixed.csv.out.csv"
    r = _cli("--slides", det, "-o", out, "--no-progress", "--workers", "2", "--threads", "1")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    rows = _rows(out)
    assert [x["id"] for x in rows] == ["good", "edge", "outside", "missing", "notaslide", "truncated", "nores", "badx",
                                       "noslide", "absolute", "corrupt-tile", "corrupt-other"]
    by = {x["id"]: x for x in rows}
    assert by["good"]["status"] == "ok" and abs(float(by["good"]["prob_atypical"]) - ref[p0.name]) <= 1e-6
    assert by["absolute"]["status"] == "ok" and by["absolute"]["prob_atypical"] == by["good"]["prob_atypical"]
    assert by["edge"]["status"] == "ok" and 0.5 < float(by["edge"]["padded"]) < 1  # (64-20)(64-30) of 128^2 inside
    assert math.isclose(float(by["edge"]["padded"]), 1 - (84 * 94) / 128 ** 2, abs_tol=1e-4)
    want = {"outside": "outside the slide", "missing": "slide not found", "notaslide": "not a whole-slide image",
            "truncated": "unreadable", "nores": "no resolution metadata", "badx": "x is not a finite number",
            "noslide": "no slide given", "corrupt-tile": "unreadable slide region"}
    for k, text in want.items():
        assert by[k]["status"] == "error" and text in by[k]["error"], (k, by[k])
        assert by[k]["prob_atypical"] == "" and by[k]["label"] == "" and by[k]["padded"] == ""
    assert "--mpp" in by["nores"]["error"] and "truncated" in by["truncated"]["error"]
    assert by["corrupt-other"]["status"] == "ok"
    # the per-slide summary counts them
    summary_csv, gdir = S.outputs_beside(out)
    with open(summary_csv, newline="") as f:
        sums = {s["slide"]: s for s in csv.DictReader(f)}
    assert sums["native.tif"]["detections"] == "4" and sums["native.tif"]["classified"] == "2"  # good, edge
    assert sums["native.tif"]["failed"] == "2" and sums["native.tif"]["padded"] == "1"  # outside, badx
    assert sums["missing.svs"]["classified"] == "0" and sums["missing.svs"]["atypical_ratio"] == ""
    native = out.parent / sums["native.tif"]["geojson"]  # the classified detections, in the GeoJSON folder
    assert native.parent == gdir and len(json.loads(native.read_text())["features"]) == 2
    assert "FAILED: 8 inputs" in r.output and "95% CI" in r.output

    # the user states the resolution: the slide without one is read
    det2 = _detections(tmp_path / "nores-ok.csv", [("nores.tif", p.x, p.y, p.name) for p in lab["nores.tif"]["placed"]])
    out2 = tmp_path / "nores-ok.out.csv"
    r = _cli("--slides", det2, "-o", out2, "--mpp", "0.25", "--no-progress", "--threads", "1")
    assert r.exit_code == 0, r.output
    got = _probs(_rows(out2))
    assert max(abs(got[k] - ref[k]) for k in ref) <= 1e-6


def test_border_refuse_turns_padded_crops_into_error_rows(engine, lab, tmp_path):
    det = _detections(tmp_path / "edge.csv", [(str(lab["native.tif"]["slide"]), 20, 30, "edge")])
    out = tmp_path / "edge.out.csv"
    summary, _ = S.run_slides(det, engine, out, border="refuse", progress=False)
    (row,) = _rows(out)
    assert row["status"] == "error" and "past the slide's border" in row["error"] and summary.exit_code == 1
    with pytest.raises(InputError, match="border must be one of"):
        S.run_slides(det, engine, out, border="crop", overwrite=True, progress=False)


def test_detections_file_problems_are_usage_errors(engine, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,col,row\na.svs,1,2\n")
    r = _cli("--slides", bad, "-o", tmp_path / "o.csv", "--no-progress")
    assert r.exit_code == 2 and "lacks the column(s) x, y" in r.output and "Traceback" not in r.output
    r = _cli("--slides", tmp_path / "nope.csv", "-o", tmp_path / "o.csv", "--no-progress")
    assert r.exit_code == 2 and "cannot read detections file" in r.output
    r = _cli("--slides", bad, "crops/")
    assert r.exit_code == 2 and "--slides replaces PATH" in r.output
    r = _cli("crops/", "--mpp", "0.25")
    assert r.exit_code == 2 and "apply to --slides only" in r.output


def test_without_openslide_the_message_says_what_to_install(engine, lab, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    assert not S.available()
    with pytest.raises(InputError, match=r"pip install 'ami-mitosis\[slides\]'"):
        S.run_slides(lab["native.tif"]["csv"], engine, tmp_path / "o.csv", progress=False)


# -- resume, JSON Lines ----------------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_resume_finishes_an_interrupted_run(engine, lab, tmp_path, ext):
    full = tmp_path / f"full.{ext}"
    S.run_slides(lab["native.tif"]["csv"], engine, full, progress=False, workers=2)
    part = tmp_path / f"part.{ext}"
    lines = full.read_text().splitlines(keepends=True)
    head = 1 if ext == "csv" else 0
    part.write_text("".join(lines[: head + 10]) + lines[head + 10][:15])  # 10 rows and half of one
    part.with_name(part.name + ".ami.json").write_text(full.with_name(full.name + ".ami.json").read_text())  # its record
    summary, sums = S.run_slides(lab["native.tif"]["csv"], engine, part, resume=True, progress=False, workers=2)
    assert summary.skipped == 10 and summary.processed == len(SAMPLES) - 10
    assert part.read_text() == full.read_text()
    assert sums[0].classified == len(SAMPLES)


# -- summary and GeoJSON ---------------------------------------------------------------------------

def test_wilson_interval_known_values():
    lo, hi = S.wilson(5, 10)
    assert math.isclose(lo, 0.2366, abs_tol=1e-4) and math.isclose(hi, 0.7634, abs_tol=1e-4)
    lo, hi = S.wilson(0, 10)
    assert lo == 0 and math.isclose(hi, 0.2775, abs_tol=1e-4)
    lo, hi = S.wilson(11, 32)
    assert lo < 11 / 32 < hi
    assert all(math.isnan(v) for v in S.wilson(0, 0))


def test_summary_and_geojson_for_qupath(engine, ref, lab, tmp_path):
    out = tmp_path / "res.csv"
    summary, sums = S.run_slides(lab["resampled.tif"]["csv"], engine, out, progress=False, workers=2)
    rows = _rows(out)
    assert (summary.ok, summary.failed, summary.exit_code) == (len(rows), 0, 0)
    (s,) = sums
    n_at = sum(r["label"] == "Atypical" for r in rows)
    assert (s.classified, s.atypical, s.failed) == (len(rows), n_at, 0)
    summary_csv, gdir = S.outputs_beside(out)
    assert summary_csv == tmp_path / "res.slides.csv" and gdir == tmp_path / "res.geojson"
    with open(summary_csv, newline="") as f:
        (srow,) = list(csv.DictReader(f))
    lo, hi = S.wilson(n_at, len(rows))
    assert float(srow["atypical_ratio"]) == pytest.approx(n_at / len(rows), abs=1e-4)
    assert float(srow["ci95_low"]) == pytest.approx(lo, abs=1e-4) and float(srow["ci95_high"]) == pytest.approx(hi, abs=1e-4)
    assert "crops from level 0 (0.227 um/px), resampled x0.9078" in srow["slide_info"]  # 0.227 / 0.25
    gj = json.loads((tmp_path / srow["geojson"]).read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(rows)
    side = 128 * 0.25 / RESAMPLED_MPP  # the crop's field of view, level-0 px
    by = {r["id"]: r for r in rows}
    for f in gj["features"]:
        p = f["properties"]
        r = by[p["name"]]
        assert p["objectType"] == "detection" and p["classification"]["name"] == r["label"]
        assert p["measurements"]["prob_atypical"] == pytest.approx(float(r["prob_atypical"]))
        ring = np.array(f["geometry"]["coordinates"][0])
        assert f["geometry"]["type"] == "Polygon" and ring.shape == (5, 2)
        assert np.allclose(ring.mean(axis=0) * 5 / 4 - ring[0] / 4, [float(r["x"]), float(r["y"])])
        assert np.allclose(ring.max(axis=0) - ring.min(axis=0), side)


# -- the artefact's resolution ---------------------------------------------------------------------

def test_artefact_records_its_training_crop_and_older_ones_assume_amibr(engine):
    pre = Preprocess(input_size=128)
    old = ArtifactMeta(model="m", method="full", preprocess=pre)
    tc = old.training_crop()
    assert tc["assumed"] and (tc["mpp"], tc["size_px"]) == (AMIBR_CROP["mpp"], AMIBR_CROP["size_px"]) == (0.25, 128)
    new = ArtifactMeta.from_json(ArtifactMeta(model="m", method="full", preprocess=pre,
                                              crop={"mpp": 0.5, "size_px": 224}).to_json())
    tc = new.training_crop()
    assert not tc["assumed"] and (tc["mpp"], tc["size_px"]) == (0.5, 224)
    with pytest.raises(ArtifactError, match=r"metadata 'crop' is malformed \(\{'mpp': 'x'\}: .*expected mpp and size_px"):
        ArtifactMeta(model="m", method="full", preprocess=pre, crop={"mpp": "x"}).training_crop()
    # the shipped model predates the key: it is read as the AMi-Br crops, and says so
    assert engine.meta.training_crop()["assumed"] is True


def test_a_model_trained_at_another_resolution_gets_crops_at_its_resolution(lab):
    """read_crop at 0.5 um/px on a 0.25 um/px slide: the 256-px field of view, halved (from level 1, the
    box-reduced pyramid level at exactly 0.5 um/px, so without resampling)."""
    sl = S.open_slide(lab["native.tif"]["slide"])
    p = lab["native.tif"]["placed"][3]
    crop, padded, level = sl.read_crop(p.x, p.y, 0.5, 128)
    assert level == 1 and padded == 0 and crop.shape == (128, 128, 3)
    region = np.asarray(sl.osr.read_region((int(p.x) - 128, int(p.y) - 128), 0, (256, 256)))[..., :3]
    from PIL import Image
    halved = np.asarray(Image.fromarray(region).reduce(2)).astype(int)
    assert np.abs(crop.astype(int) - halved).max() <= 1
