"""What the two fold trainers share: the interface, the optimisation pieces and the fold's records.

``ami-train`` trains a fold with one of two :class:`FoldTrainer` implementations, chosen by the
method (:func:`ami.train.fit.trainer_for`):

- :class:`ami.train.fit.EndToEndTrainer` (``full``, ``lora``): the network trains on augmented
  crops, one :class:`TrainStep` per batch;
- :class:`ami.train.linear.LinearProbeTrainer` (``linear``): a linear head on cached embeddings of
  the frozen backbone.

Both follow the same protocol, built from the pieces here: the recipe's loss (:func:`recipe_loss`),
optimiser (:func:`make_optimizer`) and learning-rate schedule (:class:`LRSchedule`); batches drawn
per epoch (:func:`epoch_batches`); model selection on validation balanced accuracy with early
stopping (:class:`Progress`, which is also what ``state.pt`` keeps besides the tensors); and the
fold's records - ``history.csv`` (:func:`write_history`) and ``metrics.json``
(:meth:`FoldTrainer.record`, :meth:`FoldTrainer.evaluate`, :meth:`FoldTrainer.finish`), whose
files the run directory (:mod:`ami.runtime.rundir`) names.
"""

from __future__ import annotations

import csv
import io
import math
import platform
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ami.runtime import __version__, sampling
from ami.runtime.atomic import atomic_write_text, atomic_write_via
from ami.runtime.datasets import Sample, available_eval_sets
from ami.runtime.metrics import MetricError, best_threshold, evaluate
from ami.runtime.preprocess import Preprocess
from ami.runtime.rundir import FoldDir, RunDirError

from . import data as D
from .registry import Recipe

SELECTED_ON_VALIDATION = "epoch with the best validation balanced accuracy (threshold 0.5)"


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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def stratified_subset(samples: list[Sample], n: int, seed: int = 0) -> list[Sample]:
    """A class-stratified, deterministic subset (smoke tests: --max-train / --max-eval), with at
    least two atypical crops (:func:`ami.runtime.sampling.stratified_subset`)."""
    return sampling.stratified_subset(samples, n, seed, min_positives=2)


# -- precision --------------------------------------------------------------------------------------
@contextmanager
def float32(device: torch.device):
    """Autocast off, and on CUDA float32 that is float32: TF32 off for matmuls and cuDNN convolutions
    (PyTorch's default lets cuDNN use TF32, which moves an "fp32" probability by up to ~5e-4) while
    inside; the previous settings come back on exit."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        saved = matmul.allow_tf32, cudnn.allow_tf32
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved


def autocast(device: torch.device, amp: str, training: bool = False):
    """Autocast context. On CUDA: bf16 or fp16. On CPU: bf16 for the training step only (oneDNN
    bf16 kernels on AVX512-BF16/AMX CPUs); CPU evaluation always runs in float32, the precision of
    the exported engine, so validation-based selection sees the numbers that will ship. Whatever
    runs in float32 (``amp`` none, CPU evaluation) runs in :func:`float32` (on CUDA: TF32 off)."""
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"unknown amp mode {amp!r}: none, bf16 or fp16")
    if amp == "none":
        return float32(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    if device.type == "cpu" and amp == "bf16" and training:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if device.type == "cpu" and amp == "fp16":
        raise ValueError("--amp fp16 is CUDA only; on CPU use --amp bf16")
    return float32(device)


def cpu_bf16_native() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (else bf16 autocast is emulated and slow)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def grad_scaler(device: torch.device, amp: str):
    """The fp16 GradScaler of a CUDA run, else None."""
    return torch.amp.GradScaler("cuda") if amp == "fp16" and device.type == "cuda" else None


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on ``device``; channels-last on the CPU (faster convolutions there)."""
    model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


