"""Engine caches are verified at load (issue 25, class 7) and one engine serves several threads
(issue 25, class 3, the engine part).

A compiled model in OpenVINO's cache is what runs, so the ONNX file's weights digest does not
protect it: ami keeps each compiled model in its own cache entry sealed by a manifest of its
files' digests; an entry changed on disk is deleted and compiled again, saying so in one line."""

from __future__ import annotations

import json
import logging
import struct
import threading

import numpy as np
import pytest

from ami.runtime import engines as E
from ami.runtime.engines import cache as C
from onnx_factory import reference_probs, write_model

OV_MISSING = E.backend("openvino").unavailable()
needs_openvino = pytest.mark.skipif(OV_MISSING is not None, reason=str(OV_MISSING))
TINY_W = (1.5, -1.0, -0.5)  # the 1x1 convolution's weights in onnx_factory's tiny model
EVIL_W = (-15.0, 10.0, 5.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny.onnx")


def _pixels(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 128, 128, 3), dtype=np.uint8)


# -- the cache entry itself -----------------------------------------------------------------------

def test_a_sealed_entry_is_verified_and_a_changed_one_is_emptied(tmp_path, caplog):
    facts = dict(engine="x", weights="sha256:" + "0" * 64, version="1", precision="fp32", device="CPU")
    e = C.CacheEntry.open(tmp_path, **facts)
    assert e.dir.parent == tmp_path and e.dir.is_dir() and e.note == ""
    (e.dir / "model.blob").write_bytes(b"compiled" * 100)
    (e.dir / "sub").mkdir()
    (e.dir / "sub" / "more.bin").write_bytes(b"more")
    e.seal()
    assert e.sealed_files() == ["model.blob", "sub/more.bin"]
    man = json.loads((e.dir / C.MANIFEST).read_text())
    assert man["format"] == C.FORMAT and man["facts"] == facts
    assert C.CacheEntry.open(tmp_path, **facts).note == ""  # untouched: kept
    assert (e.dir / "model.blob").is_file()
    other = C.CacheEntry.open(tmp_path, **{**facts, "precision": "bf16"})
    assert other.dir != e.dir  # another precision is another entry

    cases = {
        "changed": (lambda d: (d / "model.blob").write_bytes(b"compiled" * 99 + b"COMPILED"),
                    "holds model.blob, changed since it was written (digest mismatch)"),
        "missing": (lambda d: (d / "sub" / "more.bin").unlink(), "lacks sub/more.bin"),
        "added": (lambda d: (d / "evil.blob").write_bytes(b"x"), "holds evil.blob, which it did not write"),
        "unsealed": (lambda d: (d / C.MANIFEST).unlink(), "was never sealed (an interrupted compile?)"),
        "manifest": (lambda d: (d / C.MANIFEST).write_text("{"), "has an unreadable manifest (JSONDecodeError)"),
    }
    for name, (spoil, why) in cases.items():
        e = C.CacheEntry.open(tmp_path, **facts)
        (e.dir / "model.blob").write_bytes(b"compiled" * 100)
        (e.dir / "sub").mkdir(exist_ok=True)
        (e.dir / "sub" / "more.bin").write_bytes(b"more")
        e.seal()
        spoil(e.dir)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ami.runtime.engines"):
            again = C.CacheEntry.open(tmp_path, **facts)
        assert again.note == f"engine cache {e.dir} {why}: deleted it, compiling again", name
        assert [r.getMessage() for r in caplog.records] == [again.note], name
        assert again.dir.is_dir() and not any(again.dir.iterdir()), name  # emptied, ready to compile
    assert C.clear(tmp_path) == 2 and not any(tmp_path.iterdir())


# -- a poisoned OpenVINO cache ----------------------------------------------------------------------

def _poison(blob) -> None:
    data = bytearray(blob.read_bytes())
    at = data.find(struct.pack("<3f", *TINY_W))
    assert at >= 0, "the tiny model's weights are not in the compiled blob"
    data[at:at + 12] = struct.pack("<3f", *EVIL_W)
    blob.write_bytes(bytes(data))


@needs_openvino
def test_a_poisoned_openvino_cache_is_found_and_compiled_again(tiny, tmp_path, caplog):
    from ami.runtime.engines import openvino as OV

    x = _pixels(40, seed=7)
    uncached = E.load_engine(tiny, engine="openvino", cache_dir=tmp_path / "fresh").predict(x)
    first = E.load_engine(tiny, engine="openvino", cache_dir=tmp_path / "ov")
    np.testing.assert_array_equal(first.predict(x), uncached)
    (blob,) = first.cache_dir.glob("*.blob")
    _poison(blob)

    # the edit reaches what runs: OpenVINO itself imports the edited blob from that folder
    core = OV.core()
    raw = core.compile_model(core.read_model(str(tiny)), "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                                 "INFERENCE_PRECISION_HINT": "f32",
                                                                 "CACHE_DIR": str(first.cache_dir)})
    poisoned = raw.create_infer_request().infer({0: x})[raw.output("prob_atypical")].reshape(-1)
    assert np.abs(poisoned - uncached).max() > 1e-3

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ami.runtime.engines"):
        again = E.load_engine(tiny, engine="openvino", cache_dir=tmp_path / "ov")
    assert again.cache_dir == first.cache_dir
    assert again.cache_note == (f"engine cache {first.cache_dir} holds {blob.name}, changed since it was written "
                                "(digest mismatch): deleted it, compiling again")
    assert [r.getMessage() for r in caplog.records] == [again.cache_note]
    p = again.predict(x)
    np.testing.assert_array_equal(p, uncached)
    assert ((p >= again.threshold) == (uncached >= again.threshold)).all()
    data = blob.read_bytes()  # compiled again from the ONNX file, and sealed again
    assert struct.pack("<3f", *TINY_W) in data and struct.pack("<3f", *EVIL_W) not in data
    assert again.cache_dir.joinpath(C.MANIFEST).is_file()
    assert E.load_engine(tiny, engine="openvino", cache_dir=tmp_path / "ov").cache_note == ""


# -- one engine, several threads ------------------------------------------------------------------

def _engines():
    out = ["onnxruntime"]
    if OV_MISSING is None:
        out.append("openvino")
    return out


@pytest.mark.parametrize("engine", _engines())
def test_one_engine_serves_four_threads(tiny, tmp_path, engine):
    eng = E.load_engine(tiny, engine=engine, threads=2, cache_dir=tmp_path / "c")
    batches = [_pixels(256, seed=s) for s in range(4)]  # long enough calls to overlap (one request failed "busy")
    want = [reference_probs(b) for b in batches]
    start = threading.Barrier(4)
    errors, results = [], {}

    def work(i):
        try:
            start.wait()
            for _ in range(6):
                got = eng.predict(batches[i])
                np.testing.assert_allclose(got, want[i], atol=1e-6)
            results[i] = got
        except Exception as e:  # collected and reported below
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [0, 1, 2, 3]
