"""ami-bench gpu-check: one prepared device check for a GPU workstation (at most ~7 minutes).

It writes ``DIR/gpu-check.md`` and ``DIR/gpu-check.json`` (plus the latency tables it ran) with,
in this order:

1. **environment** - NVIDIA driver and the CUDA version it supports, GPU name, compute capability
   and memory; torch (and its CUDA / cuDNN), TensorRT, cuda-python, ONNX Runtime, timm, PEFT, onnx
   versions; the ONNX Runtime providers that *really* load (a session is created with each listed
   one and asked what it runs on), whether TensorRT's library loads, and which ``ami-mitosis[trt-cuXX]``
   extra fits the driver (:mod:`ami.bench.gpu_env`);
2. **PyTorch eager on CUDA** - the path of ``ami-bench latency``'s CUDA rows (uint8 batch to the
   GPU, ``ami.train.data.eval_batch`` there, network, sigmoid) on a tiny generated model, against
   ONNX Runtime on the CPU;
3. **TensorRT round trip** - ``build_engine`` on a tiny generated ami model at fp32 and fp16, the
   plan run at batches 1, 3, 16 and 37 against ONNX Runtime on the CPU, then the timing cache
   reused by a second build and a corrupted one treated as absent by a third;
4. **ami-bench latency** on the shipped model, with the PyTorch CUDA rows (model-only);
5. **end to end** - when crops are given (``--data-root``, or ``--crops DIR``: a small folder of
   crops carried to the box), ``ami-infer``'s pipeline on them with the shipped model, against
   the box's decode bound (the decode stage alone on the same cores);
6. **training steps** - for each of the 17 Table-3 configurations (random initialisation: speed
   only needs the shape), 20 timed steps at batch 8 in the documented precision (``--amp bf16``)
   of ami-train's loop, split into host and device time, beside the bare step of the same network
   (the loop's overhead as a ratio), and the GPU hours they imply (:mod:`ami.bench.gpu_train`).

Every part that cannot run here is *skipped with its reason* (no CUDA GPU, TensorRT not installed,
no crops, out of time budget); a failed part is reported and the command exits 1. ``--device cpu``
runs the same code on the CPU with tiny stand-ins (a rehearsal that proves the check works, not a
measurement).

Installed: ``ami-bench gpu-check --out DIR`` (or ``python -m ami.bench.gpu_check --out DIR``). From a
checkout that is not installed at all (copied to a GPU box): ``python bench/gpu_check.py --out DIR``
- run as a file, it imports ``ami`` from the checkout it sits in, nothing else needed.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

SCHEMA = "ami-bench-gpu-check/1"
BUDGET_S = 400.0  # the whole check; each part gets what is left
E2E_CROPS = 512  # crops of the end-to-end part (class-stratified sample of a test set, or a folder's first ones)
NO_GPU = ("no CUDA GPU on this machine (torch.cuda.is_available() is False); rerun on a GPU box, or --device cpu "
          "for a CPU rehearsal")


class Deadline:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


# -- 4. ami-bench latency -------------------------------------------------------------------------

def latency(out_dir: Path, device: str, data_root, log, rehearsal: bool) -> dict:
    import torch

    from ami.bench.latency import run_latency

    if device == "cuda" and not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA GPU (torch.cuda.is_available() is False)"}
    kw = dict(batches=(1, 8, 32, 128), seconds=0.5, min_rounds=5, warmup=2, e2e=False, peak_reps=3)
    if rehearsal:
        kw = dict(batches=(1,), rounds=1, warmup=0, e2e=False, peak_n=64, peak_reps=1)
    rep = run_latency(None, data_root=data_root, show_progress=False, log=log, **kw)
    (out_dir / "latency.json").write_text(rep.to_json())
    (out_dir / "latency.md").write_text(rep.to_markdown())
    cuda_rows = [r for r in rep.rows if r.device == "cuda" and r.engine == "PyTorch eager"]
    res = {"rows": len(rep.rows), "cuda_rows": len([r for r in rep.rows if r.device == "cuda"]),
           "pytorch_cuda_rows": [{"batch": r.batch, "p50_ms": r.stats["p50_ms"], "crops_per_s": r.stats["crops_per_s"]}
                                 for r in cuda_rows],
           "skipped": rep.skipped, "files": ["latency.json", "latency.md"], "seconds": round(rep.seconds, 1),
           "markdown": rep.to_markdown()}
    if device == "cuda":
        res["status"] = "pass" if cuda_rows else "fail"
        if not cuda_rows:
            res["reason"] = "no PyTorch CUDA rows: " + "; ".join(f"{s['engine']}: {s['reason']}" for s in rep.skipped)
    else:
        res["status"] = "pass" if rep.rows else "fail"
    return res


# -- 5. end to end --------------------------------------------------------------------------------

E2E_KEYS = ("engine", "model", "precision", "provider", "crops", "seconds", "crops_per_s", "model_only_crops_per_s",
            "bound_crops_per_s", "fraction_of_bound", "engine_fraction", "wait_fraction", "workers", "batch")


def end_to_end(data_root, crops: Path | None, n: int, log, rehearsal: bool) -> dict:
    """ami-infer on real crops with the shipped fp32 model (ONNX Runtime, and the engine ``--engine
    auto`` picks here when another), against the decode bound of this box's cores."""
    from ami.bench.common import SHIPPED_ENGINES, BenchError, load_variants
    from ami.bench.e2e import e2e_crops, e2e_engines
    from ami.bench.e2e import end_to_end as run_e2e

    if data_root is None and crops is None:
        return {"status": "skipped", "reason": "no crops given: pass --data-root D, or --crops DIR (a folder of crops "
                                               "carried with the checkout)"}
    try:
        paths, source = e2e_crops(Path(data_root) if data_root else None, crops, n)
    except BenchError as e:
        return {"status": "skipped", "reason": str(e)}
    batch, rounds = (16, 1) if rehearsal else (64, 2)
    engines, notes = load_variants(SHIPPED_ENGINES[:1], provider="auto")
    out = run_e2e(paths, source, e2e_engines(engines), None, engines[0].meta.preprocess, "", batch=batch, workers=0,
                  threads=os.cpu_count() or 1, rounds=rounds, log=log)
    rows = [{k: r.get(k) for k in E2E_KEYS} for r in out["ami_infer"]]
    return {"status": "pass" if rows else "fail", "source": source, "crops": len(paths), "batch": batch,
            "workers": out["workers"], "rounds": rounds, "cores": os.cpu_count(),
            "decode_crops_per_s": out["decode_only"]["crops_per_s"], "decode_what": out["decode_only"]["what"],
            "rows": rows, "notes": notes}


