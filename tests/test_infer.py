"""ami-infer and its runner: one row per input whatever the input, right statuses and exit codes,
resume, interruption, CSV / JSON Lines, list files, real crops.

A tiny ONNX model built in tests/onnx_factory.py stands in for the shipped one, and its numpy
twin (reference_probs) checks every probability written."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ami.runtime.cli.infer import app
from ami.runtime.engines import load_engine
from ami.runtime.infer import COLUMNS, InputError, iter_inputs, read_results, run_inference
from onnx_factory import TINY_PRE, reference_probs, write_model

ENC = dict(encoding="utf-8", errors="surrogateescape")
REPO = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A valid PNG header claiming w x h pixels with almost no data: a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _png16_rgb(path: Path, arr16: np.ndarray) -> None:
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _crop(seed: int, size=(128, 128)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # H&E-ish colours with structure, so probabilities differ from crop to crop
    base = rng.integers(60, 230, (1, 1, 3))
    noise = rng.integers(-40, 40, (size[1], size[0], 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", **ENC) as f:
        r = csv.reader(f)
        assert tuple(next(r)) == COLUMNS
        return [dict(zip(COLUMNS, row, strict=True)) for row in r]


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, **ENC) as f:
        return [json.loads(line) for line in f if line.strip()]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def engine(model):
    return load_engine(model, provider="cpu", threads=1)


# -- the seeded folder ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """Every bad input the issue names, plus good crops in every colour mode and format.
    Returns (folder, {path: expected status}, {path: expected uint8 pixels or None}, {path: reason})."""
    d = tmp_path_factory.mktemp("crops")
    status, pixels, reasons = {}, {}, {}

    def good(name, arr=None):
        p = os.path.join(d, name)
        status[p], pixels[p] = "ok", arr
        return p

    def bad(name, reason):
        p = os.path.join(d, name)
        status[p], reasons[p] = "error", reason
        return p

    a = _crop(1)
    Image.fromarray(a).save(good("rgb.png", a))
    # RGBA with partial transparency: composited on white
    alpha = np.random.default_rng(2).integers(0, 256, (128, 128, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([a, alpha], -1), "RGBA").save(p := good("rgba.png"))
    bg = Image.new("RGBA", (128, 128), (255, 255, 255, 255))
    pixels[p] = np.asarray(Image.alpha_composite(bg, Image.open(p).convert("RGBA")).convert("RGB"))
    grey = Image.fromarray(a).convert("L")
    grey.save(p := good("grey.png"))
    pixels[p] = np.repeat(np.asarray(grey)[..., None], 3, -1)
    g16 = np.random.default_rng(3).integers(0, 65536, (128, 128)).astype(np.uint16)
    Image.fromarray(g16).save(p := good("grey16.png"))
    g8 = np.clip(g16 / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    pixels[p] = np.repeat(g8[..., None], 3, -1)
    _png16_rgb(Path(good("rgb16.png", a)), a.astype(np.uint16) * 257)
    pal = Image.fromarray(a).convert("P")
    pal.save(p := good("palette.png"))
    pixels[p] = np.asarray(pal.convert("RGB"))
    Image.fromarray(a).save(good("crop.jpg"), quality=95)  # lossy: checked for status only
    Image.fromarray(a).convert("CMYK").save(good("cmyk.jpeg"), quality=95)
    Image.fromarray(a).convert("LA").save(good("grey_alpha.png"))
    Image.fromarray(_crop(4)).save(good("crop.tif", _crop(4)))
    Image.fromarray(_crop(5)).save(good("crop_lzw.TIFF", _crop(5)), compression="tiff_lzw")
    big = _crop(6, size=(100, 140))
    Image.fromarray(big).save(p := good("other_size.png"))
    pixels[p] = TINY_PRE.to_uint8(Image.fromarray(big))
    Image.fromarray(_crop(7)).save(good("name with spaces.png", _crop(7)))
    Image.fromarray(_crop(8)).save(good("ünïcødé 名前.png", _crop(8)))
    Image.fromarray(_crop(9)).save(good(os.fsdecode(b"latin1-\xe9.png"), _crop(9)))  # not valid UTF-8
    Image.fromarray(_crop(10)).save(good("UPPER.PNG", _crop(10)))
    os.makedirs(os.path.join(d, "sub", "deeper"))
    Image.fromarray(_crop(11)).save(good(os.path.join("sub", "deeper", "nested.png"), _crop(11)))

    Path(bad("empty.png", "empty file")).write_bytes(b"")
    buf = Path(os.path.join(d, "rgb.png")).read_bytes()
    Path(bad("truncated.png", "truncated")).write_bytes(buf[: len(buf) // 2])
    Path(bad("not_an_image.png", "not an image")).write_text("Slide 12, region 3: not a picture at all\n")
    _png_header_only(Path(bad("bomb.png", "too large")), 100_000, 100_000)  # over Pillow's own limit
    _png_header_only(Path(bad("huge.png", "too large")), 9_000, 9_000)  # over ami's 64 Mpx limit
    os.symlink(os.path.join(d, "gone", "missing.png"), bad("broken_link.png", "broken symbolic link"))
    os.symlink("self_loop.png", bad("self_loop.png", "Too many levels of symbolic links"))
    (d / "notes.txt").write_text("not an input: other extensions are ignored in folders\n")
    return d, status, pixels, reasons


def _check_rows(rows, status, pixels, reasons):
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == len(by_path) == len(status), "one row per input, no duplicates"
    assert set(by_path) == set(status)
    for p, want in status.items():
        r = by_path[p]
        assert r["status"] == want, (p, r)
        if want == "ok":
            prob = float(r["prob_atypical"])
            assert 0.0 < prob < 1.0 and r["label"] == ("Atypical" if prob >= 0.5 else "Normal") and not r["error"]
            if pixels[p] is not None:
                np.testing.assert_allclose(prob, reference_probs(pixels[p][None])[0], atol=1e-5, err_msg=p)
        else:
            assert r["prob_atypical"] in ("", None) and r["label"] in ("", None)
            assert reasons[p] in r["error"], (p, r["error"])


def test_seeded_folder_csv(seeded, model, tmp_path):
    d, status, pixels, reasons = seeded
    out = tmp_path / "out.csv"
    res = _invoke(d, "--model", model, "-o", out, "--batch-size", 4, "--workers", 2)
    assert res.exit_code == 1, res.output
    assert f"exit code 1: {len(reasons)} of {len(status)} inputs failed" in res.output
    assert "FAILED" in res.output and "resized: 1 crops" in res.output and "crops/s" in res.output
    best = __import__("ami.runtime.engines", fromlist=["choose"]).choose(model)[0]  # --engine auto
    assert f"engine {best.title}" in res.output and f"engine: auto picked {best.title}" in res.output
    rows = _read_csv(out)
    _check_rows(rows, status, pixels, reasons)
    assert [r["path"] for r in rows] == list(iter_inputs([d])), "rows in input order"


def test_seeded_folder_jsonl_and_process_pool(seeded, model, tmp_path):
    d, status, pixels, reasons = seeded
    out = tmp_path / "out.jsonl"  # format from the extension
    res = _invoke(d, "--model", model, "-o", out, "--batch-size", 5, "--workers", 2, "--pool", "process")
    assert res.exit_code == 1, res.output
    rows = _read_jsonl(out)
    for r in rows:
        assert set(r) == set(COLUMNS)
        assert (r["prob_atypical"] is None) == (r["status"] == "error")
    _check_rows(rows, status, pixels, reasons)


def test_unreadable_file_is_an_error_row(tmp_path, model):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading, so an unreadable file "
                    "cannot be made here (the 'permission denied' row is tested for non-root users)")
    p = tmp_path / "locked.png"
    Image.fromarray(_crop(1)).save(p)
    p.chmod(0)
    try:
        res = _invoke(p, "--model", model, "-o", tmp_path / "o.csv")
        assert res.exit_code == 1
        (row,) = _read_csv(tmp_path / "o.csv")
        assert row["status"] == "error" and "permission denied" in row["error"]
    finally:
        p.chmod(0o644)


def test_all_good_exit_zero_and_threshold(seeded, model, tmp_path):
    _, status, _, _ = seeded
    goods = [p for p, s in status.items() if s == "ok"]
    lst = tmp_path / "good.txt"
    lst.write_text("\n".join(goods) + "\n", **ENC)
    res = _invoke(lst, "--model", model, "-o", tmp_path / "a.csv")
    assert res.exit_code == 0, res.output
    assert "failures: none" in res.output
    rows = _read_csv(tmp_path / "a.csv")
    assert [r["path"] for r in rows] == goods and all(r["status"] == "ok" for r in rows)
    res = _invoke(lst, "--model", model, "-o", tmp_path / "b.csv", "--threshold", 1.0)
    assert res.exit_code == 0 and {r["label"] for r in _read_csv(tmp_path / "b.csv")} == {"Normal"}
    res = _invoke(lst, "--model", model, "-o", tmp_path / "c.csv", "--threshold", 0.0)
    assert res.exit_code == 0 and {r["label"] for r in _read_csv(tmp_path / "c.csv")} == {"Atypical"}


def test_usage_errors(tmp_path, model, seeded):
    d = seeded[0]
    (tmp_path / "empty_dir" / "sub").mkdir(parents=True)
    res = _invoke(tmp_path / "empty_dir", "--model", model, "-o", tmp_path / "x.csv")
    assert res.exit_code == 2 and "no crops found" in res.output
    assert not (tmp_path / "x.csv").exists()
    res = _invoke(tmp_path / "does-not-exist", "--model", model, "-o", tmp_path / "x.csv")
    assert res.exit_code == 2 and "no such file or directory" in res.output
    res = _invoke(d, "--model", tmp_path / "nope.onnx")
    assert res.exit_code == 2 and "model file not found" in res.output and "Traceback" not in res.output
    (tmp_path / "broken.onnx").write_bytes(model.read_bytes()[:300])
    res = _invoke(d, "--model", tmp_path / "broken.onnx", "-o", tmp_path / "y.csv")
    assert res.exit_code == 2 and "not a loadable ONNX model" in res.output and "Traceback" not in res.output
    res = _invoke("--model", model)
    assert res.exit_code == 2 and "give at least one PATH" in res.output
    (tmp_path / "exists.csv").write_text("precious results\n")
    res = _invoke(d, "--model", model, "-o", tmp_path / "exists.csv")
    assert res.exit_code == 2 and "already exists" in res.output
    assert (tmp_path / "exists.csv").read_text() == "precious results\n", "never overwritten without --overwrite"
    res = _invoke(d, "--model", model, "-o", tmp_path / "exists.csv", "--resume")
    assert res.exit_code == 2 and "not an ami-infer CSV" in res.output


def test_default_model_and_sample_absent_are_clear(monkeypatch, tmp_path, seeded):
    from ami.runtime import engines as E  # the door
    from ami.runtime.cli import infer as cli

    monkeypatch.setattr(E, "DEFAULT_MODEL", tmp_path / "assets" / "edge.onnx")
    res = _invoke(seeded[0], "-o", tmp_path / "o.csv")
    assert res.exit_code == 2 and "no shipped model found" in res.output
    monkeypatch.setattr(cli, "SAMPLES", tmp_path / "assets" / "samples")
    monkeypatch.setattr(E, "DEFAULT_MODEL", write_model(tmp_path / "m.onnx"))
    res = _invoke("--sample", "-o", tmp_path / "o.csv")
    assert res.exit_code == 2 and "no sample crops shipped" in res.output
    (tmp_path / "assets" / "samples").mkdir(parents=True)
    res = _invoke("--sample", "-o", tmp_path / "o.csv")
    assert res.exit_code == 2 and "holds no crops" in res.output
    Image.fromarray(_crop(1)).save(tmp_path / "assets" / "samples" / "a.png")
    res = _invoke("--sample", "-o", tmp_path / "o.csv")
    assert res.exit_code == 0, res.output
    assert len(_read_csv(tmp_path / "o.csv")) == 1


# -- inputs --------------------------------------------------------------------------------------

def test_iter_inputs(tmp_path, seeded):
    d = seeded[0]
    found = list(iter_inputs([d]))
    assert not any(p.endswith("notes.txt") for p in found)
    assert any(p.endswith("nested.png") for p in found) and any(p.endswith("UPPER.PNG") for p in found)
    assert list(iter_inputs([d, d])) == found, "duplicates dropped"
    # a symlink loop does not hang the walk
    loop = tmp_path / "loop"
    loop.mkdir()
    Image.fromarray(_crop(1)).save(loop / "a.png")
    os.symlink(loop, loop / "again")
    assert [os.path.basename(p) for p in iter_inputs([loop])] == ["a.png"]
    # list files: .txt (comments, blanks, relative to the list's folder) and .csv (a path column)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.txt").write_text("# crops\n\n../loop/a.png\n/abs/missing.png\n")
    assert list(iter_inputs([tmp_path / "lists" / "l.txt"])) == [
        os.path.join(tmp_path / "lists", "../loop/a.png"), "/abs/missing.png"]
    (tmp_path / "lists" / "l.csv").write_text("slide,path,label\ns1,../loop/a.png,Normal\ns2,b.png,Atypical\n")
    assert [os.path.basename(p) for p in iter_inputs([tmp_path / "lists" / "l.csv"])] == ["a.png", "b.png"]
    (tmp_path / "lists" / "plain.csv").write_text("x.png,1\ny.png,0\n")
    assert [os.path.basename(p) for p in iter_inputs([tmp_path / "lists" / "plain.csv"])] == ["x.png", "y.png"]
    with pytest.raises(InputError, match="no such file"):
        list(iter_inputs([tmp_path / "nothing-here"]))


def test_list_file_with_missing_entries(tmp_path, model, seeded):
    d, _, _, _ = seeded
    lst = tmp_path / "list.csv"
    with open(lst, "w", newline="", **ENC) as f:
        w = csv.writer(f)
        w.writerow(["path", "note"])
        w.writerow([os.path.join(d, "rgb.png"), "fine"])
        w.writerow([os.path.join(d, "no-such-crop.png"), "listed but gone"])
        w.writerow([os.path.join(d, "empty.png"), "bad"])
    res = _invoke(lst, "--model", model, "-o", tmp_path / "o.csv")
    assert res.exit_code == 1
    rows = _read_csv(tmp_path / "o.csv")
    assert [r["status"] for r in rows] == ["ok", "error", "error"]
    assert rows[1]["error"] == "file not found" and rows[2]["error"] == "empty file"


# -- resume and interruption ---------------------------------------------------------------------

def test_resume_appends_only_missing_rows(seeded, model, tmp_path, engine):
    d, status, pixels, reasons = seeded
    everything = list(iter_inputs([d]))
    out = tmp_path / "r.csv"
    s1 = run_inference(everything[:9], engine, out, batch_size=4, workers=1, progress=False)
    assert s1.processed == 9 and not s1.interrupted
    # a run killed mid-write leaves half a row: resume must cut it, not glue the next row onto it
    with open(out, "a", **ENC) as f:
        f.write(os.path.join(d, "rgb.png")[:-3])
    with pytest.raises(InputError, match="already exists"):
        run_inference(everything, engine, out, progress=False)
    s2 = run_inference(everything, engine, out, batch_size=4, workers=2, resume=True, progress=False)
    assert s2.skipped == 9 and s2.processed == len(everything) - 9
    assert s2.exit_code == 1 and s2.any_failed
    _check_rows(_read_csv(out), status, pixels, reasons)
    # resuming a complete file does nothing, and still reports the earlier failures
    s3 = run_inference(everything, engine, out, resume=True, progress=False)
    assert s3.processed == 0 and s3.skipped == len(everything) and s3.exit_code == 1
    assert len(_read_csv(out)) == len(everything)
    assert set(read_results(out, "csv")) == set(everything)
    # JSON Lines resume too
    outj = tmp_path / "r.jsonl"
    run_inference(everything[:5], engine, outj, batch_size=2, progress=False)
    with open(outj, "a") as f:
        f.write('{"path": "half a ro')
    run_inference(everything, engine, outj, resume=True, progress=False)
    _check_rows(_read_jsonl(outj), status, pixels, reasons)


SLOW_CLI = """
import sys, time
from ami.runtime.engines import onnxruntime as E
_orig = E.OrtEngine.predict
def slow(self, x):
    time.sleep(0.15)
    return _orig(self, x)