# -- the recipe's optimisation ------------------------------------------------------------------------
def recipe_loss(logits: torch.Tensor, y: torch.Tensor, r: Recipe) -> torch.Tensor:
    """The recipe's loss on one logit per crop: BCE or focal (gamma 2), with optional label smoothing."""
    if r.label_smoothing:
        y = y * (1 - r.label_smoothing) + 0.5 * r.label_smoothing
    if r.loss == "bce":
        return nn.functional.binary_cross_entropy_with_logits(logits, y)
    if r.loss == "focal":
        bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        p_t = torch.exp(-bce)
        return ((1 - p_t) ** 2 * bce).mean()
    raise ValueError(f"unknown loss {r.loss!r}")


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): each crop blended with a partner from the same batch,
    x = lam*x + (1-lam)*x[perm], soft target y likewise; one lam ~ Beta(alpha, alpha) per batch.
    Both draws come from the run's generator ``g``, so a resumed run replays the same mixes."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def make_optimizer(params, r: Recipe) -> torch.optim.Optimizer:
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
    raise ValueError(f"unknown optimizer {r.optimizer!r}")


class LRSchedule:
    """The recipe's learning-rate schedule around the torch scheduler that ``state.pt`` records:
    ``cosine`` (linear warm-up over ``warmup_epochs``, then cosine decay to 0; stepped per batch) or
    ``plateau`` (learning rate halved after 3 epochs without a validation gain; stepped per epoch)."""

    def __init__(self, opt: torch.optim.Optimizer, r: Recipe, steps_per_epoch: int):
        self.kind = r.scheduler
        total, warm = steps_per_epoch * r.epochs, steps_per_epoch * r.warmup_epochs
        if r.scheduler == "cosine":
            def lr_lambda(step):
                if step < warm:
                    return (step + 1) / warm
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
            self.torch = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        elif r.scheduler == "plateau":
            self.torch = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3,
                                                                    min_lr=1e-7)
        else:
            raise ValueError(f"unknown scheduler {r.scheduler!r}")

    def after_step(self) -> None:
        if self.kind == "cosine":
            self.torch.step()

    def after_validation(self, balanced_accuracy: float) -> None:
        if self.kind == "plateau":
            self.torch.step(balanced_accuracy)

    def state_dict(self) -> dict:
        return self.torch.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.torch.load_state_dict(state)


