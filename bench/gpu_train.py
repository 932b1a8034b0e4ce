"""Training steps of ``ami-bench gpu-check``: for each Table-3 configuration, ami-train's own step
(the loop), the same network's bare step beside it, the loop's step split into host and device
time, and the GPU hours they imply.

* **loop step** - :class:`ami.train.loop.TrainStep` (the recipe's augmentation, loss, optimiser,
  mixed precision; no EMA or schedule) on a batch gathered from crops held in memory, as
  ``ami-train`` holds them; linear: one embedding batch of the frozen backbone;
* **host** - the part of that step before the GPU computes: the gather from the crops in memory,
  the augmentation (CPU) and the copy to the device, timed alone with the same calls; **device** =
  loop step - host (forward, backward, optimiser step and what the loop adds around them);
* **bare step** - the floor of one step: the registry's timm network of the same architecture
  and size, random init, inputs already on the device, no augmentation or loader, bf16 autocast
  on CUDA, AdamW; LoRA through PEFT on the scripts' targets (qkv, proj, fc1, fc2, the patch
  embedding included); linear: a no_grad forward. ``loop_overhead`` = loop step / bare step.

The CPU rehearsal runs the same code on tiny stand-ins in float32 (not a measurement).
"""

from __future__ import annotations

import math
import time
import traceback

from .gpu_env import short_error

TRAIN_STEPS, TRAIN_BATCH, WARMUP_STEPS = 20, 8, 3
EVAL_BATCH = 128  # ami.train.fit.predict's batch
AMP = "bf16"  # the precision docs/reproduce.md's 17 commands use (--amp bf16)
# The work of one fold (docs/reproduce.md section 3): 2 312 training crops = 289 steps of 8, 579
# validation crops, a final evaluation of 579 + 3 679 test crops; linear probes embed all 6 573 crops once.
STEPS_PER_EPOCH, VAL_CROPS, FINAL_EVAL_CROPS, ALL_CROPS, EPOCHS, FOLDS = 289, 579, 579 + 3679, 6573, 100, 5
POOL_BATCHES = 4  # crops in memory to gather each batch from: POOL_BATCHES x the batch
BARE_LORA_TARGETS = ["qkv", "proj", "fc1", "fc2"]  # the paper's scripts' LoRA targets (suffixes)
BARE_LR = 5e-5


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def warmup_steps(tiny: bool) -> int:
    """Untimed calls before each timing: one in the CPU rehearsal (it proves the code, it measures nothing)."""
    return 1 if tiny else WARMUP_STEPS