E.OrtEngine.predict = slow
from ami.runtime.cli.infer import main
sys.argv = ["ami-infer", *sys.argv[1:]]
main()
"""


def _wait_rows(path: Path, n: int, proc, timeout=600.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"ami-infer ended before it could be interrupted: {proc.communicate()}")
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError("no rows appeared in time")


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    for i in range(80):
        Image.fromarray(_crop(100 + i)).save(d / f"c{i:03d}.png")
    return d


@pytest.mark.parametrize("sig, fmt", [(signal.SIGTERM, "csv"), (signal.SIGINT, "jsonl"), (signal.SIGKILL, "csv")],
                         ids=["SIGTERM-csv", "SIGINT-jsonl", "SIGKILL-csv"])
def test_interrupted_run_keeps_rows_and_resume_completes(many, model, tmp_path, sig, fmt):
    out = tmp_path / f"out.{fmt}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(many), "--model", str(model), "-o", str(out),
                             "--batch-size", "4", "--workers", "1", "--no-progress", "--engine", "onnxruntime"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_rows(out, 3, proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, (stdout, stderr)
        assert "INTERRUPTED" in stdout and "--resume" in stdout
        assert "Traceback" not in stderr
    partial = read_results(out, fmt)
    assert 0 < len(partial) < 80, "interrupted mid-way, with some rows kept"
    assert all(v == ("ok", v[1]) for v in partial.values())
    res = _invoke(many, "--model", model, "-o", out, "--resume", "--no-progress")
    assert res.exit_code == 0, res.output
    rows = _read_csv(out) if fmt == "csv" else _read_jsonl(out)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(iter_inputs([many])) and len(paths) == len(set(paths)) == 80
    expect = {p: reference_probs(np.asarray(Image.open(p).convert("RGB"))[None])[0] for p in paths}
    np.testing.assert_allclose([float(r["prob_atypical"]) for r in rows], [expect[p] for p in paths], atol=1e-5)


# -- crop files in the datasets' layout: generated ones everywhere, the real ones where present ---------

@pytest.fixture(params=["synthetic", "real"])
def crop_root(request):
    if request.param == "synthetic":
        return request.getfixturevalue("synthetic_root")
    root = request.getfixturevalue("data_root")  # the real PNG files, as the release encodes them
    if not (root / "AtNorM-MD").is_dir():
        pytest.skip(f"needs the real AtNorM-MD crops: {root / 'AtNorM-MD'} does not exist (AMI_DATA_ROOT)")
    return root


def test_real_crops_match_reference(crop_root, engine, tmp_path):
    crops = []
    for cls in ("Atypical", "Normal"):
        crops += sorted((crop_root / "AtNorM-MD" / cls).glob("*.png"))[:20]
    assert len(crops) == 40
    lst = tmp_path / "crops.csv"
    with open(lst, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in crops:
            w.writerow([str(p), p.parent.name])
    inputs = list(iter_inputs([lst]))
    assert inputs == [str(p) for p in crops]
    s = run_inference(inputs, engine, tmp_path / "t.csv", batch_size=16, workers=2, progress=False)
    assert (s.ok, s.failed, s.resized, s.exit_code) == (40, 0, 0, 0)
    rows = _read_csv(tmp_path / "t.csv")
    # independent of ami's decoder: plain Pillow, then the graph's arithmetic in numpy
    ref = reference_probs(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in crops]))
    got = np.array([float(r["prob_atypical"]) for r in rows], np.float32)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert len(set(np.round(got, 4))) > 20, "the tiny model must separate the crops, or this proves little"
    assert sum(s.labels.values()) == 40
    # the process pool and JSON Lines give the very same numbers
    s2 = run_inference(inputs, engine, tmp_path / "t.jsonl", batch_size=7, workers=2, pool="process", progress=False)
    assert s2.ok == 40
    assert [r["prob_atypical"] for r in _read_jsonl(tmp_path / "t.jsonl")] == [float(r["prob_atypical"]) for r in rows]


def test_progress_line(tmp_path):
    import io

    from ami.runtime.infer import ProgressLine

    buf = io.StringIO()
    bar = ProgressLine(10, stream=buf, log_every_s=0.0)
    bar.update(5, 1)
    bar.close(10, 1)
    text = buf.getvalue()
    assert "5/10" in text and "10/10" in text and "crops/s" in text and "errors 1" in text


def test_summary_to_dict_round_numbers(engine, tmp_path, seeded):
    d = seeded[0]
    s = run_inference([os.path.join(d, "rgb.png")], engine, tmp_path / "s.csv", progress=False)
    info = s.to_dict()
    assert info["ok"] == 1 and info["provider"] == "CPUExecutionProvider" and info["crops_per_s"] > 0
    json.dumps(info)


@pytest.mark.skipif(shutil.which("ami-infer") is None, reason="the ami-infer entry point is not installed")
def test_entry_point_help():
    r = subprocess.run(["ami-infer", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Examples:" in r.stdout and "--resume" in r.stdout
