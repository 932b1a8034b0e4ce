"""The training loop: one fold at a time, resumable, self-describing run directories.

Run directory layout::

    RUN/config.json          resolved configuration (model entry, method, recipe, versions, ...)
    RUN/split.json           folds file sha256 + data fingerprints, checked on every (re)start
    RUN/fold{k}/state.pt     last completed epoch (model, EMA, optimiser, scheduler, RNG) - atomic
    RUN/fold{k}/history.csv  one line per epoch
    RUN/fold{k}/best.safetensors  weights of the epoch with the best validation balanced accuracy
    RUN/fold{k}/metrics.json validation + test metrics, per-crop probabilities, timings, versions
    RUN/all/...              optional: the recipe trained on all training crops (no validation)

A killed run restarted with the same command continues from the last completed epoch of the
unfinished fold; completed folds (those with metrics.json) are not retrained.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ami.runtime import __version__
from ami.runtime.datasets import (
    TEST_SETS,
    Sample,
    amibr_split,
    available_eval_sets,
    fingerprint,
)
from ami.runtime.metrics import MetricError, best_threshold, evaluate
from ami.runtime.sampling import stratified_subset
from ami.runtime.splits import FOLDS_FILE, check_against_data, folds_sha256, load_folds

from . import data as D
from .foldmodel import load_state_file
from .models import count_params, create
from .recipes import origins
from .registry import ModelConfig, Recipe, configure, definition, get, with_recipe_defaults


def versions() -> dict:
    import timm

    out = {"ami": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "timm": timm.__version__, "numpy": np.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path, metadata: dict | None = None, keys: set[str] | None = None) -> None:
    """All tensors, or with ``keys`` only those (the trained part of a linear/LoRA model, marked
    ``contents=trainable`` in the metadata; the frozen rest comes back from its weight source)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if keys is None or k in keys}
    metadata = {**(metadata or {}), **({"contents": "trainable"} if keys is not None else {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)


@dataclass
class RunSpec:
    model: str = "edge"
    method: str = "full"
    run_dir: Path = Path("runs/edge")
    data_root: Path = Path(".")
    recipe_overrides: dict = field(default_factory=dict)
    device: str = "auto"
    amp: str = "none"  # none | bf16 (CUDA, or CPU training) | fp16 (CUDA only)
    weights: str | None = None
    random_init: bool = False
    tiny: bool = False  # tiny random stand-in of the architecture (tests)
    max_train: int = 0  # >0: use a class-stratified subset of this many training crops (smoke tests)
    max_eval: int = 0  # >0: evaluate on at most this many crops per set (smoke tests)
    eval_sets: tuple[str, ...] = TEST_SETS
    threads: int = 0
    cache_dir: Path | None = None  # embedding cache of --method linear (default: $AMI_CACHE_DIR or ~/.cache/ami)

    @property
    def cfg(self) -> ModelConfig:
        """The registry entry as this configuration trains it (recipe's geometry, normalisation,
        head tokens and LoRA targets applied: ``registry.configure``)."""
        return configure(get(self.model), self.recipe)

    @property
    def recipe(self) -> Recipe:
        return get(self.model).recipe_for(self.method).override(**self.recipe_overrides)

    def resolved(self) -> dict:
        """What config.json records (without versions, device and creation time)."""
        cfg, recipe = self.cfg, self.recipe
        return {
            "model": self.model, "method": self.method, "arch": cfg.arch, "hub_id": cfg.hub_id,
            "weights_source": ("random init (from scratch: no pretrained weights)" if not cfg.pretrained
                               else "random init (--random-init: NOT the pretrained model)" if self.random_init
                               else self.weights or cfg.hub_id or cfg.weights_file),
            "random_init": self.random_init or not cfg.pretrained, "tiny_stand_in": self.tiny,
            "preprocess": asdict(cfg.preprocess), "recipe": asdict(recipe), "amp": self.amp,
            "max_train": self.max_train, "max_eval": self.max_eval, "registry_entry": cfg.to_dict(),
            # descriptive (derived from the above; not compared on resume): the training transform's
            # parameters and where each recipe value comes from
            "augmentation": {"policy": recipe.augment, **recipe.policy().to_dict()},
            "recipe_origin": origins(self.model, self.method, recipe, set(self.recipe_overrides)),
        }

    def record(self) -> dict:
        """config.json as a new run would write it, but for its creation time (``ami-train --print-config``)."""
        return {**self.resolved(), "versions": versions(), "device": str(pick_device(self.device))}


_NOT_COMPARED = ("versions", "created", "device", "augmentation", "recipe_origin")  # descriptive keys


def _comparable(conf: dict) -> dict:
    """What must match for a run directory to be resumed: the resolved configuration, with the
    registry entry reduced to its network definition. The recipe the run uses is compared in full
    (key 'recipe'); the entry's default recipe, name, display text and notes may change between
    releases without changing what the run trains (e.g. the edge default going from 60 to 100 epochs)."""
    c = with_recipe_defaults(json.loads(json.dumps({k: v for k, v in conf.items() if k not in _NOT_COMPARED})))
    if isinstance(c.get("registry_entry"), dict):
        c["registry_entry"] = definition(c["registry_entry"])
    return c


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _subset(samples: list[Sample], n: int, seed: int = 0) -> list[Sample]:
    """A class-stratified, deterministic subset (smoke tests), with at least two atypical crops."""
    return stratified_subset(samples, n, seed, min_positives=2)


class EMA:
    """Exponential moving average of weights (and a copy of buffers), with a warm-up."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        msd = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


@torch.no_grad()
def predict(model: nn.Module, crops: D.CropSet, cfg: ModelConfig, device: torch.device, batch: int = 128,
            amp: str = "none") -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(crops), batch):
        x = D.eval_batch(crops.images[i:i + batch], cfg.preprocess).to(device)
        with _autocast(device, amp):
            out.append(torch.sigmoid(model(x).float()).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _autocast(device: torch.device, amp: str, training: bool = False):
    """Autocast context. On CUDA: bf16 or fp16. On CPU: bf16 for the training step only (oneDNN
    bf16 kernels on AVX512-BF16/AMX CPUs); CPU evaluation always runs in float32, the precision of
    the exported engine, so validation-based selection sees the numbers that will ship."""
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"unknown amp mode {amp!r}: none, bf16 or fp16")
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    if device.type == "cpu" and amp == "bf16" and training:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if device.type == "cpu" and amp == "fp16":
        raise ValueError("--amp fp16 is CUDA only; on CPU use --amp bf16")
    return torch.autocast(device.type, enabled=False)


def cpu_bf16_native() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (else bf16 autocast is emulated and slow)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _loss(logits: torch.Tensor, y: torch.Tensor, r: Recipe) -> torch.Tensor:
    if r.label_smoothing:
        y = y * (1 - r.label_smoothing) + 0.5 * r.label_smoothing
    if r.loss == "bce":
        return nn.functional.binary_cross_entropy_with_logits(logits, y)
    if r.loss == "focal":
        bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        p_t = torch.exp(-bce)
        return ((1 - p_t) ** 2 * bce).mean()
    raise ValueError(f"unknown loss {r.loss!r}")


def _mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): each crop blended with a partner from the same batch,
    x = lam*x + (1-lam)*x[perm], soft target y likewise; one lam ~ Beta(alpha, alpha) per batch.
    Both draws come from the run's generator ``g``, so a resumed run replays the same mixes."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def cuda_state(scaler, device: torch.device) -> dict:
    """The parts of a CUDA run's resumable state beyond the CPU's: the fp16 GradScaler (its loss
    scale and growth tracker) and the CUDA generator (dropout, drop-path on the GPU)."""
    st = {"scaler": scaler.state_dict()} if scaler is not None else {}
    if device.type == "cuda":
        st["cuda_rng"] = torch.cuda.get_rng_state(device)
    return st


def restore_cuda_state(st: dict, scaler, device: torch.device) -> None:
    if scaler is not None and st.get("scaler"):
        scaler.load_state_dict(st["scaler"])
    if device.type == "cuda" and st.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(st["cuda_rng"], device)


def _optimizer(params, r: Recipe) -> torch.optim.Optimizer:
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
    raise ValueError(f"unknown optimizer {r.optimizer!r}")


def _metrics_or_reason(y, p, threshold=0.5) -> dict:
    try:
        return evaluate(y, p, threshold).to_dict()
    except MetricError as e:
        return {"error": str(e)}


class Run:
    """A run directory: checks/records its config and split, trains folds, resumes."""

    def __init__(self, spec: RunSpec, log=print):
        self.spec = spec
        self.log = log
        self.dir = Path(spec.run_dir)
        self.cfg = spec.cfg
        self.recipe = spec.recipe
        self.device = pick_device(spec.device)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        _autocast(self.device, spec.amp)  # reject unknown / unsupported modes before any work
        if self.device.type == "cpu" and spec.amp == "bf16" and not cpu_bf16_native():
            log("warning: this CPU has no native bf16 kernels; --amp bf16 will be emulated and slower than fp32")

    # -- run-level records -----------------------------------------------------------------
    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        resolved = self.spec.resolved()
        cpath = self.dir / "config.json"
        if cpath.exists():
            old = json.loads(cpath.read_text())
            old_cmp, new_cmp = _comparable(old), _comparable(resolved)
            if old_cmp != new_cmp:
                diff = sorted(k for k in set(old_cmp) | set(new_cmp) if old_cmp.get(k) != new_cmp.get(k))
                raise SystemExit(f"{self.dir} holds a run with a different configuration (differs in: {', '.join(diff)}); "
                                 "use another --out directory")
        else:
            atomic_write_json(cpath, {**self.spec.record(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        # split check: the pinned folds file against the data, every (re)start
        rows = load_folds(FOLDS_FILE)
        self.train_all, self.amibr_test = amibr_split(self.spec.data_root)
        check_against_data(rows, self.train_all)
        self.fold_of = {r.image: r.fold for r in rows}
        split = {"folds_file": FOLDS_FILE.name, "folds_sha256": folds_sha256(FOLDS_FILE)}
        spath = self.dir / "split.json"
        if spath.exists():
            old = json.loads(spath.read_text())
            if old["folds_sha256"] != split["folds_sha256"]:
                raise SystemExit(f"{self.dir} was trained on folds {old['folds_sha256'][:12]}, "
                                 f"the current folds file is {split['folds_sha256'][:12]}")
        else:
            split["train_fingerprint"] = fingerprint(self.train_all)
            atomic_write_json(spath, split)
        self.split = json.loads(spath.read_text()) if spath.exists() else split

    def fold_dir(self, fold: int | None) -> Path:
        return self.dir / ("all" if fold is None else f"fold{fold}")

    def fold_split(self, fold: int | None, seed: int) -> tuple[list[Sample], list[Sample]]:
        """(train, validation) crops of fold k (validation = fold k), or all training crops and no
        validation for fold=None; stratified subsets of them for smoke runs (--max-train/--max-eval)."""
        if fold is None:
            tr, va = self.train_all, []
        else:
            tr = [s for s in self.train_all if self.fold_of[s.name] != fold]
            va = [s for s in self.train_all if self.fold_of[s.name] == fold]
        return _subset(tr, self.spec.max_train, seed), _subset(va, self.spec.max_eval, seed)

    def is_done(self, fold: int | None) -> bool:
        return (self.fold_dir(fold) / "metrics.json").exists()

    # -- one fold --------------------------------------------------------------------------
    def fit(self, fold: int | None) -> dict:
        """Train fold k (validation = fold k) or, with fold=None, all training crops."""
        spec, cfg, r = self.spec, self.cfg, self.recipe
        fdir = self.fold_dir(fold)
        if self.is_done(fold):
            self.log(f"[{fdir.name}] already complete, skipping")
            return json.loads((fdir / "metrics.json").read_text())
        fdir.mkdir(parents=True, exist_ok=True)
        if spec.method == "linear":  # frozen backbone: embeddings once, head on the cache (see linear.py)
            from .linear import fit_linear

            return fit_linear(self, fold)
        t_start = time.time()
        seed = r.seed + (0 if fold is None else fold)
        torch.manual_seed(seed)
        tr, va = self.fold_split(fold, seed)
        policy = r.policy()  # the training transform (recipe: augment + augment_params)
        train_set = D.load_crops(tr, cfg.preprocess if policy.kind == "eval" else None)
        val_set = D.load_crops(va, cfg.preprocess) if va else None

        model = create(cfg, spec.method, weights=spec.weights, random_init=spec.random_init, tiny=spec.tiny,
                       drop_rate=r.drop_rate, drop_path_rate=r.drop_path_rate,
                       lora_rank=r.lora_rank, lora_alpha=r.lora_alpha, lora_dropout=r.lora_dropout)
        model.to(self.device)
        if self.device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        keep = None  # LoRA on pretrained weights: checkpoints hold the trained tensors only
        if spec.method != "full" and cfg.pretrained and not spec.random_init:
            from .adapt import trainable_names

            keep = trainable_names(model)
        opt = _optimizer(params, r)
        steps_per_epoch = max(1, len(train_set) // r.batch_size)
        total_steps = steps_per_epoch * r.epochs
        warm = steps_per_epoch * r.warmup_epochs
        if r.scheduler == "cosine":
            def lr_lambda(step):
                if step < warm:
                    return (step + 1) / warm
                prog = (step - warm) / max(1, total_steps - warm)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        elif r.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3, min_lr=1e-7)
        else:
            raise ValueError(f"unknown scheduler {r.scheduler!r}")
        ema = EMA(model, r.ema_decay) if r.ema_decay else None
        scaler = torch.amp.GradScaler("cuda") if spec.amp == "fp16" and self.device.type == "cuda" else None
        g = torch.Generator().manual_seed(seed)

        state_path = fdir / "state.pt"
        start_epoch, best, history = 0, {"ba": -1.0, "epoch": -1, "auroc": float("nan")}, []
        bad_epochs = 0
        if state_path.exists():
            st = torch.load(state_path, map_location="cpu", weights_only=True)
            if st.get("model_contents") == "trainable":
                from .adapt import load_partial_state

                load_partial_state(model, st["model"])
            else:
                model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
            if ema is not None:
                ema.module.load_state_dict(st["ema"])
                ema.updates = st["ema_updates"]
            g.set_state(st["rng"])
            torch.set_rng_state(st["torch_rng"])
            restore_cuda_state(st, scaler, self.device)
            start_epoch, best, history, bad_epochs = st["epoch"] + 1, st["best"], st["history"], st["bad_epochs"]
            self.log(f"[{fdir.name}] resuming after epoch {st['epoch']} (best val BA {best['ba']:.4f} @ {best['epoch']})")

        n_tr = len(train_set)
        self.log(f"[{fdir.name}] {cfg.name}/{spec.method}: {n_tr} train crops ({int(train_set.labels.sum())} atypical), "
                 f"{len(va)} val; {count_params(model, True):,} trainable params; device {self.device}")
        from tqdm.auto import tqdm

        for epoch in range(start_epoch, r.epochs):
            t0 = time.time()
            model.train()
            if r.sampling == "balanced":
                idx = D.balanced_indices(train_set.labels, steps_per_epoch * r.batch_size, g)
            else:
                idx = torch.randperm(n_tr, generator=g)[: steps_per_epoch * r.batch_size]
            loss_sum = 0.0
            bar = tqdm(range(steps_per_epoch), desc=f"{fdir.name} ep {epoch + 1}/{r.epochs}", leave=False,
                       mininterval=2.0, disable=None)
            for step in bar:
                b = idx[step * r.batch_size:(step + 1) * r.batch_size]
                x = D.augment(train_set.images[b], cfg.preprocess, policy, g)
                if self.device.type == "cpu":
                    x = x.contiguous(memory_format=torch.channels_last)
                x, y = x.to(self.device, non_blocking=True), train_set.labels[b].to(self.device)
                if r.mixup_alpha > 0:
                    x, y = _mixup(x, y, r.mixup_alpha, g)
                with _autocast(self.device, spec.amp, training=True):
                    loss = _loss(model(x).float(), y, r)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                if ema is not None:
                    ema.update(model)
                if r.scheduler == "cosine":
                    sched.step()
                loss_sum += loss.item()
                bar.set_postfix(loss=f"{loss_sum / (step + 1):.4f}")
            bar.close()
            eval_model = ema.module if ema is not None else model
            row = {"epoch": epoch, "train_loss": loss_sum / steps_per_epoch, "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.time() - t0, 2)}
            if val_set is not None:
                pv = predict(eval_model, val_set, cfg, self.device, amp=spec.amp)
                m = _metrics_or_reason(val_set.labels.numpy(), pv)
                row.update({"val_ba": m.get("balanced_accuracy"), "val_auroc": m.get("auroc")})
                ba = m.get("balanced_accuracy", -1.0)
                if r.scheduler == "plateau":
                    sched.step(ba)
                if ba > best["ba"]:
                    best = {"ba": ba, "epoch": epoch, "auroc": m.get("auroc")}
                    save_weights(eval_model, fdir / "best.safetensors", {"epoch": epoch, "val_ba": ba}, keys=keep)
                    bad_epochs = 0
                else:
                    bad_epochs += 1
            history.append(row)
            self.log(f"[{fdir.name}] epoch {epoch + 1}/{r.epochs} loss {row['train_loss']:.4f}"
                     + (f" val BA {row['val_ba']:.4f} AUROC {row['val_auroc']:.4f} (best {best['ba']:.4f} @ {best['epoch'] + 1})"
                        if val_set is not None else "") + f" [{row['seconds']:.0f}s]")
            msd = model.state_dict() if keep is None else {k: v for k, v in model.state_dict().items() if k in keep}
            state = {"model": msd, "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "epoch": epoch, "best": best, "history": history, "bad_epochs": bad_epochs,
                     "rng": g.get_state(), "torch_rng": torch.get_rng_state(), **cuda_state(scaler, self.device)}
            if keep is not None:
                state["model_contents"] = "trainable"
            if ema is not None:
                state["ema"], state["ema_updates"] = ema.module.state_dict(), ema.updates
            atomic_torch_save(state, state_path)
            self._write_history(fdir, history)
            if val_set is not None and r.early_stop_patience and bad_epochs >= r.early_stop_patience:
                self.log(f"[{fdir.name}] early stop: no val BA gain for {bad_epochs} epochs")
                break

        # final model: best validation epoch (fold), or the last epoch (all training crops)
        final = ema.module if ema is not None else model
        if fold is None:
            save_weights(final, fdir / "best.safetensors", {"epoch": r.epochs - 1}, keys=keep)
            best = {"ba": None, "epoch": len(history) - 1, "auroc": None}
        else:
            load_state_file(final, fdir / "best.safetensors")
        return self._evaluate(fold, final, va, val_set, best, history, time.time() - t_start)

    def _write_history(self, fdir: Path, history: list[dict]) -> None:
        keys = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
        tmp = fdir / "history.csv.tmp"
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)
        os.replace(tmp, fdir / "history.csv")

    def _evaluate(self, fold, model, va, val_set, best, history, train_seconds) -> dict:
        spec, cfg = self.spec, self.cfg
        fdir = self.fold_dir(fold)
        out = {"fold": fold if fold is not None else "all", "model": cfg.name, "method": spec.method,
               "best_epoch": best["epoch"], "epochs_run": len(history), "train_seconds": round(train_seconds, 1),
               "versions": versions(), "device": str(self.device),
               "split": {k: self.split.get(k) for k in ("folds_sha256", "train_fingerprint")},
               "selection": "epoch with the best validation balanced accuracy (threshold 0.5)"
               if fold is not None else f"last epoch of a fixed {self.recipe.epochs}-epoch schedule",
               "weights_source": spec.resolved()["weights_source"], "random_init": spec.random_init or not cfg.pretrained,
               "tiny_stand_in": spec.tiny,
               "validation": None, "tests": {}, "predictions": {}}
        t0 = time.time()
        if val_set is not None:
            pv = predict(model, val_set, cfg, self.device, amp=spec.amp)
            yv = val_set.labels.numpy()
            m = _metrics_or_reason(yv, pv)
            try:
                thr, thr_ba = best_threshold(yv, pv)
                m["best_threshold"], m["best_threshold_ba"] = thr, thr_ba
            except MetricError:
                pass
            out["validation"] = m
            out["predictions"]["validation"] = _pred_rows(val_set, pv)
        for name, samples in available_eval_sets(spec.data_root).items():
            if name not in spec.eval_sets:
                continue
            if isinstance(samples, str):
                out["tests"][name] = {"absent": samples}
                self.log(f"[{fdir.name}] {name}: absent ({samples})")
                continue
            samples = _subset(samples, spec.max_eval)
            cs = D.load_crops(samples, cfg.preprocess)
            p = predict(model, cs, cfg, self.device, amp=spec.amp)
            out["tests"][name] = _metrics_or_reason(cs.labels.numpy(), p)
            out["predictions"][name] = _pred_rows(cs, p)
            t = out["tests"][name]
            if "balanced_accuracy" in t:
                self.log(f"[{fdir.name}] {name}: BA {t['balanced_accuracy']:.4f} AUROC {t['auroc']:.4f} (n={t['n']})")
        out["eval_seconds"] = round(time.time() - t0, 1)
        atomic_write_json(fdir / "metrics.json", out)
        # the resumable state is no longer needed once the fold is complete
        (fdir / "state.pt").unlink(missing_ok=True)
        return out


def _pred_rows(cs: D.CropSet, p: np.ndarray) -> list[list]:
    return [[n, int(y), round(float(q), 6)] for n, y, q in zip(cs.names, cs.labels.tolist(), p)]


def run(spec: RunSpec, folds: list[int | None], log=print) -> list[dict]:
    r = Run(spec, log)
    r.prepare()
    return [r.fit(f) for f in folds]
