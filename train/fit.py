"""The training loop: one fold at a time, resumable, self-describing run directories.

:class:`Run` records and checks a run directory (its layout: :mod:`ami.runtime.rundir`) and trains
its folds, each with the :class:`~ami.train.loop.FoldTrainer` of the method (:func:`trainer_for`):
:class:`EndToEndTrainer` here for ``full`` and ``lora``, :class:`~ami.train.linear.LinearProbeTrainer`
for ``linear``.

A killed run restarted with the same command continues from the last completed epoch of the
unfinished fold; completed folds (those with metrics.json) are not retrained.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ami.runtime.datasets import TEST_SETS, Sample, amibr_split, fingerprint
from ami.runtime.rundir import ALL, RANDOM_FROM_SCRATCH, RANDOM_NOT_PRETRAINED, FoldDir, RunDir, fold_id
from ami.runtime.splits import FOLDS_FILE, check_against_data, folds_sha256, load_folds

from . import data as D
from .adapt import trainable_names
from .linear import LinearProbeTrainer
from .loop import (
    FoldTrainer,
    LRSchedule,
    Progress,
    TrainStep,
    atomic_torch_save,
    autocast,
    cpu_bf16_native,
    epoch_batches,
    grad_scaler,
    load_resume_state,
    make_optimizer,
    metrics_or_reason,
    pick_device,
    steps_per_epoch,
    stratified_subset,
    to_device,
    versions,
    write_history,
)
from .models import count_params, create
from .provenance import origins
from .registry import ModelConfig, Recipe, configure, definition, get, with_recipe_defaults
from .weights import TRAINABLE, load_partial_state, load_weights, save_weights, weights_record


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
            "weights_source": (RANDOM_FROM_SCRATCH if not cfg.pretrained else RANDOM_NOT_PRETRAINED if self.random_init
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
        with autocast(device, amp):
            out.append(torch.sigmoid(model(x).float()).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


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




# -- the end-to-end trainer (full fine-tuning, LoRA) ---------------------------------------------------
@dataclass
class _Fold:
    """What the end-to-end trainer holds while training one fold."""

    model: nn.Module
    keep: set[str] | None  # LoRA / linear on pretrained weights: the trained tensors (checkpoints hold only these)
    train_set: D.CropSet
    val_set: D.CropSet | None
    opt: torch.optim.Optimizer
    schedule: LRSchedule
    ema: EMA | None
    scaler: object | None
    g: torch.Generator
    step: TrainStep
    steps: int  # per epoch
    progress: Progress = field(default_factory=Progress)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


class EndToEndTrainer(FoldTrainer):
    """``full`` and ``lora``: the network trains on augmented crops (the recipe's optimiser, schedule,
    EMA, mixup, mixed precision); each new best validation epoch is saved to best.safetensors as
    training goes, and the fold ends with that epoch's weights (the all-crops model: the last epoch)."""

    def train(self, run: Run, fd: FoldDir) -> dict:
        t_start = time.time()
        f = self._prepare(run, fd)
        if fd.state.exists():
            self._resume(run, fd, f)
        r = run.recipe
        run.log(f"[{fd.name}] {run.cfg.name}/{run.spec.method}: {len(f.train_set)} train crops "
                f"({int(f.train_set.labels.sum())} atypical), {0 if f.val_set is None else len(f.val_set)} val; "
                f"{count_params(f.model, True):,} trainable params; device {run.device}")
        for epoch in range(f.progress.start_epoch, r.epochs):
            self._epoch(run, fd, f, epoch)
            if f.val_set is not None and f.progress.stop_early(r.early_stop_patience):
                run.log(f"[{fd.name}] early stop: no val BA gain for {f.progress.bad_epochs} epochs")
                break
        final = f.eval_model
        if fd.is_all:  # no validation: the last epoch
            save_weights(final, fd.weights, {"epoch": r.epochs - 1}, keys=f.keep)
            f.progress.select_last()
        else:
            load_weights(final, fd.weights)
        return self._evaluate(run, fd, f, final, time.time() - t_start)

    def _prepare(self, run: Run, fd: FoldDir) -> _Fold:
        spec, cfg, r = run.spec, run.cfg, run.recipe
        seed = self.seed(run, fd)
        torch.manual_seed(seed)
        tr, va = run.fold_split(fd.fold, seed)
        policy = r.policy()  # the training transform (recipe: augment + augment_params)
        train_set = D.load_crops(tr, cfg.preprocess if policy.kind == "eval" else None)
        val_set = D.load_crops(va, cfg.preprocess) if va else None
        model = create(cfg, spec.method, weights=spec.weights, random_init=spec.random_init, tiny=spec.tiny,
                       drop_rate=r.drop_rate, drop_path_rate=r.drop_path_rate,
                       lora_rank=r.lora_rank, lora_alpha=r.lora_alpha, lora_dropout=r.lora_dropout,
                       head_init=r.head_init)
        model = to_device(model, run.device)
        params = [p for p in model.parameters() if p.requires_grad]
        keep = trainable_names(model) if spec.method != "full" and cfg.pretrained and not spec.random_init else None
        opt = make_optimizer(params, r)
        steps = steps_per_epoch(len(train_set), r)
        schedule = LRSchedule(opt, r, steps)
        ema = EMA(model, r.ema_decay) if r.ema_decay else None
        scaler = grad_scaler(run.device, spec.amp)
        g = torch.Generator().manual_seed(seed)
        step = TrainStep(model, opt, r, cfg.preprocess, policy, run.device, spec.amp, g, scaler=scaler, ema=ema,
                         schedule=schedule)
        return _Fold(model, keep, train_set, val_set, opt, schedule, ema, scaler, g, step, steps)

    def _resume(self, run: Run, fd: FoldDir, f: _Fold) -> None:
        st = load_resume_state(fd.state, ("model", "opt", "sched", "rng", "torch_rng"))
        if st.get("model_contents") == TRAINABLE:
            load_partial_state(f.model, st["model"])
        else:
            f.model.load_state_dict(st["model"])
        f.opt.load_state_dict(st["opt"])
        f.schedule.load_state_dict(st["sched"])
        if f.ema is not None:
            f.ema.module.load_state_dict(st["ema"])
            f.ema.updates = st["ema_updates"]
        f.g.set_state(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        restore_cuda_state(st, f.scaler, run.device)
        f.progress = Progress.from_state(st)
        run.log(f.progress.resumed(fd))

    def _epoch(self, run: Run, fd: FoldDir, f: _Fold, epoch: int) -> None:
        """One epoch: the training steps, validation (and best.safetensors on a gain), state.pt, history.csv."""
        from tqdm.auto import tqdm

        r, ts = run.recipe, f.train_set
        t0 = time.time()
        f.model.train()
        batches = epoch_batches(ts.labels, r, f.steps, f.g)
        loss_sum = 0.0
        bar = tqdm(range(f.steps), desc=f"{fd.name} ep {epoch + 1}/{r.epochs}", leave=False, mininterval=2.0,
                   disable=None)
        for i in bar:
            loss_sum += f.step(ts.images[batches[i]], ts.labels[batches[i]])
            bar.set_postfix(loss=f"{loss_sum / (i + 1):.4f}")
        bar.close()
        row = {"epoch": epoch, "train_loss": loss_sum / f.steps, "lr": f.opt.param_groups[0]["lr"],
               "seconds": round(time.time() - t0, 2)}
        if f.val_set is not None:
            pv = predict(f.eval_model, f.val_set, run.cfg, run.device, amp=run.spec.amp)
            m = metrics_or_reason(f.val_set.labels.numpy(), pv)
            f.schedule.after_validation(m.get("balanced_accuracy", -1.0))
            if f.progress.validated(epoch, row, m):
                save_weights(f.eval_model, fd.weights, {"epoch": epoch, "val_ba": f.progress.best["ba"]}, keys=f.keep)
        f.progress.history.append(row)
        run.log(f.progress.epoch_line(fd, r.epochs, row) + f" [{row['seconds']:.0f}s]")
        self._checkpoint(run, fd, f, epoch)
        write_history(fd.history, f.progress.history)

    @staticmethod
    def _checkpoint(run: Run, fd: FoldDir, f: _Fold, epoch: int) -> None:
        sd = f.model.state_dict()
        state = {"model": sd if f.keep is None else {k: v for k, v in sd.items() if k in f.keep},
                 "opt": f.opt.state_dict(), "sched": f.schedule.state_dict(), **f.progress.state(epoch),
                 "rng": f.g.get_state(), "torch_rng": torch.get_rng_state(), **cuda_state(f.scaler, run.device)}
        if f.keep is not None:
            state["model_contents"] = TRAINABLE
        if f.ema is not None:
            state["ema"], state["ema_updates"] = f.ema.module.state_dict(), f.ema.updates
        atomic_torch_save(state, fd.state)

    def _evaluate(self, run: Run, fd: FoldDir, f: _Fold, model: nn.Module, train_seconds: float) -> dict:
        cfg, amp = run.cfg, run.spec.amp

        def scored(cs: D.CropSet):
            return cs.names, cs.labels.numpy(), predict(model, cs, cfg, run.device, amp=amp)

        out = self.record(run, fd, f.progress, train_seconds, weights=weights_record(model))
        validation = (lambda: scored(f.val_set)) if f.val_set is not None else None
        self.evaluate(run, fd, out, validation, lambda name, samples: scored(D.load_crops(samples, cfg.preprocess)))
        return self.finish(fd, out)


TRAINERS: dict[str, type[FoldTrainer]] = {"full": EndToEndTrainer, "lora": EndToEndTrainer,
                                          "linear": LinearProbeTrainer}


def trainer_for(method: str) -> FoldTrainer:
    """The fold trainer of a method: the one place that chooses it."""
    if method not in TRAINERS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(TRAINERS)}")
    return TRAINERS[method]()


