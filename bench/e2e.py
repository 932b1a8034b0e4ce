"""End to end (decode + preprocess + infer) on real crops: the ``ami-infer`` pipeline per engine
against the plain reference loop of :mod:`ami.bench.reference`, interleaved rounds, and the bound
the two stages alone (decoding; the engine on decoded pixels) set on the same cores."""

from __future__ import annotations

import csv
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ami.runtime.datasets import available_eval_sets, resolve_data_root
from ami.runtime.engines import EngineError
from ami.runtime.preprocess import Preprocess
from ami.runtime.sampling import stratified_subset
from ami.runtime.tolerances import FP32_PROB_TOL

from .common import is_base_engine
from .timing import LatencyError

E2E_SETS = ("AtNorM-MD", "AMi-Br-test", "AtNorM-Br")  # the first present one gives the end-to-end crops
FP32_E2E_TOL = FP32_PROB_TOL  # ami-infer (fp32 ONNX) vs the reference loop: max |delta p|


def e2e_crops(data_root: Path | None, folder: Path | None, n: int) -> tuple[list[str], str]:
    """(crop paths, description): a folder's crops, or a class-stratified sample of the first present test set."""
    if folder is not None:
        from ami.runtime.infer import iter_inputs

        paths = list(iter_inputs([folder]))
        if not paths:
            raise LatencyError(f"no crops found under {folder}")
        if n > 0:
            paths = paths[:n]
        return paths, str(folder)
    root = resolve_data_root(data_root)
    sets = available_eval_sets(root)
    for name in E2E_SETS:
        found = sets.get(name)
        if isinstance(found, list) and found:
            picked = stratified_subset(found, n)
            return [str(s.path) for s in picked], f"{name} (class-stratified sample, seed 0)" if 0 < n < len(found) else name
    raise LatencyError(f"no test set found under data root {root} for the end-to-end run; pass --data-root D or "
                       "--folder DIR (or --no-e2e)")


def run_ami_infer(paths: list[str], eng, *, batch: int, workers: int, pool: str = "thread") -> tuple[np.ndarray, float, dict]:
    """The ami-infer pipeline on ``paths``: (probabilities in input order, seconds, summary)."""
    from ami.runtime.infer import run_inference

    with tempfile.TemporaryDirectory(prefix="ami-bench-") as d:
        out = Path(d) / "pred.csv"
        summ = run_inference(paths, eng, out, fmt="csv", batch_size=batch, workers=workers, progress=False, pool=pool)
        probs = {}
        with open(out, newline="") as f:
            for row in csv.DictReader(f):
                probs[row["path"]] = float(row["prob_atypical"]) if row["status"] == "ok" else math.nan
    if summ.failed:
        raise LatencyError(f"ami-infer could not read {summ.failed} of the crops: {summ.first_errors[:3]}")
    return np.array([probs[p] for p in paths], np.float64), summ.elapsed_s, summ.to_dict()



def e2e_engines(engines: list) -> list:
    """The engines of the end-to-end table: per artefact, ONNX Runtime (the base install) and the
    engine ``--engine auto`` picks for it here (when another), each at the artefact's own precision."""
    from ami.runtime.engines import choose

    out = []
    for path in dict.fromkeys(e.path for e in engines):
        own = [e for e in engines if e.path == path and e.precision == e.meta.precision]
        try:
            auto = choose(path)[0].name
        except EngineError:
            auto = ""
        for e in [next((x for x in own if is_base_engine(x)), None), next((x for x in own if x.engine == auto), None)]:
            if e is not None and e not in out:
                out.append(e)
    return out or list(engines[:1])


