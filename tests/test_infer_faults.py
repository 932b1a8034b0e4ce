"""Second-order faults of ami-infer (issue 14), one test per class, each a case that failed before:
two writers on one output, a resume after a cut inside a quoted field, streams, an input as the
output, a resume with another model or threshold, a corrupted model, probabilities out of range,
orphan worker processes, JSON Lines with non-UTF-8 names, tracebacks from bad metadata, and the
debatable cases (each decided: see the README's ami-infer section).

Concurrency tests start two real ami-infer processes; the orphan test SIGKILLs a real run. Models
are the tiny generated ONNX graphs of tests/onnx_factory.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image
from typer.testing import CliRunner

from ami.runtime import artifact as A
from ami.runtime import infer as I
from ami.runtime.artifact import META_KEY, ArtifactError
from ami.runtime.cli.infer import app
from ami.runtime.engines import load_engine
from ami.runtime.infer import COLUMNS, InputError, iter_inputs, run_inference
from onnx_factory import WEIGHTS, build_model, reference_probs, tiny_meta, write_model

ENC = dict(encoding="utf-8", errors="surrogateescape")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# ami-infer with a slow engine, so a second process can meet it mid-run
SLOW_CLI = """
import sys, time
from ami.runtime.engines import onnxruntime as E
_orig = E.OrtEngine.predict
def slow(self, x):
    import os
    time.sleep(float(os.environ.get("AMI_TEST_DELAY", "0.25")))
    while os.path.exists(os.environ.get("AMI_TEST_GATE", "")):  # held open by the test
        time.sleep(0.02)
    return _orig(self, x)
