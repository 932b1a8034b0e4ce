"""The helpers every layer shares, each with one owner: the stratified subset
(ami.runtime.sampling), crops -> pixels (ami.runtime.pixels), file hashing (ami.runtime.hashing),
batch-size lists, and the export's option bundle and classifier-head record.

The subset is checked against the copies it replaced (export/checks, bench/parity with
``min_positives=1``; train/fit's smoke-run subset with ``min_positives=2``), so exports, parity
samples and ``--max-train`` runs draw exactly the crops they drew before. Needs no dataset.
"""

from __future__ import annotations

import hashlib
import json
import types
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from ami.runtime.artifact import ArtifactMeta, plan_weights_digest, validate_meta_dict
from ami.runtime.engines.base import parse_batch_sizes
from ami.runtime.hashing import file_sha256
from ami.runtime.imageio import ImageError, decode_rgb
from ami.runtime.pixels import decode_pixels
from ami.runtime.preprocess import Preprocess
from ami.runtime.sampling import stratified_subset


@dataclass(frozen=True)
class Crop:
    name: str
    label: int


def _pool(n_pos: int, n_neg: int) -> list[Crop]:
    mixed = [Crop(f"p{i}", 1) for i in range(n_pos)] + [Crop(f"n{i}", 0) for i in range(n_neg)]
    return sorted(mixed, key=lambda c: hashlib.md5(c.name.encode()).hexdigest())  # classes interleaved


def _export_copy(samples, n, seed=0):  # export/checks.stratified and bench/parity.sample_crops, as they were
    if n <= 0 or n >= len(samples):
        return list(samples)
    rng = np.random.default_rng(seed)
    pos = [s for s in samples if s.label == 1]
    neg = [s for s in samples if s.label == 0]
    k_pos = min(len(pos), max(1, round(n * len(pos) / len(samples))))
    k_neg = min(len(neg), n - k_pos)
    pick = [pos[i] for i in sorted(rng.choice(len(pos), k_pos, replace=False))]
    pick += [neg[i] for i in sorted(rng.choice(len(neg), k_neg, replace=False))]
    return pick


def _fit_copy(samples, n, seed=0):  # train/fit._subset (ami-train --max-train / --max-eval), as it was
    if not n or n >= len(samples):
        return samples
    rng = np.random.default_rng(seed)
    pos = [s for s in samples if s.label == 1]
    neg = [s for s in samples if s.label == 0]
    k_pos = max(2, round(n * len(pos) / len(samples)))
    pick = [pos[i] for i in sorted(rng.choice(len(pos), min(k_pos, len(pos)), replace=False))]
    pick += [neg[i] for i in sorted(rng.choice(len(neg), min(n - len(pick), len(neg)), replace=False))]
    return pick


@pytest.mark.parametrize("n_pos,n_neg", [(3, 40), (20, 80), (648, 2246), (1, 100), (0, 10), (10, 0)])
def test_stratified_subset_draws_what_the_replaced_copies_drew(n_pos, n_neg):
    pool = _pool(n_pos, n_neg)
    for n in (0, 2, 3, 5, 17, 32, 64, 300, len(pool) - 1, len(pool), len(pool) + 5):
        for seed in (0, 1, 2, 7):
            assert stratified_subset(pool, n, seed) == _export_copy(pool, n, seed), (n, seed)
            assert stratified_subset(pool, n, seed, min_positives=2) == list(_fit_copy(pool, n, seed)), (n, seed)


def test_stratified_subset_rule():
    pool = _pool(30, 270)
    a = stratified_subset(pool, 50, seed=3)
    assert len(a) == 50 and a == stratified_subset(pool, 50, seed=3) and a != stratified_subset(pool, 50, seed=4)
    assert sum(c.label for c in a) == 5  # in proportion: 50 * 30 / 300
    assert sum(c.label for c in stratified_subset(_pool(1, 300), 10)) == 1  # its share rounds to 0: still one
    assert sum(c.label for c in stratified_subset(_pool(3, 300), 10, min_positives=2)) == 2  # at least two atypical
    order = {c.name: i for i, c in enumerate(pool)}
    assert [order[c.name] for c in a if c.label] == sorted(order[c.name] for c in a if c.label)  # kept in order
    assert stratified_subset(pool, 0) == pool and stratified_subset(pool, -1) == pool
    assert stratified_subset(pool, 0) is not pool  # a new list: callers may change it


def test_decode_pixels_is_the_runtime_path_and_names_the_bad_file(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate((64, 90, 64)):
        p = tmp_path / f"c{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    pre = Preprocess(input_size=64)
    x = decode_pixels(paths, pre)
    assert x.shape == (3, 64, 64, 3) and x.dtype == np.uint8
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(x[i], pre.to_uint8(decode_rgb(p)))
    seen = []
    decode_pixels(paths, pre, progress=lambda it: seen.append(len(it)) or it)
    assert seen == [3]
    assert decode_pixels([], pre).shape == (0, 64, 64, 3)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError, match=r"broken\.png: not an image"):
        decode_pixels([paths[0], bad], pre)


