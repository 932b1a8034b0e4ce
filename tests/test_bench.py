"""ami-bench latency: pytest-benchmark measurements that double as correctness tests.

Every benchmark uses ``benchmark.pedantic`` (a few rounds, warm-up excluded) and records the engine
and batch in ``extra_info``; with ``--benchmark-disable`` (CI) each runs once as a plain test and
its assertions still hold. The model is the edge entry's architecture (128 px) with random
weights, exported here to the ami artefact contract (fp32) and quantised to int8 QDQ, so these
tests need no trained model. The full benchmark is one command: ``ami-bench latency --data-root D``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

import onnx
import torch

from ami.bench import e2e as E
from ami.bench import flops as F
from ami.bench import latency as L
from ami.bench import latency_report as R
from ami.bench import peaks as K
from ami.bench import timing as T
from ami.runtime.artifact import INPUT_NAME, META_KEY, OUTPUT_NAME, ArtifactMeta
from ami.runtime.engines import backend, load_engine
from ami.train.registry import get
from bench_cli import cli_app

BATCHES = (1, 8)
OV_MISSING = backend("openvino").unavailable()


def cpu_variants(artefact_precision: str) -> list[tuple[str, str]]:
    """(engine title, precision) of the rows the benchmark makes for a file on this machine."""
    out = []
    for name in ("onnxruntime", "openvino"):
        b = backend(name)
        if b.unavailable() is None:
            out += [(b.title, q) for q in b.precisions(artefact_precision)]
    return out




# -- a small real-architecture model in the artefact contract -------------------------------------

def _set_meta(path: Path, meta: ArtifactMeta) -> None:
    m = onnx.load(str(path))
    keep = [p for p in m.metadata_props if p.key != META_KEY]
    del m.metadata_props[:]
    for p in keep:
        m.metadata_props.add(key=p.key, value=p.value)
    m.metadata_props.add(key=META_KEY, value=meta.to_json())
    onnx.save(m, str(path))


def make_edge_artefacts(out: Path, seed: int = 0) -> dict:
    """edge.safetensors (random init) + edge.onnx (fp32, uint8 NHWC in) + edge-int8.onnx (QDQ)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from ami.export.ensemble import DeployGraph
    from ami.train.fit import save_weights
    from ami.train.models import create

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = get("edge")
    model = create(cfg, "full", random_init=True, drop_rate=0.2).eval()
    save_weights(model, out / "edge.safetensors")
    graph = DeployGraph(cfg.preprocess, [model]).eval()
    s = cfg.preprocess.input_size
    x = torch.randint(0, 256, (2, s, s, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    fp32 = out / "edge.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (x,), str(fp32), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=17, dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}})
    meta = ArtifactMeta(model="edge", method="full", preprocess=cfg.preprocess, folds=["all"],
                        display="edge, random weights (benchmark tests)")
    _set_meta(fp32, meta)

    calib = np.random.default_rng(seed).integers(0, 256, (8, s, s, 3), dtype=np.uint8)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT_NAME: calib[i:i + 4]} for i in range(0, len(calib), 4)])

        def get_next(self):
            return next(self.batches, None)

    names = [n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node]
    int8 = out / "edge-int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=False,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=[n for n in names if not n.startswith("/folds.")])
    meta8 = ArtifactMeta(model="edge", method="full", preprocess=cfg.preprocess, folds=["all"], precision="int8",
                         display="edge, random weights, int8 (benchmark tests)")
    _set_meta(int8, meta8)
    return {"weights": out / "edge.safetensors", "fp32": fp32, "int8": int8, "model": model, "pre": cfg.preprocess}


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    torch.set_num_threads(1)
    return make_edge_artefacts(tmp_path_factory.mktemp("edge"))


@pytest.fixture(scope="module")
def runners(edge):
    out = {"pytorch": T.torch_runner([edge["model"]], edge["pre"], "cpu", "edge.safetensors")}
    for key in ("fp32", "int8"):
        out[f"onnx-{key}"] = T.engine_runner(load_engine(edge[key], provider="cpu", threads=1))
        if OV_MISSING is None:
            out[f"openvino-{key}"] = T.engine_runner(load_engine(edge[key], engine="openvino", threads=1))
    return out