def decode_only(paths: list[str], pre: Preprocess, *, batch: int, workers: int) -> tuple[np.ndarray, float]:
    """ami-infer's decode stage alone (the same prepare_batch, the same thread pool, no engine):
    (uint8 pixels in input order, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from ami.runtime.infer import prepare_batch

    chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="ami-decode") as ex:
        parts = [px for px, _ in ex.map(lambda c: prepare_batch(c, pre), chunks)]
    return np.concatenate(parts), time.perf_counter() - t0


def model_only(eng, pixels: np.ndarray, batch: int) -> float:
    """Seconds for the engine alone over ``pixels`` in batches of ``batch`` (one pass)."""
    t0 = time.perf_counter()
    for i in range(0, len(pixels), batch):
        eng.predict(pixels[i:i + batch])
    return time.perf_counter() - t0


@dataclass
class _E2ETimes:
    """What the timed end-to-end rounds measured, per pipeline (engines in order)."""

    ref: object = None  # the reference loop's last result (probabilities, workers, batch)
    ref_times: list[float] = field(default_factory=list)
    eng_times: list[list[float]] = field(default_factory=list)
    eng_probs: list = field(default_factory=list)
    eng_summ: list = field(default_factory=list)
    dec_times: list[float] = field(default_factory=list)
    mod_times: list[list[float]] = field(default_factory=list)


def end_to_end(paths: list[str], source: str, engines, torch_models, pre: Preprocess, torch_name: str, *, batch: int,
                workers: int, threads: int, rounds: int = 1, log) -> dict:
    """The ami-infer pipeline (each engine) and the plain reference loop on the same crops.

    One untimed warm-up pass over the first batch each, then ``rounds`` timed passes, interleaved
    (reference, engine 1, engine 2, ... per round) so that drift of a shared machine hits all
    pipelines alike; the median time over rounds is reported."""
    from ami.runtime.infer import default_workers

    if not paths:
        return {"skipped": "no crops (pass --data-root D or --folder DIR)", "source": source, "crops": 0}
    workers = workers if workers > 0 else default_workers()
    rounds = max(1, int(rounds))
    out: dict = {"source": source, "crops": len(paths), "batch": batch, "workers": workers, "rounds": rounds,
                 "what": "wall time of the whole loop: reading files, decoding, preprocessing, batching, inference; "
                         "one untimed warm-up pass over the first batch for each pipeline, then the timed rounds "
                         "(interleaved), median reported",
                 "ami_infer": []}
    t = _e2e_rounds(paths, engines, torch_models, pre, batch=batch, workers=workers, rounds=rounds, log=log)
    dec_s = float(np.median(t.dec_times))
    out["decode_only"] = {"seconds": dec_s, "seconds_per_round": t.dec_times, "crops_per_s": len(paths) / dec_s,
                          "what": f"ami-infer's decode + geometry stage alone (prepare_batch, {workers} threads, "
                                  f"batch {batch}), no engine"}
    ref_s = float(np.median(t.ref_times)) if t.ref_times else None
    if t.ref is not None:
        out["reference"] = {"model": torch_name, "crops": len(paths), "seconds": ref_s,
                            "seconds_per_round": t.ref_times,
                            "crops_per_s": len(paths) / ref_s if ref_s else math.inf, "workers": t.ref.workers,
                            "batch": t.ref.batch_size,
                            "pipeline": "PIL Image.open().convert('RGB') + torchvision Resize/ToTensor/Normalize + "
                                        "torch DataLoader (worker processes) + PyTorch eager"}
    else:
        out["reference_skipped"] = "no PyTorch weights"
    for i, eng in enumerate(engines):
        out["ami_infer"].append(_e2e_record(eng, i, t, out, len(paths), threads))
    return out


def _e2e_rounds(paths: list[str], engines, torch_models, pre: Preprocess, *, batch: int, workers: int, rounds: int,
                log) -> _E2ETimes:
    """The warm-up pass of every pipeline, then the timed rounds: per round the reference loop,
    ami-infer with each engine, and the two stages alone (decoding; each engine on the decoded pixels)."""
    t = _E2ETimes(eng_times=[[] for _ in engines], eng_probs=[None] * len(engines), eng_summ=[None] * len(engines),
                  mod_times=[[] for _ in engines])
    warm = paths[:min(len(paths), batch)]
    if torch_models is not None:
        from .reference import reference_loop

        reference_loop(warm, torch_models, pre, batch_size=batch, workers=workers)
    for eng in engines:
        run_ami_infer(warm, eng, batch=batch, workers=workers)
    for k in range(rounds):
        of = f", round {k + 1}/{rounds}" if rounds > 1 else ""
        if torch_models is not None:
            log(f"latency: end-to-end reference loop (PIL + torchvision + DataLoader + PyTorch) on {len(paths)} crops"
                + of)
            t.ref = reference_loop(paths, torch_models, pre, batch_size=batch, workers=workers)
            t.ref_times.append(t.ref.elapsed_s)
        for i, eng in enumerate(engines):
            log(f"latency: end-to-end ami-infer with {eng.path.name} on {len(paths)} crops" + of)
            t.eng_probs[i], secs, t.eng_summ[i] = run_ami_infer(paths, eng, batch=batch, workers=workers)
            t.eng_times[i].append(secs)
        # the two stages alone, in the same round: what bounds the pipeline on these cores
        log(f"latency: decode stage alone on {len(paths)} crops, and each engine alone on the decoded pixels")
        pixels, dsec = decode_only(paths, pre, batch=batch, workers=workers)
        t.dec_times.append(dsec)
        for i, eng in enumerate(engines):
            eng.predict(pixels[:batch])
            t.mod_times[i].append(model_only(eng, pixels, batch))
    return t


def _e2e_record(eng, i: int, t: _E2ETimes, out: dict, n: int, threads: int) -> dict:
    """The end-to-end row of engine ``i``: its median speed, where its wall time went, the bound the
    two stages set, and (with a reference loop) its agreement with it; fp32 is checked."""
    batch, workers = out["batch"], out["workers"]
    secs = float(np.median(t.eng_times[i]))
    probs, summ = t.eng_probs[i], t.eng_summ[i]
    rec = {"model": eng.path.name, "engine": eng.title or eng.engine, "precision": eng.precision,
           "provider": eng.provider, "crops": n, "seconds": secs, "seconds_per_round": t.eng_times[i],
           "crops_per_s": n / secs if secs > 0 else math.inf, "batch": batch,
           "workers": workers, "pool": summ.get("pool", "thread"), "threads": threads}
    # where the wall time went (ami-infer's own clocks, the median round) and the bound the stages set
    rec["engine_fraction"] = summ.get("engine_s", 0.0) / summ["elapsed_s"] if summ.get("elapsed_s") else None
    rec["wait_fraction"] = summ.get("wait_s", 0.0) / summ["elapsed_s"] if summ.get("elapsed_s") else None
    m_rate = n / float(np.median(t.mod_times[i]))
    d_rate = out["decode_only"]["crops_per_s"]
    rec["model_only_crops_per_s"] = m_rate
    rec["bound_crops_per_s"] = 1.0 / (1.0 / m_rate + 1.0 / d_rate)
    rec["fraction_of_bound"] = rec["crops_per_s"] / rec["bound_crops_per_s"]
    ref = t.ref
    if ref is not None:
        thr = eng.threshold
        diff = np.abs(probs - ref.probs)
        rec["ratio_vs_reference"] = rec["crops_per_s"] / out["reference"]["crops_per_s"]
        rec["labels_identical"] = bool(np.all((probs >= thr) == (ref.probs >= thr)))
        rec["label_agreement"] = float(np.mean((probs >= thr) == (ref.probs >= thr)))
        rec["max_abs_dp"] = float(np.nanmax(diff))
        rec["mean_abs_dp"] = float(np.nanmean(diff))
        if eng.precision == "fp32":
            rec["check"] = ("pass" if rec["labels_identical"] and rec["max_abs_dp"] <= FP32_E2E_TOL else "FAIL") + \
                f" (fp32: labels identical and max |Δp| <= {FP32_E2E_TOL:g})"
        else:
            rec["check"] = f"not checked ({eng.precision}: reported only; see ami-bench parity)"
    return rec