# -- the check ------------------------------------------------------------------------------------

def _devices(device: str) -> tuple[str, bool, str]:
    """(device after ``auto``, whether torch sees a GPU, the machine in words)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    if has_cuda:
        machine += f", {torch.cuda.get_device_name(0)}"
    return ("cuda" if has_cuda else "none") if device == "auto" else device, has_cuda, machine


def _run_part(key: str, ctx: dict) -> dict:
    from ami.bench import gpu_env, gpu_train

    rehearsal, gpu_dev, log = ctx["rehearsal"], ctx["gpu_dev"], ctx["log"]
    if key == "environment":
        return {"status": "info", "data": gpu_env.environment(ctx["work"], ctx["device"])}
    if key == "pytorch_cuda":
        return gpu_env.pytorch_cuda(ctx["work"], gpu_dev)
    if key == "tensorrt_round_trip":
        return gpu_env.tensorrt_round_trip(ctx["work"], gpu_dev, log)
    if key == "latency":
        return latency(ctx["out_dir"], gpu_dev, ctx["data_root"], log, rehearsal)
    if key == "end_to_end":
        return end_to_end(ctx["data_root"], ctx["crops"], ctx["e2e_crops"], log, rehearsal)
    return gpu_train.training_section(gpu_dev, ctx["deadline"], models=ctx["models"],
                                      steps=2 if rehearsal else ctx["steps"], tiny=rehearsal, log=log)


def _skip_reason(key: str, ctx: dict) -> str | None:
    from ami.bench.gpu_env import trt_reason

    if ctx["only"] and key not in ctx["only"]:
        return "not selected (--only)"
    if key != "environment" and ctx["device"] == "none":
        return NO_GPU + (f"; {trt_reason()}" if key == "tensorrt_round_trip" else "")
    if key != "environment" and ctx["deadline"].left() < 10:
        return f"time budget ({ctx['deadline'].seconds:.0f} s) used up"
    return None


def run_check(out: str | Path, *, device: str = "auto", budget_s: float = BUDGET_S, only: list[str] | None = None,
              models: list[tuple[str, str]] | None = None, steps: int | None = None, data_root=None,
              crops: str | Path | None = None, e2e_crops: int = E2E_CROPS,
              log=lambda s: print(s, file=sys.stderr)) -> dict:
    """Every part in order (each one skipped with its reason, or run and its failure recorded); writes
    ``gpu-check.json`` and ``gpu-check.md`` under ``out`` and returns the record."""
    import json

    from ami.bench.gpu_report import SECTIONS, TITLES, to_markdown
    from ami.bench.gpu_train import TRAIN_STEPS

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, _, machine = _devices(device)
    rehearsal = device == "cpu"
    steps = TRAIN_STEPS if steps is None else steps
    rep: dict = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device,
                 "rehearsal": rehearsal, "budget_s": budget_s, "machine": machine,
                 "settings": {"only": only, "models": models, "steps": steps, "crops_given": crops is not None
                              or data_root is not None, "e2e_crops": e2e_crops}, "sections": {}}
    ctx = {"device": device, "rehearsal": rehearsal, "gpu_dev": "cpu" if rehearsal else "cuda", "log": log,
           "out_dir": out_dir, "data_root": data_root, "crops": Path(crops) if crops else None, "e2e_crops": e2e_crops,
           "models": models, "steps": steps, "only": only, "deadline": Deadline(budget_s)}
    with tempfile.TemporaryDirectory(prefix="ami-gpu-check-") as tmp:
        ctx["work"] = Path(tmp)
        for key in SECTIONS:
            why = _skip_reason(key, ctx)
            if why is not None:
                rep["sections"][key] = {"status": "skipped", "reason": why}
                continue
            log(f"gpu-check: {TITLES[key]}")
            t0 = time.perf_counter()
            try:
                sec = _run_part(key, ctx)
            except Exception as e:  # a part that crashes is a failed part, the rest still runs
                from ami.bench.gpu_env import short_error

                sec = {"status": "fail", "error": short_error(e), "trace": traceback.format_exc(limit=6)}
            sec["seconds"] = round(time.perf_counter() - t0, 2)
            rep["sections"][key] = sec
    rep["seconds"] = round(budget_s - ctx["deadline"].left(), 1)
    rep["status"] = "fail" if any(s["status"] == "fail" for s in rep["sections"].values()) else "pass"
    (out_dir / "gpu-check.json").write_text(json.dumps(rep, indent=1, ensure_ascii=False, default=str) + "\n")
    (out_dir / "gpu-check.md").write_text(to_markdown(rep))
    return rep


def parse_models(text: str | None) -> list[tuple[str, str]] | None:
    """'uni:lora,edge:full' -> [(uni, lora), (edge, full)]; None/'' -> the 17 Table-3 configurations."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        name, _, method = part.strip().partition(":")
        out.append((name, method or "full"))
    return out