@pytest.fixture(scope="module")
def pixels(edge):
    s = edge["pre"].input_size
    return np.random.default_rng(1).integers(0, 256, (max(BATCHES), s, s, 3), dtype=np.uint8)


# -- statistics ----------------------------------------------------------------------------------

def test_stats_percentiles_and_throughput():
    times = np.arange(1, 101) / 1000.0  # 1..100 ms
    st = T.stats_from(times, batch=8, warmup=3)
    assert st.rounds == 100 and st.warmup == 3
    assert st.p50_ms == pytest.approx(50.5)
    assert st.p95_ms == pytest.approx(95.05)
    assert st.p99_ms == pytest.approx(99.01)
    assert st.min_ms == pytest.approx(1.0) and st.max_ms == pytest.approx(100.0)
    assert st.crops_per_s == pytest.approx(8 * 100 / times.sum())
    with pytest.raises(ValueError, match="no timed rounds"):
        T.stats_from([], batch=1)


def test_time_fn_excludes_warmup_and_bounds_rounds():
    calls = []
    times, w = T.time_fn(lambda: calls.append(1), rounds=4, warmup=3)
    assert (len(times), w, len(calls)) == (4, 3, 7)
    calls.clear()
    times, _ = T.time_fn(lambda: calls.append(1), rounds=0, warmup=1, seconds=10.0, min_rounds=2, max_rounds=6)
    assert len(times) == 6 and len(calls) == 7  # a near-free call: capped at max_rounds


def test_parse_batches():
    assert L.parse_batches("128, 1,8,8") == [1, 8, 128]
    for bad in ("", "0,4", "a"):
        with pytest.raises(T.LatencyError):
            L.parse_batches(bad)


# -- model-only latency per engine and batch -------------------------------------------------------

@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("engine", ["pytorch", "onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"])
def test_model_latency(benchmark, runners, pixels, engine, batch):
    if engine.startswith("openvino") and OV_MISSING:
        pytest.skip(OV_MISSING)
    r = runners[engine]
    x = np.ascontiguousarray(pixels[:batch])
    benchmark.extra_info.update(engine=r.engine, precision=r.precision, device=r.device, batch=batch, model=r.model)
    p = benchmark.pedantic(r.predict, args=(x,), rounds=3, warmup_rounds=1, iterations=1)
    p = np.asarray(p)
    assert p.shape == (batch,) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    ref = runners["pytorch"].predict(x)
    if r.precision == "fp32":
        assert np.abs(p - ref).max() <= 1e-4, f"{engine} differs from PyTorch by {np.abs(p - ref).max():.2e}"
    else:  # int8 of a random network: same ballpark, not the same numbers
        assert np.abs(p - ref).max() < 0.2


def test_flops_from_onnx_graph_match_flopcounter(edge, runners):
    f_torch = runners["pytorch"].flops_per_crop
    f_onnx = F.onnx_flops_per_crop(edge["fp32"])
    f_int8 = F.onnx_flops_per_crop(edge["int8"])
    assert f_torch and f_onnx and f_int8
    # per 128 px crop (FLOPs = 2 x multiply-adds): RegNetX-200MF ~65 M MACs, RegNetX-400MF ~130 M
    lo, hi = {"regnetx_002": (1e8, 2e8), "regnetx_004": (2e8, 3.5e8)}[get("edge").arch]
    assert lo < f_torch < hi
    assert f_onnx == pytest.approx(f_torch, rel=0.01)
    assert f_int8 == pytest.approx(f_onnx, rel=1e-6)  # the same convolutions, quantised


def test_peak_gflops_measures_a_matmul():
    p = K.peak_gflops(n=256, reps=2)
    assert p["gflops"] > 0.05 and p["n"] == 256 and p["device"] == "cpu"
    assert p["gflops"] == pytest.approx(2 * 256 ** 3 / p["best_s"] / 1e9)


# -- end to end: ami-infer vs the plain reference loop ---------------------------------------------

@pytest.fixture(scope="module")
def e2e_paths(synthetic_root):
    paths, source = E.e2e_crops(synthetic_root, None, 24)
    assert len(paths) == 24 and "AtNorM-MD" in source
    return paths