def _timed(fn, steps: int, dev, warmup: int) -> list[float]:
    """``warmup`` untimed calls, then the seconds of each of ``steps`` calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
        _sync(dev)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return times


def _median(times: list[float]) -> float:
    import numpy as np

    return float(np.median(times))


def _free(dev) -> None:
    import gc

    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def train_steps(model_name: str, method: str, dev, *, steps: int, batch: int, tiny: bool, amp: str) -> dict:
    """The loop step (median, p90), its host and device parts, the evaluation batch and the bare
    step of one configuration; see the module docstring."""
    import torch

    from ami.train.registry import get

    cfg = get(model_name)
    if dev.type == "cuda":
        _free(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    rec = _loop_step(cfg, method, dev, steps=steps, batch=batch, tiny=tiny, amp=amp)
    rec["model"] = model_name
    if dev.type == "cuda":
        rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    _free(dev)
    rec.update(bare_step(cfg, method, dev, steps=steps, batch=batch, tiny=tiny, amp=amp))
    rec.update(step_split(rec))
    _free(dev)
    return rec


def _build_loop_model(cfg, method: str, dev, tiny: bool):
    import torch

    from ami.train.models import create

    r = cfg.recipe_for(method)
    lora = {k: getattr(r, k) for k in ("lora_rank", "lora_alpha", "lora_dropout")} if method == "lora" else {}
    with torch.device(dev):  # random init on the device itself: seconds, not minutes, for a 1.1 B ViT-g
        model = create(cfg, method, random_init=True, tiny=tiny, drop_rate=r.drop_rate, drop_path_rate=r.drop_path_rate,
                       **lora)
    return model.to(dev)


def _loop_step(cfg, method: str, dev, *, steps: int, batch: int, tiny: bool, amp: str) -> dict:
    """ami-train's step on batches gathered from crops in memory; the host part timed alone; the
    evaluation batch of fit.predict."""
    import numpy as np
    import torch

    from ami.export.synthetic import synthetic_crops
    from ami.train import data as D
    from ami.train.loop import TrainStep, autocast, grad_scaler, make_optimizer
    from ami.train.models import count_params

    r, pre = cfg.recipe_for(method), cfg.preprocess
    t0 = time.perf_counter()
    model = _build_loop_model(cfg, method, dev, tiny)
    build_s = time.perf_counter() - t0
    use_amp = amp in ("bf16", "fp16") and (dev.type == "cuda" or amp == "bf16")
    pool = torch.from_numpy(synthetic_crops(POOL_BATCHES * batch, pre.input_size, seed=3))
    labels = torch.tensor([i % 2 for i in range(len(pool))], dtype=torch.float32)
    pick = torch.Generator().manual_seed(1)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], r)
    train_step = TrainStep(model, opt, r, pre, r.policy(), dev, amp, torch.Generator().manual_seed(0),
                           scaler=grad_scaler(dev, amp))
    g_host = torch.Generator().manual_seed(0)

    def indices():
        return torch.randint(0, len(pool), (batch,), generator=pick)

    def step():
        idx = indices()
        if method == "linear":  # the frozen backbone's GPU work: embeddings of evaluation tensors
            model.eval()
            with torch.no_grad(), autocast(dev, amp):
                model(D.eval_batch(pool[idx], pre).to(dev))
        else:
            model.train()
            train_step(pool[idx], labels[idx].to(dev))

    def host():  # the same calls as the step's first lines: gather, augment (CPU), copy
        idx = indices()
        x = D.eval_batch(pool[idx], pre) if method == "linear" else D.augment(pool[idx], pre, r.policy(), g_host)
        if dev.type == "cpu" and method != "linear":
            x = x.contiguous(memory_format=torch.channels_last)
        x.to(dev, non_blocking=True)
        labels[idx].to(dev)

    times = _timed(step, steps, dev, warmup_steps(tiny))
    host_times = _timed(host, steps, dev, warmup_steps(tiny))
    eb = min(EVAL_BATCH, 16) if tiny else EVAL_BATCH
    xe = torch.from_numpy(synthetic_crops(eb, pre.input_size, seed=4))
    model.eval()

    def evaluate():
        with torch.no_grad(), autocast(dev, amp):
            model(D.eval_batch(xe, pre).to(dev))

    etimes = _timed(evaluate, 2, dev, warmup_steps(tiny))
    return {"model": cfg.name, "method": method, "arch": cfg.arch, "display": cfg.display,
            "params_trainable": count_params(model, True), "params": count_params(model),
            "build_s": round(build_s, 2), "steps": steps, "batch": batch, "amp": amp if use_amp else "none",
            "step_s_median": _median(times), "step_s_p90": float(np.percentile(times, 90)),
            "step_s_all": [round(t, 5) for t in times], "host_s_median": _median(host_times),
            "eval_batch": eb, "eval_batch_s": _median(etimes),
            "what": "embedding batch (no_grad forward of the frozen backbone)" if method == "linear"
            else "gather + augment (CPU) + copy + forward/backward + optimizer step"}


def _bare_network(cfg, method: str, dev, *, tiny: bool):
    """The registry's timm network, random init, on ``dev``; LoRA: PEFT on the scripts' targets."""
    import torch

    from ami.train.models import build_backbone

    with torch.device(dev):
        net = build_backbone(cfg, tiny=tiny)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        r = cfg.recipe_for(method)
        net = get_peft_model(net, LoraConfig(r=r.lora_rank, lora_alpha=r.lora_alpha, lora_dropout=r.lora_dropout,
                                             target_modules=BARE_LORA_TARGETS, modules_to_save=["head"]))
    elif method == "linear":
        net.requires_grad_(False)
    return net.to(dev)


def bare_step(cfg, method: str, dev, *, steps: int, batch: int, tiny: bool, amp: str) -> dict:
    """The floor of one step of this configuration (module docstring): median seconds."""
    import torch
    import torch.nn.functional as F

    net = _bare_network(cfg, method, dev, tiny=tiny)
    size = cfg.preprocess.input_size
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.tensor([i % 2 for i in range(batch)], dtype=torch.float32, device=dev)
    auto = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    if method == "linear":
        net.eval()

        def step():
            with torch.no_grad(), auto:
                net(x)
    else:
        net.train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=BARE_LR)

        def step():
            with auto:
                loss = F.binary_cross_entropy_with_logits(net(x).float().squeeze(1), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    times = _timed(step, steps, dev, warmup_steps(tiny))
    return {"bare_step_s_median": _median(times), "bare_what": (
        "no_grad forward" if method == "linear" else
        f"forward/backward + AdamW, inputs on the device{', PEFT LoRA on ' + '/'.join(BARE_LORA_TARGETS) if method == 'lora' else ''}")
        + (", bf16 autocast" if amp == "bf16" else ", float32")}


def step_split(rec: dict) -> dict:
    """Host and device parts of the loop step and the loop's overhead over the bare step."""
    step, host, bare = rec["step_s_median"], rec["host_s_median"], rec["bare_step_s_median"]
    return {"device_s_median": step - host, "host_fraction": host / step if step > 0 else None,
            "loop_overhead": step / bare if bare > 0 else None}