def test_file_sha256_is_sha256_and_plans_use_it(tmp_path):
    p = tmp_path / "blob.bin"
    data = np.random.default_rng(1).bytes(3 * (1 << 20) + 17)
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest() == file_sha256(p, chunk=1000)
    assert plan_weights_digest(p) == "sha256:" + hashlib.sha256(data).hexdigest()
    from ami.runtime.datasets import file_sha256 as from_datasets

    assert from_datasets is file_sha256


def test_parse_batch_sizes():
    assert parse_batch_sizes("128, 1,8,8") == [1, 8, 128]
    assert parse_batch_sizes((32, 1)) == [1, 32]
    for bad, why in (("", "positive"), ("0,4", "positive"), ("a,b", "like 1,32,128"), (["x"], "like 1,32,128")):
        with pytest.raises(ValueError, match=why):
            parse_batch_sizes(bad)


def test_artifact_records_the_classifier_head():
    pre = Preprocess(input_size=64)
    meta = ArtifactMeta(model="edge", method="full", preprocess=pre, head_modules=["head.fc"])
    assert ArtifactMeta.from_json(meta.to_json()).head_modules == ["head.fc"]
    old = ArtifactMeta(model="edge", method="full", preprocess=pre)
    assert old.head_modules == []  # older artefacts: nothing recorded
    d = json.loads(meta.to_json())
    assert validate_meta_dict(d) == []
    for bad in ("head.fc", [""], [3]):
        assert any("head_modules" in p for p in validate_meta_dict({**d, "head_modules": bad})), bad


def test_export_options_take_flat_keywords():
    from ami.export import CheckOptions, ExportOptions, Int8Options, TrtOptions

    base = ExportOptions()
    o = base.with_overrides(engine="onnx-int8", calib_crops=800, batch="1,8", opset=18, threads=2, log=None)
    assert o.engine == "onnx-int8" and o.threads == 2 and o.log is None
    assert o.int8 == Int8Options(calib_crops=800) and o.trt == TrtOptions(batch="1,8")
    assert o.check == CheckOptions(opset=18)
    assert base == ExportOptions() and base.with_overrides() == base  # frozen: a copy, never changed in place
    assert (base.int8.ba_tol, base.int8.auroc_tol, base.check.tol) == (0.01, 0.005, 1e-4)
    for bad in ("calib_crop", "int8", "check"):
        with pytest.raises(TypeError, match=bad):
            base.with_overrides(**{bad: 1})


def test_int8_head_from_metadata_else_the_registry():
    pytest.importorskip("torch")
    from ami.export.quantize import excluded_nodes, float_heads

    pre = Preprocess(input_size=64)
    logs = []
    recorded = ArtifactMeta(model="edge", method="lora", preprocess=pre, head_modules=["logit_head"])
    assert float_heads(recorded, "m.onnx", logs.append) == ["logit_head"] and not logs
    older = ArtifactMeta(model="edge", method="full", preprocess=pre)
    assert float_heads(older, "edge.onnx", logs.append) == ["logit_head", "head.fc"]  # what ami-export always kept
    assert "edge.onnx does not record its classifier head" in logs[-1] and "registry entry 'edge'" in logs[-1]
    unknown = ArtifactMeta(model="not-in-the-registry", method="full", preprocess=pre)
    assert float_heads(unknown, "x.onnx", logs.append) == ["logit_head"] and "no entry" in logs[-1]

    names = ["/pre/Cast", "/folds.0/net/stem/conv/Conv", "/folds.0/net/head/fc/Gemm",
             "/folds.0/net/head/flatten/Flatten", "/post/Sigmoid"]
    nodes = [types.SimpleNamespace(name=n, op_type=n.rsplit("/", 1)[1], input=["pixels"], output=[n + ":0"]) for n in names]
    graph = types.SimpleNamespace(graph=types.SimpleNamespace(node=nodes, input=[types.SimpleNamespace(name="pixels")]))
    excl, n_net = excluded_nodes(graph, ["head.fc"])
    assert n_net == 3 and excl == ["/pre/Cast", "/folds.0/net/head/fc/Gemm", "/post/Sigmoid"]


def test_atomic_writes_replace_whole_and_leave_nothing_on_failure(tmp_path):
    from ami.runtime import atomic

    target = tmp_path / "record.json"
    atomic.atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{\n "a": 1\n}\n'
    atomic.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"

    def half_then_fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_via(target, half_then_fail)
    assert target.read_bytes() == b"new"  # the old content, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]  # no temporary file left


def test_a_state_file_that_is_not_amis_is_one_clear_error(tmp_path):
    """--resume on a fold whose state.pt is another tool's file, damaged, or lacks ami's keys."""
    torch = pytest.importorskip("torch", reason="the training state is a torch file (the train extra)")
    from ami.runtime.rundir import RunDirError
    from ami.train.loop import load_resume_state

    bad = tmp_path / "state.pt"
    bad.write_bytes(b"PK\x03\x04 not a torch file")
    with pytest.raises(RunDirError, match=r"state\.pt: not an ami training state \(.*\); delete it to train this fold"):
        load_resume_state(bad, ("model", "opt"))
    torch.save({"model": {}}, bad)
    with pytest.raises(RunDirError, match=r"state\.pt: not an ami training state \(no opt\); delete it"):
        load_resume_state(bad, ("model", "opt"))
    torch.save({"model": {}, "opt": {}}, bad)
    assert set(load_resume_state(bad, ("model", "opt"))) == {"model", "opt"}