def test_end_to_end_ami_infer(benchmark, edge, e2e_paths):
    eng = load_engine(edge["fp32"], provider="cpu", threads=1)
    benchmark.extra_info.update(engine="ami-infer (ONNX Runtime fp32)", batch=8, crops=len(e2e_paths))
    probs, secs, summ = benchmark.pedantic(E.run_ami_infer, args=(e2e_paths, eng), kwargs=dict(batch=8, workers=1),
                                           rounds=2, warmup_rounds=0, iterations=1)
    assert probs.shape == (len(e2e_paths),) and np.isfinite(probs).all()
    assert secs > 0 and summ["ok"] == len(e2e_paths)


def test_end_to_end_reference_loop_matches_ami_infer(benchmark, edge, e2e_paths):
    from ami.bench.reference import reference_loop

    benchmark.extra_info.update(engine="reference loop (PIL + torchvision + DataLoader + PyTorch)", batch=8,
                                crops=len(e2e_paths))
    res = benchmark.pedantic(reference_loop, args=(e2e_paths, [edge["model"]], edge["pre"]),
                             kwargs=dict(batch_size=8, workers=1), rounds=2, warmup_rounds=0, iterations=1)
    assert res.probs.shape == (len(e2e_paths),) and res.elapsed_s > 0
    eng = load_engine(edge["fp32"], provider="cpu", threads=1)
    probs, _, _ = E.run_ami_infer(e2e_paths, eng, batch=8, workers=1)
    # same model, same crops, two independent pipelines (PIL+torchvision vs decode_rgb+graph)
    assert np.abs(probs - res.probs).max() <= 1e-4
    assert np.array_equal(probs >= 0.5, res.probs >= 0.5)


# -- the whole benchmark, small ------------------------------------------------------------------

def test_run_latency_side_by_side(edge, synthetic_root):
    rep = L.run_latency([edge["fp32"], edge["int8"]], weights=edge["weights"], batches=[1, 4], data_root=synthetic_root,
                        crops=16, threads=1, rounds=2, warmup=1, peak_n=256, peak_reps=2, e2e_batch=8, e2e_rounds=2,
                        workers=1,
                        show_progress=False, log=lambda s: None)
    cells = {(r.engine, r.precision, r.batch) for r in rep.rows if r.device == "cpu"}
    variants = [("PyTorch eager", "fp32")] + cpu_variants("fp32") + cpu_variants("int8")
    assert ("ONNX Runtime", "int8") in variants
    assert cells == {(e, p, b) for e, p in variants for b in (1, 4)}  # every installed engine, every precision
    skipped = {s["engine"]: s["reason"] for s in rep.skipped}
    # a GPU machine adds CUDA / TensorRT rows; each GPU engine is either measured or skipped with a reason
    gpu_rows = {r.engine for r in rep.rows if r.device == "cuda"}
    assert ("PyTorch eager" in gpu_rows) == torch.cuda.is_available()
    if "TensorRT" not in gpu_rows:
        assert any(k.startswith("TensorRT") for k in skipped)
    cpu_rows = [r for r in rep.rows if r.device == "cpu"]
    for r in cpu_rows:
        assert r.stats["rounds"] == 2 and r.stats["warmup"] == 1
        assert r.stats["p50_ms"] > 0 and r.stats["crops_per_s"] > 0
        # each row against the peak of its own precision
        assert r.peak_ref == {"fp32": "cpu_float32", "bf16": "cpu_bfloat16", "int8": "cpu_int8"}[r.precision]
        assert r.flops_per_crop and 0 < r.peak_fraction < 5
        assert r.peak_fraction == pytest.approx(r.achieved_gflops / rep.peaks[r.peak_ref]["gflops"])
    assert rep.peaks["cpu_float32"]["gflops"] > 0 and rep.peaks["cpu_int8"]["dtype"] == "int8"
    impls = [t["impl"] for t in rep.peaks["cpu_int8"]["implementations"] if "gflops" in t]
    assert any("MatMulInteger (u8*s8)" in i for i in impls)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in skipped["TensorRT fp16/fp32"] or "TensorRT" in skipped["TensorRT fp16/fp32"]
        assert "PyTorch eager (CUDA)" in skipped
    e = rep.end_to_end
    assert e["crops"] == 16 and e["reference"]["crops_per_s"] > 0 and len(e["reference"]["seconds_per_round"]) == 2
    assert e["reference"]["seconds"] == pytest.approx(float(np.median(e["reference"]["seconds_per_round"])))
    runs = {(r["engine"], r["precision"]): r for r in e["ami_infer"]}
    auto = backend("openvino").title if OV_MISSING is None else "ONNX Runtime"
    assert set(runs) == {(t, p) for t in {"ONNX Runtime", auto} for p in ("fp32", "int8")}  # ORT and auto's choice
    for (title, prec), run in runs.items():
        if prec == "fp32":
            assert run["check"].startswith("pass") and run["labels_identical"], (title, run)
        else:
            assert run["check"].startswith("not checked")
        assert run["ratio_vs_reference"] == pytest.approx(run["crops_per_s"] / e["reference"]["crops_per_s"])
        # where the time went, and the bound the two stages set on the same cores
        assert 0 < run["engine_fraction"] < 1 and 0 <= run["wait_fraction"] < 1
        assert run["bound_crops_per_s"] == pytest.approx(
            1 / (1 / run["model_only_crops_per_s"] + 1 / e["decode_only"]["crops_per_s"]))
    assert e["decode_only"]["crops_per_s"] > 0 and len(e["decode_only"]["seconds_per_round"]) == 2
    d = json.loads(rep.to_json())
    assert d["schema"] == R.SCHEMA and d["machine"]["cpu"] and d["machine"]["onnxruntime"]
    assert {"engine", "batch", "stats", "flops_per_crop", "peak_fraction"} <= set(d["rows"][0])
    md = rep.to_markdown()
    for text in ("PyTorch eager", "ONNX Runtime", "int8", "skipped", "GFLOP/s", "reference loop", "ami-infer",
                 "cpu int8", "GOP/s", "Stages alone", "% of bound"):
        assert text in md
    if OV_MISSING is None:
        assert "| OpenVINO | int8 |" in md