E.OrtEngine.predict = slow
from ami.runtime.cli.infer import main
sys.argv = ["ami-infer", *sys.argv[1:]]
main()
"""
CLI = "import sys\nfrom ami.runtime.cli.infer import main\nsys.argv = ['ami-infer', *sys.argv[1:]]\nmain()\n"


def _crop(seed: int, size=(128, 128)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 230, (1, 1, 3))
    return np.clip(base + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", **ENC) as f:
        r = csv.reader(f, strict=True)
        assert tuple(next(r)) == COLUMNS
        return [dict(zip(COLUMNS, row, strict=True)) for row in r]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _start(*args, delay="0.25", gate: Path | None = None):
    """A real ami-infer run with a slow engine; while ``gate`` exists, its engine waits."""
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *map(str, args), "--no-progress", "--engine", "onnxruntime"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "AMI_TEST_DELAY": delay, "AMI_TEST_GATE": str(gate or "")})


def _wait_rows(path: Path, n: int, proc, timeout=120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"ami-infer ended too early: {proc.communicate()}")
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError("no rows appeared in time")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    p = write_model(tmp_path_factory.mktemp("model") / "tiny.onnx")
    if hasattr(A, "stamp_weights_digest"):  # lets this file run against ami before issue 14 (to see it fail)
        A.stamp_weights_digest(p)
    return p


@pytest.fixture(scope="module")
def engine(model):
    return load_engine(model, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("crops")
    for i in range(24):
        Image.fromarray(_crop(200 + i)).save(d / f"c{i:03d}.png")
    return d


# -- 1. one writer per output file ---------------------------------------------------------------

def test_second_writer_is_refused_whatever_its_flags(crops, model, tmp_path):
    out = tmp_path / "out.csv"
    gate = tmp_path / "gate"
    gate.touch()
    a = _start(crops, "--model", model, "-o", out, "--batch-size", 2, "--workers", 1, delay="0", gate=gate)
    try:
        _wait_rows(out, 1, a)
        for flags in ([], ["--resume"], ["--overwrite"], ["--resume", "--retry-errors"]):
            b = subprocess.run([sys.executable, "-c", CLI, str(crops), "--model", str(model), "-o", str(out),
                                "--no-progress", *flags], capture_output=True, text=True, env=ENV, timeout=120)
            assert b.returncode == 2, (flags, b.stdout, b.stderr)
            if flags:
                assert "being written by another ami-infer run" in b.stderr and f"pid {a.pid}" in b.stderr, b.stderr
            assert a.poll() is None, "the second run finished after the first: the test proves nothing"
        gate.unlink()
        _, stderr = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0, stderr
    rows = _read_csv(out)
    assert sorted(r["path"] for r in rows) == sorted(iter_inputs([crops])), "every row once, none torn or lost"
    assert all(r["status"] == "ok" for r in rows)


def test_two_resumes_one_wins(crops, model, tmp_path):
    out = tmp_path / "r.csv"
    paths = list(iter_inputs([crops]))
    lst = tmp_path / "half.txt"
    lst.write_text("\n".join(paths[:4]) + "\n")
    assert _invoke(lst, "--model", model, "-o", out, "--no-progress").exit_code == 0
    gate = tmp_path / "gate"
    gate.touch()
    a = _start(crops, "--model", model, "-o", out, "--resume", "--batch-size", 2, "--workers", 1, delay="0", gate=gate)
    try:
        record = out.with_name("r.csv.ami.json")
        t0 = time.monotonic()
        while '"state": "running"' not in (record.read_text() if record.exists() else ""):
            assert a.poll() is None, "the first run ended before the second could meet it"
            assert time.monotonic() - t0 < 120, "the first run never recorded itself as running"
            time.sleep(0.05)
        b = subprocess.run([sys.executable, "-c", CLI, str(crops), "--model", str(model), "-o", str(out), "--resume",
                            "--no-progress"], capture_output=True, text=True, env=ENV, timeout=120)
        assert b.returncode == 2 and "being written by another ami-infer run" in b.stderr, b.stderr
        assert a.poll() is None
        gate.unlink()
        a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0
    assert sorted(r["path"] for r in _read_csv(out)) == sorted(paths)


# -- 2. resume after a cut inside a quoted field -------------------------------------------------

def test_resume_repairs_a_cut_inside_a_quoted_path(tmp_path, engine):
    d = tmp_path / "crops"
    d.mkdir()
    names = ["a.png", "two\nlines.png", "z.png"]
    for i, n in enumerate(names):
        Image.fromarray(_crop(i)).save(d / n)
    paths = list(iter_inputs([d]))
    out = tmp_path / "o.csv"
    run_inference(paths, engine, out, progress=False)
    data = out.read_bytes()
    cut = data.index(b"two\n") + 4  # killed right after the newline inside the quoted path
    out.write_bytes(data[:cut])
    s = run_inference(paths, engine, out, resume=True, progress=False)
    assert s.repaired_bytes > 0 and s.exit_code == 0
    rows = _read_csv(out)
    assert sorted(r["path"] for r in rows) == sorted(paths) and len(rows) == 3
    assert all(r["status"] == "ok" for r in rows)
    # damage in the middle (not a cut tail) is refused, never silently kept nor silently cut
    header, rest = data.split(b"\n", 1)
    row_a = rest[:rest.index(b"\n") + 1]
    zi = rest.index(os.fsencode(os.path.join(d, "z.png")))
    row_two, row_z = rest[len(row_a):zi], rest[zi:]
    assert row_two.startswith(b'"') and row_z.endswith(b"\n") and b'"' not in row_z
    for damaged in (b'"garbage\n' + row_two + row_z,  # an open quote, then a quoted row
                    b'"garbage\n' + row_z,  # an open quote swallowing a plain row
                    b"garbage,1\n" + row_z):  # a short row
        out.write_bytes(header + b"\n" + row_a + damaged)
        with pytest.raises(InputError, match="damaged"):
            run_inference(paths, engine, out, resume=True, progress=False)
        assert out.read_bytes() == header + b"\n" + row_a + damaged, "a refused resume changes nothing"


# -- 3. streams: -o -, a FIFO, /dev/stdout -------------------------------------------------------

def test_stdout_stream(crops, model, tmp_path):
    r = subprocess.run([sys.executable, "-c", CLI, str(crops), "--model", str(model), "-o", "-", "--no-progress"],
                       capture_output=True, text=True, env=ENV, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(r.stdout.splitlines()))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 1 + 24, "stdout holds the rows and nothing else"
    assert "failures: none" in r.stderr and "results: standard output" in r.stderr
    assert os.listdir(tmp_path) == [], "no file named '-', no record"


def test_fifo_output_is_not_synced(crops, engine, tmp_path, monkeypatch):
    """A periodic fsync on a pipe fails with EINVAL; the clock is sped up so it would happen per batch."""
    class FastClock:
        t = 0.0

        def monotonic(self):
            FastClock.t += 100.0
            return FastClock.t

        def __getattr__(self, name):
            return getattr(time, name)

    monkeypatch.setattr(I.writer, "time", FastClock())
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    got = []
    import threading

    def read_all():
        with open(fifo, "rb") as f:
            got.append(f.read())

    reader = threading.Thread(target=read_all)
    reader.start()
    s = run_inference(list(iter_inputs([crops])), engine, fifo, batch_size=2, workers=1, progress=False)
    reader.join(30)
    assert s.processed == 24 and s.exit_code == 0 and s.stream
    assert got and got[0].count(b"\n") == 25
    with pytest.raises(InputError, match=r"cannot --resume .*rows\.fifo: it is a stream \(stdout, a pipe or a device\)"):
        run_inference([], engine, fifo, resume=True, progress=False)


# -- 4. an input as the output -------------------------------------------------------------------

def test_an_input_is_never_the_output(crops, model, tmp_path):
    crop = tmp_path / "precious.png"
    shutil.copy(crops / "c000.png", crop)
    before = crop.read_bytes()
    for spelling in (crop, tmp_path / "." / "precious.png"):
        res = _invoke(crop, "--model", model, "-o", spelling, "--overwrite")
        assert res.exit_code == 2 and "is one of the inputs" in res.output, res.output
    os.link(crop, tmp_path / "alias.csv")  # a hard link: another name, the same file
    res = _invoke(crop, "--model", model, "-o", tmp_path / "alias.csv", "--overwrite")
    assert res.exit_code == 2 and "is one of the inputs" in res.output
    assert crop.read_bytes() == before
    lst = tmp_path / "list.txt"
    lst.write_text(str(crop) + "\n")
    res = _invoke(lst, "--model", model, "-o", lst, "--overwrite")
    assert res.exit_code == 2 and "is one of the inputs" in res.output
    assert lst.read_text() == str(crop) + "\n"


# -- 5. resume with another model or threshold ---------------------------------------------------

def test_resume_refuses_another_model_or_threshold(crops, model, tmp_path):
    paths = list(iter_inputs([crops]))
    half = tmp_path / "half.txt"
    half.write_text("\n".join(paths[:10]) + "\n")
    out = tmp_path / "o.csv"
    assert _invoke(half, "--model", model, "-o", out, "--no-progress").exit_code == 0
    rec = json.loads((tmp_path / "o.csv.ami.json").read_text())
    assert rec["labels"]["threshold"] == 0.5 and len(rec["labels"]["sha256"]) == 64 and rec["state"] == "complete"
    other = write_model(tmp_path / "other.onnx", meta=tiny_meta(threshold=0.3))
    for args in (["--threshold", 0.3], ["--model", other]):
        res = _invoke(crops, "--model", model, *args, "-o", out, "--resume", "--no-progress")
        assert res.exit_code == 2 and "would mix two models' or thresholds' labels" in res.output, res.output
    assert len(_read_csv(out)) == 10, "nothing appended by a refused resume"
    (tmp_path / "o.csv.ami.json").rename(tmp_path / "gone.json")
    res = _invoke(crops, "--model", model, "-o", out, "--resume", "--no-progress")
    assert res.exit_code == 2 and "no record" in res.output
    (tmp_path / "gone.json").rename(tmp_path / "o.csv.ami.json")
    res = _invoke(crops, "--model", model, "--threshold", 0.3, "-o", out, "--resume-any", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "MIXED: the 10 earlier rows" in res.output and "this run's labels at threshold 0.3" in res.output
    assert json.loads((tmp_path / "o.csv.ami.json").read_text())["mixed"] is True
    assert len(_read_csv(out)) == 24
    # the same model and threshold resume silently
    res = _invoke(crops, "--model", model, "-o", tmp_path / "fresh.csv", "--no-progress")
    res = _invoke(crops, "--model", model, "-o", tmp_path / "fresh.csv", "--resume", "--no-progress")
    assert res.exit_code == 0 and "resumed: 24 inputs" in res.output


# -- 6. a corrupted model ------------------------------------------------------------------------

def test_a_flipped_bit_in_the_weights_is_refused(model, crops, tmp_path):
    data = bytearray(model.read_bytes())
    needle = np.float32(WEIGHTS[0]).tobytes()
    i = data.index(needle)
    data[i] ^= 0x01  # one bit of one weight
    bad = tmp_path / "flipped.onnx"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="do not match the digest"):
        load_engine(bad, provider="cpu")
    res = _invoke(crops, "--model", bad, "-o", tmp_path / "o.csv")
    assert res.exit_code == 2 and "corrupted" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.csv").exists()
    eng = load_engine(model, provider="cpu")
    assert eng.weights_verified
    # an artefact from before digests loads, with a warning that says so
    old = write_model(tmp_path / "old.onnx")
    assert not load_engine(old, provider="cpu").weights_verified
    res = _invoke(crops, "--model", old, "-o", tmp_path / "p.csv", "--no-progress")
    assert res.exit_code == 0 and "carries no weights digest" in res.output


def test_stamp_changes_metadata_only(tmp_path):
    p = write_model(tmp_path / "m.onnx")
    before = onnx.load(str(p))
    digest = A.stamp_weights_digest(p)
    after = onnx.load(str(p))
    assert before.graph.SerializeToString() == after.graph.SerializeToString()
    for x, y in zip(before.graph.initializer, after.graph.initializer, strict=True):
        assert np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))
    meta = json.loads({q.key: q.value for q in after.metadata_props}[META_KEY])
    assert meta["weights_digest"] == digest == A.onnx_weights_digest(p)
    onnx.checker.check_model(after)


def test_shipped_models_carry_a_verified_digest():
    from ami.runtime.engines import ASSETS

    for name in ("edge.onnx", "edge-int8.onnx"):
        assert load_engine(ASSETS / name, provider="cpu").weights_verified, name


# -- 7. probabilities out of range ---------------------------------------------------------------

@pytest.mark.parametrize("bias", [5.0, -5.0, float("nan")], ids=["above-1", "below-0", "nan"])
def test_probabilities_out_of_range_are_an_engine_fault(crops, tmp_path, bias):
    m = build_model()
    for node in m.graph.node:
        if node.op_type == "Sigmoid":
            node.op_type = "Identity"  # logits, not probabilities
    for t in m.graph.initializer:
        if t.name == "bias":
            t.CopyFrom(numpy_helper.from_array(np.array([bias], np.float32), "bias"))
    path = tmp_path / "logits.onnx"
    onnx.save_model(m, str(path))
    res = _invoke(crops, "--model", path, "-o", tmp_path / "o.csv", "--no-progress")
    assert res.exit_code == 4, res.output  # a fault while running (ami.runtime.errors)
    assert "outside [0, 1]" in res.output and "Traceback" not in res.output
    assert _read_csv(tmp_path / "o.csv") == [], "no row with a non-probability is written as ok"


# -- 8. orphan processes -------------------------------------------------------------------------

def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux) to list a process's children")
def test_sigkill_leaves_no_orphan_process(crops, model, tmp_path):
    out = tmp_path / "o.csv"
    a = _start(crops, "--model", model, "-o", out, "--batch-size", 2, "--workers", 2, "--pool", "process", delay="0.5")
    try:
        _wait_rows(out, 3, a)
        kids = _descendants(a.pid)
        assert len(kids) >= 3, f"expected a forkserver, a resource tracker and workers, found {kids}"
        a.send_signal(signal.SIGKILL)
        a.wait(30)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15 and any(_alive(k) for k in kids):
            time.sleep(0.1)
        left = [k for k in kids if _alive(k)]
    finally:
        if a.poll() is None:
            a.kill()
    for k in left:  # clean up before failing
        try:
            os.kill(k, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"{len(left)} child processes outlived their SIGKILLed ami-infer"


# -- 9. JSON Lines with non-UTF-8 names ----------------------------------------------------------

def test_jsonl_is_valid_utf8_and_escapes_name_bytes(tmp_path, model):
    d = tmp_path / "crops"
    d.mkdir()
    raw = b"latin1-\xe9.png"
    Image.fromarray(_crop(1)).save(os.path.join(os.fsencode(d), raw))
    Image.fromarray(_crop(2)).save(d / "ünïcødé.png")
    out = tmp_path / "o.jsonl"
    res = _invoke(d, "--model", model, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    text = out.read_bytes().decode("utf-8")  # strict: raises on raw bytes
    rows = [json.loads(line) for line in text.splitlines()]
    names = sorted(os.fsencode(os.path.basename(r["path"])) for r in rows)
    assert names == sorted([raw, "ünïcødé.png".encode()]), "os.fsencode(path) gives the name's bytes back"
    assert "\\udce9" in text and "ünïcødé" in text, "only the undecodable byte is escaped"
    res = _invoke(d, "--model", model, "-o", out, "--resume", "--no-progress")
    assert res.exit_code == 0 and "resumed: 2 inputs" in res.output


# -- 11. bad metadata: clear errors, never a traceback -------------------------------------------

GOOD = json.loads(tiny_meta().to_json())


def _meta(**changes) -> str:
    d = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        if k.startswith("pre_"):
            d["preprocess"][k[4:]] = v
        else:
            d[k] = v
    return json.dumps(d)


@pytest.mark.parametrize("meta, message", [
    (_meta(threshold="abc"), "threshold must be a finite number"),
    (_meta(threshold=None), "threshold must be a finite number"),
    (_meta(threshold=1.5), "outside \\[0, 1\\]"),
    (_meta(class_names=["Atypical"]), "class_names must be two"),
    (_meta(pre_input_size=128.0), "input_size must be a whole number"),
    (_meta(pre_input_size=-128), "outside \\[8, 4096\\]"),
    (_meta(pre_input_size=10**7), "outside \\[8, 4096\\]"),
    (_meta(pre_std=[0.25, 0.0, 0.25]), "std must be > 0"),
    (_meta(pre_mean=[0.5, float("nan"), 0.5]), "mean must be 3 finite numbers"),
    (_meta(pre_crop_pct=0.9), "unknown key"),
    (_meta(pre_interpolation="fancy"), "interpolation must be one of"),
    (_meta(weights_digest="md5:1234"), "weights_digest must be"),
], ids=["threshold-abc", "threshold-null", "threshold-1.5", "one-class", "size-float", "size-negative",
        "size-huge", "std-zero", "mean-nan", "unknown-preprocess-key", "interpolation", "digest-format"])
def test_bad_metadata_is_a_clear_error(tmp_path, crops, meta, message):
    with pytest.raises(ArtifactError, match=message):
        A.ArtifactMeta.from_json(meta)
    s = json.loads(meta)["preprocess"].get("input_size")
    graph_size = 128 if not isinstance(s, int) or not 8 <= s <= 4096 else s
    path = write_model(tmp_path / "bad.onnx", meta=meta, graph_size=graph_size)
    res = _invoke(crops, "--model", path, "-o", tmp_path / "o.csv")
    assert res.exit_code == 2 and "malformed" in res.output, res.output
    assert "Traceback" not in res.output


def test_plan_side_file_with_unknown_preprocessing_key(tmp_path):
    from ami.runtime.engines.tensorrt import read_plan_sidecar, sidecar_path

    plan = tmp_path / "m.plan"
    plan.write_bytes(b"not really a plan")
    d = json.loads(_meta(pre_crop_pct=0.9))
    d.update(tensorrt_version="10.0", gpu_name="x", compute_capability="9.0")
    sidecar_path(plan).write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="unknown key"):
        read_plan_sidecar(plan)


def test_bench_parity_on_bad_threshold_is_clear(tmp_path):
    pytest.importorskip("torch")
    from ami.bench.parity import ParityError, parity

    bad = write_model(tmp_path / "bad.onnx", meta=_meta(threshold="abc"))
    with pytest.raises(ParityError, match="threshold must be a finite number"):
        parity(tmp_path, engines=[bad], weights=tmp_path / "w.safetensors", show_progress=False)


def test_fixed_batch_graph_is_refused_at_load(tmp_path):
    m = build_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # fixed batch of 1
    path = tmp_path / "b1.onnx"
    onnx.save_model(m, str(path))
    with pytest.raises(ArtifactError, match="fixed batch of 1"):
        load_engine(path, provider="cpu")


# -- 12. the debatable cases, decided ------------------------------------------------------------

def test_same_crop_two_spellings_is_classified_once(crops, tmp_path, monkeypatch):
    monkeypatch.chdir(crops.parent)
    rel = os.path.join(".", crops.name)
    found = list(iter_inputs([rel, crops, crops / "c000.png"]))
    assert len(found) == 24 and all(p.startswith(rel) for p in found), "first spelling kept"


def test_retry_errors_replaces_error_rows(tmp_path, engine):
    d = tmp_path / "crops"
    d.mkdir()
    for i in range(4):
        Image.fromarray(_crop(i)).save(d / f"c{i}.png")
    (d / "late.png").write_bytes(b"")  # not there yet (an upload in progress)
    paths = list(iter_inputs([d]))
    out = tmp_path / "o.csv"
    assert run_inference(paths, engine, out, progress=False).failed == 1
    assert run_inference(paths, engine, out, resume=True, progress=False).skipped_failed == 1, "not retried by default"
    Image.fromarray(_crop(9)).save(d / "late.png")
    s = run_inference(paths, engine, out, resume=True, retry_errors=True, progress=False)
    assert s.retried == 1 and s.ok == 1 and s.exit_code == 0 and s.compacted == 1
    rows = _read_csv(out)
    assert [r["path"] for r in rows] == paths, "one row per input, in input order"
    assert all(r["status"] == "ok" for r in rows)


def test_odd_shapes_and_frames_get_a_note(tmp_path, engine):
    d = tmp_path / "crops"
    d.mkdir()
    Image.fromarray(_crop(1, size=(1, 1))).save(d / "dot.png")
    Image.fromarray(_crop(2, size=(2000, 20))).save(d / "strip.png")
    Image.fromarray(_crop(3)).save(d / "plain.png")
    frames = [Image.fromarray(_crop(10 + i)) for i in range(3)]
    frames[0].save(d / "anim.png", save_all=True, append_images=frames[1:])
    frames[0].save(d / "pages.tif", save_all=True, append_images=frames[1:])
    out = tmp_path / "o.csv"
    s = run_inference(list(iter_inputs([d])), engine, out, progress=False)
    notes = {Path(r["path"]).name: r["note"] for r in _read_csv(out)}
    assert all(r == "ok" for r in (r["status"] for r in _read_csv(out)))
    assert "far from the model's 128 px" in notes["dot.png"]
    assert "aspect ratio 100:1" in notes["strip.png"]
    assert "first of 3 frames" in notes["anim.png"] and "first of 3 frames" in notes["pages.tif"]
    assert notes["plain.png"] == "" and s.noted == 4


def test_formula_like_names_are_guarded_in_csv(tmp_path, engine, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["=HYPERLINK(x).png", "+1.png", "-1.png", "@SUM.png", "'quoted.png", "plain.png"]
    for i, n in enumerate(names):
        Image.fromarray(_crop(i)).save(tmp_path / n)
    out = tmp_path / "o.csv"
    run_inference(names, engine, out, progress=False)
    with open(out, newline="") as f:
        cells = [r[0] for r in list(csv.reader(f))[1:]]
    assert cells == ["'=HYPERLINK(x).png", "'+1.png", "'-1.png", "'@SUM.png", "''quoted.png", "plain.png"]
    assert set(I.read_results(out, "csv")) == set(names), "ami's own reader gets the real names back"
    s = run_inference(names, engine, out, resume=True, progress=False)
    assert s.skipped == 6
    assert [os.path.basename(p) for p in iter_inputs([out])] == names, "an output used as a list of paths"


def test_threads_are_capped(crops, model, tmp_path):
    res = _invoke(crops / "c000.png", "--model", model, "-o", tmp_path / "o.csv", "--threads", 1000, "--no-progress")
    assert res.exit_code == 0 and f"--threads 1000 capped to this machine's {os.cpu_count()} cores" in res.output


def test_reference_still_holds_after_all_this(crops, engine, tmp_path):
    """The changes above must not change a single probability."""
    paths = list(iter_inputs([crops]))
    run_inference(paths, engine, tmp_path / "o.csv", batch_size=5, progress=False)
    rows = _read_csv(tmp_path / "o.csv")
    ref = reference_probs(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))
    np.testing.assert_allclose([float(r["prob_atypical"]) for r in rows], ref, atol=1e-5)


@pytest.mark.parametrize("metrics, message", [
    ({"predictions": "x"}, "'predictions' must hold a 'validation' list"),
    ({"predictions": {"validation": "x"}}, "'predictions' must hold a 'validation' list"),
    ({"predictions": {"validation": [["a.png", "Atypical", 0.2]]}}, "not a \\[name, label, probability\\] row"),
    ({"predictions": {"validation": [["a.png", 1, 7.0]]}}, "probabilities in \\[0, 1\\]"),
], ids=["str", "validation-str", "label-text", "prob-7"])
def test_export_on_malformed_run_metrics_is_clear(tmp_path, metrics, message):
    from ami.export import ExportError
    from ami.export.source import RunSource, oof_predictions

    src = RunSource(run_dir=tmp_path, config={"model": "edge", "method": "full"}, split={}, folds=[0],
                    metrics={"0": metrics})
    with pytest.raises(ExportError, match=message):
        oof_predictions(src)


def test_export_lora_run_of_an_entry_without_lora_targets_is_clear(tmp_path):
    from ami.export import ExportError
    from ami.export.source import RunSource
    from ami.train.registry import get

    assert not get("edge").lora_targets
    src = RunSource(run_dir=tmp_path, config={"model": "edge", "method": "lora"}, split={}, folds=[0])
    with pytest.raises(ExportError, match="has no LoRA targets"):
        _ = src.cfg  # the property refuses


def test_plan_digest_is_checked(tmp_path):
    """The TensorRT side: a plan's digest is the sha256 of the plan file (checked by TrtPlanEngine
    at load; the GPU path itself is exercised only on a TensorRT box)."""
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\x00serialised engine bytes" * 100)
    meta = tiny_meta(weights_digest=A.plan_weights_digest(plan))
    assert A.check_weights_digest(plan, meta) is True
    data = bytearray(plan.read_bytes())
    data[17] ^= 0x10
    plan.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="do not match the digest"):
        A.check_weights_digest(plan, meta)
    assert A.check_weights_digest(plan, tiny_meta()) is False, "no digest: not verified, not refused"
