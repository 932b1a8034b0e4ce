"""The latency report: one :class:`Row` per (engine, batch), the measured peaks, the skipped engines
and the end-to-end table; JSON and Markdown."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

SCHEMA = "ami-bench-latency/1"


@dataclass
class Row:
    engine: str
    precision: str
    device: str
    provider: str
    model: str
    batch: int
    stats: dict
    flops_per_crop: float | None
    flops_source: str
    achieved_gflops: float | None
    peak_fraction: float | None
    peak_ref: str
    notes: str = ""


@dataclass
class LatencyReport:
    machine: dict
    settings: dict
    peaks: dict = field(default_factory=dict)  # "cpu_float32" / "cuda_float32" / "cuda_float16" -> peak_gflops()
    rows: list[Row] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"engine", "reason"}
    end_to_end: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": self.machine,
                "settings": self.settings, "peaks": self.peaks, "rows": [asdict(r) for r in self.rows],
                "skipped": self.skipped, "end_to_end": self.end_to_end, "notes": self.notes,
                "seconds": round(self.seconds, 1)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        """The model-only table, the end-to-end table, the notes and the versions."""
        m = self.machine
        lines = self._markdown_model_only() + self._markdown_end_to_end()
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        lines += ["", "Versions: " + ", ".join(f"{k} {m[k]}" for k in ("python", "numpy", "torch", "onnxruntime",
                                                                       "openvino", "tensorrt") if m.get(k))
                  + f". Load average at start: {m.get('load_average', '?')}. Total {self.seconds:.0f} s."]
        return "\n".join(lines) + "\n"

    def _markdown_model_only(self) -> list[str]:
        """The measured peaks, the settings, one table row per (engine, batch) and per skipped
        engine, and how FLOPs and % of peak are counted."""
        m = self.machine
        gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
        lines = [f"## Model-only latency and throughput - {m.get('cpu', '?')} ({m.get('cores', '?')} cores{gpu})", ""]
        for k, p in self.peaks.items():
            unit = "GOP/s" if p.get("dtype") == "int8" else "GFLOP/s"
            lines.append(f"Measured peak ({k.replace('_', ' ')}): **{p['gflops']:.1f} {unit}** ({p['what']}"
                         + (f", threads {p['threads']}" if p.get("threads") else "") + ").")
        s = self.settings
        lines += ["", f"Threads: {s.get('threads')}; warm-up rounds excluded; timed rounds per cell: "
                      f"{'exactly ' + str(s['rounds']) if s.get('rounds') else 'about ' + str(s.get('seconds')) + ' s worth (at least ' + str(s.get('min_rounds')) + ')'}; "
                      "pixels are uint8 crops already in memory.", ""]
        head = ["engine", "precision", "device", "model", "batch", "p50 ms", "p95 ms", "p99 ms", "crops/s",
                "MFLOP/crop", "GFLOP/s", "% of peak", "rounds"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += [_model_only_md_row(r) for r in self.rows]
        for sk in self.skipped:
            lines.append("| " + " | ".join([sk["engine"], "-", "-", f"skipped: {sk['reason']}"] + ["-"] * (len(head) - 4))
                         + " |")
        srcs = sorted({r.flops_source for r in self.rows if r.flops_source})
        if srcs:
            lines += ["", f"FLOPs per crop: {'; '.join(srcs)} (2 x multiply-adds of convolutions and matrix products). "
                          "% of peak = achieved GFLOP/s / the measured matrix-product peak of the row's own precision on "
                          "the same device (fp32 rows: float32 GEMM; bf16 rows: bf16 GEMM; int8 rows: u8*s8 GEMM, "
                          "integer ops counted like FLOPs; layers an int8 artefact keeps in float are counted in too)."]
            over = [r for r in self.rows if r.peak_fraction and r.peak_fraction > 1.0]
            if over:
                lines += ["", f"WARNING: {len(over)} row(s) exceed 100% of their own-precision peak: the peak "
                              "measurement under-read (a busy machine during the GEMM timings); the rows' crops/s "
                              "stand, their % of peak does not."]
        return lines

    def _markdown_end_to_end(self) -> list[str]:
        """The end-to-end table (ami-infer per engine, then the reference loop) and the stages alone."""
        e = self.end_to_end
        if not e:
            return []
        rr = e.get("rounds", 1)
        lines = ["", f"## End-to-end (decode + preprocess + infer) - {e.get('crops', '?')} crops of {e.get('source', '?')}",
                 "", "Wall time of the whole loop (files -> probabilities), after one untimed warm-up batch; "
                 + (f"median of {rr} interleaved rounds." if rr > 1 else "one timed round."), ""]
        if e.get("skipped"):
            return lines + [f"skipped: {e['skipped']}"]
        h = ["pipeline", "engine", "model", "crops", "seconds", "crops/s", "vs reference", "labels identical",
             "max \\|Δp\\|", "engine / waiting for decode", "% of bound"]
        lines += ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        lines += [_e2e_md_row(run) for run in e.get("ami_infer", [])]
        ref = e.get("reference")
        if ref:
            lines.append("| " + " | ".join([
                f"reference loop (PIL + torchvision + DataLoader, {ref['workers']} workers, batch {ref['batch']})",
                "PyTorch eager", f"{ref['model']} (fp32)", str(ref["crops"]), f"{ref['seconds']:.2f}",
                f"{ref['crops_per_s']:.0f}", "1.00x", "-", "-", "-", "-"]) + " |")
        elif e.get("reference_skipped"):
            lines.append(f"| reference loop | skipped: {e['reference_skipped']} |" + " |" * (len(h) - 2))
        dec = e.get("decode_only")
        if dec:
            lines += ["", f"Stages alone, same rounds: decoding {dec['crops_per_s']:.0f} crops/s ({dec['what']}); "
                      + "; ".join(f"{r.get('engine', '?')} {r['model']} ({r['precision']}) "
                                  f"{r['model_only_crops_per_s']:.0f} crops/s" for r in e.get("ami_infer", [])
                                  if r.get("model_only_crops_per_s"))
                      + ". Bound = 1 / (1/model-only + 1/decode-only): both stages share the same cores. "
                      "\"engine / waiting for decode\": the share of ami-infer's wall time spent inside the "
                      "engine, and waiting for decoded batches (decoding is then the bottleneck)."]
        return lines


def _model_only_md_row(r: Row) -> str:
    """One (engine, batch) row of the model-only table."""
    st = r.stats
    return "| " + " | ".join([
        r.engine, r.precision, r.device, r.model, str(r.batch), f"{st['p50_ms']:.2f}", f"{st['p95_ms']:.2f}",
        f"{st['p99_ms']:.2f}", f"{st['crops_per_s']:.0f}",
        "n/a" if r.flops_per_crop is None else f"{r.flops_per_crop / 1e6:.1f}",
        "n/a" if r.achieved_gflops is None else f"{r.achieved_gflops:.1f}",
        "n/a" if r.peak_fraction is None else f"{100 * r.peak_fraction:.1f}%", str(st["rounds"])]) + " |"


def _e2e_md_row(run: dict) -> str:
    """One ami-infer row of the end-to-end table."""
    split = (f"{100 * run['engine_fraction']:.0f}% / {100 * run['wait_fraction']:.0f}%"
             if run.get("engine_fraction") is not None else "n/a")
    bound = (f"{100 * run['fraction_of_bound']:.0f}% of {run['bound_crops_per_s']:.0f}"
             if run.get("bound_crops_per_s") else "n/a")
    labels = ({True: "yes", False: "NO"}.get(run.get("labels_identical"), "n/a") if run["precision"] == "fp32"
              else f"{100 * run['label_agreement']:.1f}% agree (not checked)" if "label_agreement" in run
              else "n/a")
    return "| " + " | ".join([
        f"ami-infer ({run['workers']} {run['pool']} workers, batch {run['batch']})",
        run.get("engine", "ONNX Runtime"),
        f"{run['model']} ({run['precision']})", str(run["crops"]), f"{run['seconds']:.2f}",
        f"{run['crops_per_s']:.0f}", f"{run['ratio_vs_reference']:.2f}x" if run.get("ratio_vs_reference") else "n/a",
        labels, f"{run['max_abs_dp']:.2e}" if run.get("max_abs_dp") is not None else "n/a", split, bound]) + " |"