# -- command line (Typer, as every ami tool) ------------------------------------------------------

EPILOG = """Examples:

\b
  ami-bench gpu-check --out results/gpu-check            # on a GPU box: at most ~7 minutes
  ami-bench gpu-check --out results/gpu-check --crops my-crops/   # with the end-to-end ami-infer row
  python bench/gpu_check.py --out results/gpu-check      # the same from a checkout that is not installed
  ami-bench gpu-check --out rehearsal/ --device cpu --models efficientnetv2_m:full,uni:lora

Writes DIR/gpu-check.md and DIR/gpu-check.json (and DIR/latency.{json,md}); exit code 1 when a part
failed, 0 when every part passed or was skipped with its reason."""

DEVICES = ("auto", "cuda", "cpu")


def register(app) -> None:
    import typer

    from ami.bench.gpu_report import SECTIONS
    from ami.bench.gpu_train import TRAIN_STEPS

    @app.command("gpu-check", epilog=EPILOG)
    def gpu_check_cmd(
        out: Path = typer.Option(..., "--out", "-o", help="Folder for gpu-check.md and gpu-check.json."),
        device: str = typer.Option("auto", "--device", help="auto (the GPU when there is one; else every GPU part is "
                                   "skipped with its reason) | cuda | cpu (a rehearsal with tiny stand-ins)."),
        budget: float = typer.Option(BUDGET_S, "--budget", help="Seconds for the whole check (each part gets what is left)."),
        only: str = typer.Option("", "--only", help=f"Comma-separated parts: {', '.join(SECTIONS)}."),
        models: str = typer.Option("", "--models", help="MODEL:METHOD,... instead of the 17 Table-3 configurations."),
        steps: int = typer.Option(TRAIN_STEPS, "--steps", help="Timed training steps per configuration."),
        data_root: Path | None = typer.Option(None, "--data-root", help="Datasets folder: real crops for the latency "
                                              "part and the end-to-end part."),
        crops: Path | None = typer.Option(None, "--crops", help="A folder of crops for the end-to-end part (instead "
                                          "of a data root: a small set carried to the GPU box)."),
        e2e_crops: int = typer.Option(E2E_CROPS, "--e2e-crops", help="Crops in the end-to-end part."),
    ):
        """One prepared device check: environment, PyTorch on CUDA, TensorRT round trip, latency, end to end,
        training steps against bare steps."""
        if device not in DEVICES:
            raise typer.BadParameter(f"--device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}")
        picked = [s for s in only.split(",") if s]
        unknown = [s for s in picked if s not in SECTIONS]
        if unknown:
            raise typer.BadParameter(f"--only: unknown part(s) {', '.join(unknown)}; parts: {', '.join(SECTIONS)}")
        rep = run_check(out, device=device, budget_s=budget, only=picked or None, models=parse_models(models),
                        steps=steps, data_root=data_root, crops=crops, e2e_crops=e2e_crops)
        typer.echo(f"gpu-check: {rep['status']} in {rep['seconds']:.0f} s; wrote {out / 'gpu-check.md'} and "
                   f"{out / 'gpu-check.json'}", err=True)
        for k, s in rep["sections"].items():
            why = s.get("reason") or s.get("error")
            typer.echo(f"  {k}: {s['status']}" + (f" - {why}" if why else ""), err=True)
        raise typer.Exit(1 if rep["status"] == "fail" else 0)