def steps_per_epoch(n_train: int, r: Recipe) -> int:
    return max(1, n_train // r.batch_size)


def epoch_batches(labels: torch.Tensor, r: Recipe, steps: int, g: torch.Generator) -> list[torch.Tensor]:
    """The index batches of one epoch: ``steps`` batches of the recipe's size, drawn with
    inverse-frequency weights (``sampling=balanced``, with replacement) or as a random permutation."""
    n = steps * r.batch_size
    if r.sampling == "balanced":
        idx = D.balanced_indices(labels, n, g)
    else:
        idx = torch.randperm(len(labels), generator=g)[:n]
    return [idx[i * r.batch_size:(i + 1) * r.batch_size] for i in range(steps)]


@dataclass
class TrainStep:
    """One optimisation step on a batch of crops (end-to-end and LoRA training): the recipe's
    augmentation, mixup (``mixup_alpha``), the forward pass under :func:`autocast`, the recipe's loss,
    backward (through the fp16 GradScaler when there is one), the optimiser step, then the EMA
    update and the per-batch schedule step when given. Calling it returns the batch's loss."""

    model: nn.Module
    opt: torch.optim.Optimizer
    recipe: Recipe
    preprocess: Preprocess
    policy: object  # recipes.AugPolicy (or the name of one)
    device: torch.device
    amp: str
    g: torch.Generator
    scaler: object | None = None
    ema: object | None = None  # fit.EMA
    schedule: LRSchedule | None = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        r, dev = self.recipe, self.device
        x = D.augment(images, self.preprocess, self.policy, self.g)
        if dev.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        x, y = x.to(dev, non_blocking=True), labels.to(dev)
        if r.mixup_alpha > 0:
            x, y = mixup(x, y, r.mixup_alpha, self.g)
        with autocast(dev, self.amp, training=True):
            loss = recipe_loss(self.model(x).float(), y, r)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.schedule is not None:
            self.schedule.after_step()
        return loss.item()


# -- selection and progress ---------------------------------------------------------------------------
def _no_best() -> dict:
    return {"ba": -1.0, "epoch": -1, "auroc": float("nan")}


@dataclass
class Progress:
    """Where a fold's training stands: one history row per finished epoch, the selected epoch
    (best validation balanced accuracy) and the epochs since it - what ``state.pt`` keeps besides
    the tensors, under the keys of :meth:`state`."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=_no_best)
    bad_epochs: int = 0
    start_epoch: int = 0

    @classmethod
    def from_state(cls, st: dict) -> Progress:
        return cls(history=st["history"], best=st["best"], bad_epochs=st["bad_epochs"], start_epoch=st["epoch"] + 1)

    def state(self, epoch: int) -> dict:
        return {"epoch": epoch, "best": self.best, "history": self.history, "bad_epochs": self.bad_epochs}

    def resumed(self, fd: FoldDir) -> str:
        return (f"[{fd.name}] resuming after epoch {self.start_epoch - 1} "
                f"(best val BA {self.best['ba']:.4f} @ {self.best['epoch']})")

    def validated(self, epoch: int, row: dict, m: dict) -> bool:
        """Record epoch ``epoch``'s validation metrics ``m`` in its history row; True when it is the best so far."""
        row.update({"val_ba": m.get("balanced_accuracy"), "val_auroc": m.get("auroc")})
        if m.get("balanced_accuracy", -1.0) > self.best["ba"]:
            self.best = {"ba": m["balanced_accuracy"], "epoch": epoch, "auroc": m.get("auroc")}
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    def stop_early(self, patience: int) -> bool:
        return bool(patience) and self.bad_epochs >= patience

    def select_last(self) -> None:
        """The all-crops model keeps its last epoch (there is no validation to select on)."""
        self.best = {"ba": None, "epoch": len(self.history) - 1, "auroc": None}

    def epoch_line(self, fd: FoldDir, epochs: int, row: dict) -> str:
        line = f"[{fd.name}] epoch {row['epoch'] + 1}/{epochs} loss {row['train_loss']:.4f}"
        if row.get("val_ba") is not None:
            line += (f" val BA {row['val_ba']:.4f} AUROC {row['val_auroc']:.4f} "
                     f"(best {self.best['ba']:.4f} @ {self.best['epoch'] + 1})")
        return line


# -- records --------------------------------------------------------------------------------------------
def load_resume_state(path: Path, keys: tuple[str, ...]) -> dict:
    """A fold's ``state.pt`` for ``--resume`` (tensors only, ``weights_only``: no pickled code runs).
    A file that is not ami's training state (another tool's, damaged, from an incompatible run) is
    one :class:`RunDirError` naming the file and what to do, not the loader's traceback."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a foreign or damaged file
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise RunDirError(f"{path}: not an ami training state ({type(e).__name__}: {msg}); delete it to "
                          "train this fold from the start") from None
    missing = [k for k in keys if not isinstance(st, dict) or k not in st]
    if missing:
        raise RunDirError(f"{path}: not an ami training state (no {', '.join(missing)}); delete it to train "
                          "this fold from the start")
    return st


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write_via(path, lambda tmp: torch.save(obj, tmp))


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv: one row per epoch, columns ``epoch`` first, then the others sorted."""
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(path, buf.getvalue())


def metrics_or_reason(y, p, threshold=0.5) -> dict:
    try:
        return evaluate(y, p, threshold).to_dict()
    except MetricError as e:
        return {"error": str(e)}


def validation_metrics(y, p) -> dict:
    """The validation record: metrics at 0.5 and, when defined, the threshold that maximises BA."""
    m = metrics_or_reason(y, p)
    try:
        thr, thr_ba = best_threshold(y, p)
        m["best_threshold"], m["best_threshold_ba"] = thr, thr_ba
    except MetricError:
        pass
    return m


def pred_rows(names: Sequence[str], labels, p: np.ndarray) -> list[list]:
    """metrics.json's per-crop predictions: [name, label, probability rounded to 6 digits]."""
    return [[n, int(y), round(float(q), 6)] for n, y, q in zip(names, labels, p)]


# (names, labels, probabilities) of a set of crops under the fold's final model
Scored = tuple[Sequence[str], np.ndarray, np.ndarray]


class FoldTrainer(ABC):
    """Trains one fold of a run and writes its files: ``state.pt`` after every epoch (resumed from
    when present), ``history.csv``, ``best.safetensors`` and finally ``metrics.json`` (then
    ``state.pt`` goes). ``run`` is the :class:`ami.train.fit.Run` being trained: its ``spec``,
    ``cfg``, ``recipe``, ``device``, ``split``, ``log`` and ``fold_split``."""

    @abstractmethod
    def train(self, run, fd: FoldDir) -> dict:
        """Train and evaluate fold ``fd``; return its metrics.json record."""

    @staticmethod
    def seed(run, fd: FoldDir) -> int:
        """The fold's seed: the recipe's, plus the fold number (the all-crops model: the recipe's)."""
        return run.recipe.seed + (0 if fd.is_all else fd.fold)

    @staticmethod
    def record(run, fd: FoldDir, progress: Progress, train_seconds: float, **extra) -> dict:
        """metrics.json before the evaluation: the fold, its selection, provenance; ``extra`` keys
        (the trainer's own) come after the provenance."""
        spec, cfg = run.spec, run.cfg
        resolved = spec.resolved()
        return {"fold": fd.fold, "model": cfg.name, "method": spec.method,
                "best_epoch": progress.best["epoch"], "epochs_run": len(progress.history),
                "train_seconds": round(train_seconds, 1), "versions": versions(), "device": str(run.device),
                "split": {k: run.split.get(k) for k in ("folds_sha256", "train_fingerprint")},
                "selection": f"last epoch of a fixed {run.recipe.epochs}-epoch schedule" if fd.is_all
                else SELECTED_ON_VALIDATION,
                "weights_source": resolved["weights_source"], "random_init": resolved["random_init"],
                "tiny_stand_in": spec.tiny, **extra, "validation": None, "tests": {}, "predictions": {}}

    @staticmethod
    def evaluate(run, fd: FoldDir, out: dict, validation: Callable[[], Scored] | None,
                 score: Callable[[str, list[Sample]], Scored]) -> dict:
        """Fill ``out`` with the validation record (``validation()``, when the fold has one) and the
        metrics of every test set of ``run.spec.eval_sets`` on disk (``score(set name, crops)``; at
        most ``max_eval`` crops, stratified), with the per-crop predictions and ``eval_seconds``."""
        spec = run.spec
        t0 = time.time()
        if validation is not None:
            names, y, p = validation()
            out["validation"] = validation_metrics(y, p)
            out["predictions"]["validation"] = pred_rows(names, y, p)
        for name, samples in available_eval_sets(spec.data_root).items():
            if name not in spec.eval_sets:
                continue
            if isinstance(samples, str):
                out["tests"][name] = {"absent": samples}
                run.log(f"[{fd.name}] {name}: absent ({samples})")
                continue
            names, y, p = score(name, stratified_subset(samples, spec.max_eval))
            t = out["tests"][name] = metrics_or_reason(y, p)
            t["data_fingerprint"] = None  # a field of the record that nothing fills (the split pins AMi-Br)
            out["predictions"][name] = pred_rows(names, y, p)
            if "balanced_accuracy" in t:
                run.log(f"[{fd.name}] {name}: BA {t['balanced_accuracy']:.4f} AUROC {t['auroc']:.4f} (n={t['n']})")
        out["eval_seconds"] = round(time.time() - t0, 1)
        return out

    @staticmethod
    def finish(fd: FoldDir, out: dict) -> dict:
        """Write metrics.json (the fold is finished) and drop the resumable state, no longer needed."""
        fd.write_metrics(out)
        fd.state.unlink(missing_ok=True)
        return out