def test_latency_cli_writes_json_and_markdown(edge, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    app = cli_app(L)
    monkeypatch.setenv("AMI_DATA_ROOT", str(tmp_path / "no-data"))  # no crops: random pixels, no end-to-end
    j, md = tmp_path / "lat.json", tmp_path / "lat.md"
    res = CliRunner().invoke(app, ["latency", "-m", str(edge["fp32"]), "--weights", str(edge["weights"]), "--batch-size", "2",
                                   "--rounds", "2", "--warmup", "0", "--no-e2e", "--peak-n", "128", "--threads", "1",
                                   "--json", str(j), "--md", str(md)])
    assert res.exit_code == 0, res.output
    d = json.loads(j.read_text())
    assert [r["batch"] for r in d["rows"] if r["device"] == "cpu"] == [2] * (1 + len(cpu_variants("fp32")))  # GPUs add rows
    assert d["settings"]["pixels"].startswith("random")
    assert d["settings"]["models"] == ["edge.onnx"]  # outside the working folder: the name, never a machine path
    assert "| PyTorch eager |" in md.read_text() and "| ONNX Runtime |" in md.read_text()


def test_latency_cli_without_shipped_model_says_so(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    app = cli_app(L)
    monkeypatch.setattr(L, "SHIPPED_ENGINES", (tmp_path / "edge.onnx", tmp_path / "edge-int8.onnx"))
    res = CliRunner().invoke(app, ["latency", "--no-e2e"])
    assert res.exit_code == 2
    assert "no shipped model found" in res.output and "--model" in res.output


def test_peak_keys_follow_precision():
    from ami.bench.peaks import peak_key

    assert peak_key("cpu", "fp32") == "cpu_float32" and peak_key("cpu", "int8") == "cpu_int8"
    assert peak_key("cpu", "bf16") == "cpu_bfloat16" and peak_key("cuda", "fp16") == "cuda_float16"


def test_cpu_peaks_per_precision(monkeypatch):

    f32 = K.cpu_peak("fp32", n=256, reps=2, threads=1)
    i8 = K.cpu_peak("int8", n=256, reps=2, threads=1)
    assert f32["gflops"] > 0 and f32["dtype"] == "float32" and i8["dtype"] == "int8"
    assert i8["gflops"] == max(t["gflops"] for t in i8["implementations"] if "gflops" in t)
    monkeypatch.setattr(K, "cpu_flags", lambda: {"avx2"})  # a CPU without bf16: no bf16 peak, no bf16 rows
    assert K.cpu_peak("bf16", n=64, reps=1) is None