def main(argv: list[str] | None = None) -> int:
    """``gpu-check`` as a program of its own (``python -m`` or ``python bench/gpu_check.py``): its exit code."""
    import typer

    app = typer.Typer(add_completion=False, rich_markup_mode=None)
    register(app)
    try:  # standalone: usage errors print their message; every way out is a SystemExit with the code
        typer.main.get_command(app).main(args=argv, prog_name="gpu_check")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def use_this_checkout() -> None:
    """Run as a file of a checkout (``python bench/gpu_check.py``): ``import ami.X`` loads this
    checkout's ``X/`` folder (the package's layout: ``ami.runtime`` is ``runtime/``, ...), installed
    or not, by registering an ``ami`` namespace package whose search path is the checkout's root.
    The script's own folder leaves ``sys.path`` (its modules are ``ami.bench``'s, not top-level ones)."""
    import importlib.machinery
    import importlib.util

    here = Path(__file__).resolve()
    if sys.path and Path(sys.path[0] or ".").resolve() == here.parent:
        sys.path.pop(0)
    spec = importlib.machinery.ModuleSpec("ami", None, is_package=True)
    spec.submodule_search_locations = [str(here.parents[1])]
    sys.modules["ami"] = importlib.util.module_from_spec(spec)


if __name__ == "__main__":
    if __spec__ is None:  # run as a file, not with -m: this checkout's code
        use_this_checkout()
    sys.exit(main())