def projections(rec: dict) -> dict:
    """GPU time of one fold / five folds implied by the measured step (docs/reproduce.md section 3's work)."""
    s, e = rec["step_s_median"], rec["eval_batch_s"]
    eb = rec["eval_batch"]
    if rec["method"] == "linear":
        emb = math.ceil(ALL_CROPS / rec["batch"]) * s
        return {"embeddings_once_s": emb, "five_folds_s": emb}
    epoch = STEPS_PER_EPOCH * s + math.ceil(VAL_CROPS / eb) * e
    fold = EPOCHS * epoch + math.ceil(FINAL_EVAL_CROPS / eb) * e
    return {"epoch_s": epoch, "fold_100_epochs_s": fold, "five_folds_s": FOLDS * fold}


def training_section(device: str, deadline, *, models: list[tuple[str, str]] | None, steps: int,
                     tiny: bool, log) -> dict:
    """Every configuration's row (or the reason it has none); ``deadline.left()``: seconds left."""
    import torch

    from ami.train.registry import table3_configs

    if device == "cuda" and not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA GPU (torch.cuda.is_available() is False)"}
    dev = torch.device(device)
    if dev.type == "cuda":  # PyTorch's defaults, what ami-train runs (the latency part changed them)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False
    rows, failed = [], []
    for name, method in models or table3_configs():
        if deadline.left() < 15:
            rows.append({"model": name, "method": method, "status": "skipped",
                         "reason": "time budget of the check used up (rerun with --only training_steps)"})
            continue
        log(f"gpu-check: training steps {name}/{method} ({'tiny stand-in, ' if tiny else ''}{device})")
        try:
            # the CPU rehearsal runs float32: bf16 autocast is emulated (and very slow) on most CPUs
            rec = train_steps(name, method, dev, steps=steps, batch=TRAIN_BATCH, tiny=tiny,
                              amp=AMP if dev.type == "cuda" else "none")
            rec.update(projections(rec), status="pass")
        except Exception as e:  # one architecture failing must not hide the others
            rec = {"model": name, "method": method, "status": "fail", "error": short_error(e),
                   "trace": traceback.format_exc(limit=3)}
            failed.append(f"{name}/{method}")
            _free(dev)
        rows.append(rec)
    out = {"status": "fail" if failed else "pass", "rows": rows, "tiny_stand_ins": tiny, "device": device,
           "amp": AMP if dev.type == "cuda" else "none", "steps": steps, "warmup": warmup_steps(tiny), "batch": TRAIN_BATCH}
    if failed:
        out["failed"] = failed
    return out