# -- the run -------------------------------------------------------------------------------------------
class Run:
    """A run directory: checks/records its config and split, trains folds, resumes."""

    def __init__(self, spec: RunSpec, log=print):
        self.spec = spec
        self.log = log
        self.rundir = RunDir(spec.run_dir)
        self.cfg = spec.cfg
        self.recipe = spec.recipe
        self.trainer = trainer_for(spec.method)
        self.device = pick_device(spec.device)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        autocast(self.device, spec.amp)  # reject unknown / unsupported modes before any work
        if self.device.type == "cpu" and spec.amp == "bf16" and not cpu_bf16_native():
            log("warning: this CPU has no native bf16 kernels; --amp bf16 will be emulated and slower than fp32")

    # -- run-level records -----------------------------------------------------------------
    def prepare(self) -> None:
        """Record config.json (or check the one there: a run directory holds one configuration) and
        split.json (or check it: the pinned folds file, checked against the data on every (re)start)."""
        self._check_config()
        rows = load_folds(FOLDS_FILE)
        self.train_all, self.amibr_test = amibr_split(self.spec.data_root)
        check_against_data(rows, self.train_all)
        self.fold_of = {r.image: r.fold for r in rows}
        self._check_split()

    def _check_config(self) -> None:
        resolved = self.spec.resolved()
        if self.rundir.is_run():
            old_cmp, new_cmp = _comparable(self.rundir.config()), _comparable(resolved)
            if old_cmp != new_cmp:
                diff = sorted(k for k in set(old_cmp) | set(new_cmp) if old_cmp.get(k) != new_cmp.get(k))
                raise SystemExit(f"{self.rundir.path} holds a run with a different configuration (differs in: "
                                 f"{', '.join(diff)}); use another --out directory")
        else:
            self.rundir.write_config({**self.spec.record(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _check_split(self) -> None:
        split = {"folds_file": FOLDS_FILE.name, "folds_sha256": folds_sha256(FOLDS_FILE)}
        if self.rundir.split_path.exists():
            old = self.rundir.split()
            if old["folds_sha256"] != split["folds_sha256"]:
                raise SystemExit(f"{self.rundir.path} was trained on folds {old['folds_sha256'][:12]}, "
                                 f"the current folds file is {split['folds_sha256'][:12]}")
        else:
            split["train_fingerprint"] = fingerprint(self.train_all)
            self.rundir.write_split(split)
        self.split = self.rundir.split()

    def fold(self, fold) -> FoldDir:
        """The folder of fold k, or of the all-crops model (fold None / "all")."""
        return self.rundir.fold(fold)

    def fold_split(self, fold, seed: int) -> tuple[list[Sample], list[Sample]]:
        """(train, validation) crops of fold k (validation = fold k), or all training crops and no
        validation for the all-crops model (fold None / "all"); stratified subsets of them for smoke
        runs (--max-train/--max-eval)."""
        k = fold_id(fold)
        if k == ALL:
            tr, va = self.train_all, []
        else:
            tr = [s for s in self.train_all if self.fold_of[s.name] != k]
            va = [s for s in self.train_all if self.fold_of[s.name] == k]
        return stratified_subset(tr, self.spec.max_train, seed), stratified_subset(va, self.spec.max_eval, seed)

    def is_done(self, fold) -> bool:
        return self.fold(fold).is_finished()

    # -- one fold --------------------------------------------------------------------------
    def fit(self, fold: int | None) -> dict:
        """Train fold k (validation = fold k) or, with fold=None, all training crops."""
        fd = self.fold(fold)
        if fd.is_finished():
            self.log(f"[{fd.name}] already complete, skipping")
            return fd.metrics()
        fd.mkdir()
        return self.trainer.train(self, fd)


def run(spec: RunSpec, folds: list[int | None], log=print) -> list[dict]:
    r = Run(spec, log)
    r.prepare()
    return [r.fit(f) for f in folds]
