"""Linear probing on cached embeddings: the frozen backbone runs once per crop, not once per epoch.

``ami-train -m uni --method linear`` lands here (``Run.fit`` dispatches to :func:`fit_linear`). For
each set of crops it needs (the AMi-Br training crops, each test set present) it asks the
:class:`EmbeddingCache` for the embeddings of the frozen backbone; the first fold extracts and
stores them, the other folds (and later runs with the same inputs) read them back. The linear
head is then trained on those vectors with the paper's protocol (BCE on one logit, Adam,
inverse-frequency sampling, ReduceLROnPlateau and early stopping on validation balanced
accuracy) in seconds, on the CPU.

Cache layout: ``CACHE/<model>/<set>-<key>/{manifest.json, embeddings.safetensors}`` where ``key``
hashes every input that decides the numbers (model entry, architecture kwargs, tiny stand-in,
weights identity - file sha256 or hub revision, or the random-init seed - preprocessing,
embedding rule, mixed precision, and the content fingerprint of the crops). The manifest
repeats those inputs; an entry whose manifest disagrees with the inputs asked for, or whose file
hash does not match, is refused (never silently reused, never overwritten). Entries are written
to a temporary folder and renamed into place, so a killed extraction leaves no half entry.

Deliberate differences from end-to-end training (recorded in each fold's metrics.json):
embeddings come from the evaluation preprocessing, so the linear probe sees no augmentation;
EMA is not applied to a 1-layer head. The run directory files are the same as for the other
methods; ``best.safetensors`` holds the head only (plus the backbone when it was randomly
initialised, which no weight source can rebuild).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ami.runtime.datasets import Sample, available_eval_sets, fingerprint
from ami.runtime.hashing import file_sha256
from ami.runtime.preprocess import Preprocess

from . import data as D
from .adapt import HEAD, classifier_of
from .models import create
from .registry import ModelConfig, Recipe
from .weights import weights_record

ENV_CACHE = "AMI_CACHE_DIR"
MANIFEST = "manifest.json"
EMB_FILE = "embeddings.safetensors"
HEAD_PREFIX = f"net.{HEAD}."  # state-dict prefix of the head inside LogitModel(EmbeddingClassifier)


class EmbeddingCacheError(RuntimeError):
    """A cache entry exists but was built from other inputs, or its file is damaged."""


def default_cache_root() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser() / "embeddings"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ami" / "embeddings"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def extractor_identity(cfg: ModelConfig, model: nn.Module, *, tiny: bool, random_init: bool, seed: int,
                       amp: str) -> dict:
    """Everything about the frozen backbone that decides its embeddings."""
    rec = weights_record(model)
    if random_init or rec is None:
        weights = {"random_init": True, "seed": seed}
    else:
        weights = {k: rec.get(k) for k in ("kind", "source", "file", "revision", "sha256") if rec.get(k) is not None}
        weights["kind"] = "hub" if weights.get("kind") == "hub-cache" else weights.get("kind")
    clf = classifier_of(model)
    return {
        "model": cfg.name, "arch": cfg.tiny_kwargs.get("_tiny_arch", cfg.arch) if tiny else cfg.arch,
        "create_kwargs": cfg.create_kwargs, "tiny": tiny, "tiny_kwargs": cfg.tiny_kwargs if tiny else None,
        "weights": weights, "preprocess": asdict(cfg.preprocess), "embedding": cfg.embedding,
        "num_prefix_tokens": clf.num_prefix_tokens, "embed_dim": clf.embed_dim,
        "amp": amp,
    }


class Embeddings:
    def __init__(self, names: list[str], labels: torch.Tensor, x: torch.Tensor, entry: Path, extracted: bool,
                 seconds: float):
        self.names, self.labels, self.x = names, labels, x
        self.entry, self.extracted, self.seconds = entry, extracted, seconds
        self.index = {n: i for i, n in enumerate(names)}

    def take(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        idx = torch.tensor([self.index[s.name] for s in samples], dtype=torch.long)
        return self.x[idx], self.labels[idx], [s.name for s in samples]


class EmbeddingCache:
    """Embeddings of the frozen backbone, stored once per (extractor, crop set)."""

    def __init__(self, root: Path | None = None, log=print):
        self.root = Path(root) if root is not None else default_cache_root()
        self.log = log

    def entry_dir(self, identity: dict, set_name: str, samples_fp: str) -> Path:
        key = _digest({"extractor": identity, "set": set_name, "samples": samples_fp})[:16]
        return self.root / identity["model"] / f"{set_name}-{key}"

    def get(self, model: nn.Module, identity: dict, set_name: str, samples: list[Sample], pre: Preprocess,
            device: torch.device, batch: int = 64) -> Embeddings:
        samples = sorted(samples, key=lambda s: s.name)
        inputs = {"extractor": identity, "set": set_name, "samples_fingerprint": fingerprint(samples),
                  "n": len(samples)}
        entry = self.entry_dir(identity, set_name, inputs["samples_fingerprint"])
        if (entry / MANIFEST).exists():
            return self._read(entry, inputs)
        t0 = time.time()
        x = extract(model, samples, pre, device, identity["amp"], batch, desc=f"embed {set_name}")
        labels = torch.tensor([s.label for s in samples], dtype=torch.float32)
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from safetensors.torch import save_file

        save_file({"embeddings": x.contiguous(), "labels": labels}, str(tmp / EMB_FILE))
        manifest = {"inputs": inputs, "names": [s.name for s in samples], "sha256": file_sha256(tmp / EMB_FILE),
                    "shape": list(x.shape), "dtype": "float32", "extract_seconds": round(time.time() - t0, 2),
                    "built_with": _versions(), "device": str(device),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.rename(tmp, entry)  # atomic; fails if another job renamed its copy first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (entry / MANIFEST).exists():
                raise
            return self._read(entry, inputs)
        self.log(f"[cache] {set_name}: {len(samples)} embeddings of dim {x.shape[1]} -> {entry}")
        return Embeddings(manifest["names"], labels, x, entry, True, manifest["extract_seconds"])

    def _read(self, entry: Path, inputs: dict) -> Embeddings:
        manifest = json.loads((entry / MANIFEST).read_text())
        old = json.loads(json.dumps(manifest.get("inputs")))
        new = json.loads(json.dumps(inputs))
        if old != new:
            diff = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
            if "extractor" in diff:
                oe, ne = (old or {}).get("extractor") or {}, new["extractor"]
                diff = [f"extractor.{k}" for k in sorted(set(oe) | set(ne)) if oe.get(k) != ne.get(k)] + \
                       [d for d in diff if d != "extractor"]
            raise EmbeddingCacheError(
                f"embedding cache {entry} was built from different inputs (differs in: {', '.join(diff)}); "
                "refusing to reuse or overwrite it. Delete that folder, or use another --cache-dir.")
        path = entry / EMB_FILE
        if not path.is_file() or file_sha256(path) != manifest.get("sha256"):
            raise EmbeddingCacheError(f"embedding cache {entry}: {EMB_FILE} is missing or does not match the "
                                      "sha256 in its manifest; delete that folder to rebuild it")
        from safetensors.torch import load_file

        t = load_file(str(path))
        return Embeddings(manifest["names"], t["labels"], t["embeddings"], entry, False, 0.0)


def _versions() -> dict:
    from .fit import versions

    return versions()


@torch.inference_mode()
def extract(model: nn.Module, samples: list[Sample], pre: Preprocess, device: torch.device, amp: str = "none",
            batch: int = 64, chunk: int = 512, desc: str = "embed") -> torch.Tensor:
    """Embeddings [N, D] (float32, CPU) of the frozen backbone, in ``samples`` order."""
    from tqdm.auto import tqdm

    from .fit import _autocast

    clf = classifier_of(model)
    clf.eval()
    out = []
    bar = tqdm(total=len(samples), desc=desc, unit="crop", mininterval=2.0, disable=None, leave=False)
    for i in range(0, len(samples), chunk):
        cs = D.load_crops(samples[i:i + chunk], pre)
        for j in range(0, len(cs), batch):
            x = D.eval_batch(cs.images[j:j + batch], pre).to(device)
            with _autocast(device, amp):
                out.append(clf.features(x).float().cpu())
            bar.update(min(batch, len(cs) - j))
    bar.close()
    return torch.cat(out) if out else torch.zeros(0, clf.embed_dim)


# -- the fold -------------------------------------------------------------------------------
def _rows(names: list[str], y: torch.Tensor, p: np.ndarray) -> list[list]:
    return [[n, int(a), round(float(q), 6)] for n, a, q in zip(names, y.tolist(), p)]


def _probs(head: nn.Linear, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(head(x).squeeze(1)).numpy().astype(np.float64)


def _scheduler(opt, r: Recipe, total_steps: int, warm: int):
    if r.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3, min_lr=1e-7)
    if r.scheduler == "cosine":
        def lr_lambda(step):
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    raise ValueError(f"unknown scheduler {r.scheduler!r}")


def fit_linear(run, fold: int | None) -> dict:
    """One fold of the linear probe; writes the same run-directory files as the other methods."""
    from .fit import (
        _loss,
        _metrics_or_reason,
        _optimizer,
        _subset,
        atomic_torch_save,
        atomic_write_json,
        save_weights,
        versions,
    )
    from ami.runtime.metrics import MetricError, best_threshold

    spec, cfg, r = run.spec, run.cfg, run.recipe
    log = run.log
    fdir = run.fold_dir(fold)
    fdir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    seed = r.seed + (0 if fold is None else fold)
    random_init = spec.random_init or not cfg.pretrained

    # the frozen backbone: one for all folds (a random one is seeded by the recipe, not the fold)
    torch.manual_seed(r.seed)
    model = create(cfg, "linear", weights=spec.weights, random_init=spec.random_init, tiny=spec.tiny)
    model.to(run.device).eval()
    identity = extractor_identity(cfg, model, tiny=spec.tiny, random_init=random_init, seed=r.seed, amp=spec.amp)
    cache = EmbeddingCache(getattr(spec, "cache_dir", None), log)

    tr, va = run.fold_split(fold, seed)
    pool = cache.get(model, identity, "AMi-Br-train", tr + va, cfg.preprocess, run.device)
    xtr, ytr, _ = pool.take(tr)
    xva, yva, nva = pool.take(va) if va else (None, None, [])
    caches, extract_s = {"AMi-Br-train": pool.entry.name}, pool.seconds
    log(f"[{fdir.name}] {cfg.name}/linear: {len(tr)} train ({int(ytr.sum())} atypical), {len(va)} val embeddings "
        f"of dim {xtr.shape[1]} ({'extracted' if pool.extracted else 'from cache'} {pool.entry})")

    # -- the head, on the CPU --------------------------------------------------------------
    torch.manual_seed(seed)
    head = nn.Linear(xtr.shape[1], 1)
    opt = _optimizer(head.parameters(), r)
    steps_per_epoch = max(1, len(tr) // r.batch_size)
    sched = _scheduler(opt, r, steps_per_epoch * r.epochs, steps_per_epoch * r.warmup_epochs)
    g = torch.Generator().manual_seed(seed)
    start_epoch, best, history, bad_epochs, best_head = 0, {"ba": -1.0, "epoch": -1, "auroc": float("nan")}, [], 0, None
    state_path = fdir / "state.pt"
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        g.set_state(st["rng"])
        start_epoch, best, history, bad_epochs = st["epoch"] + 1, st["best"], st["history"], st["bad_epochs"]
        best_head = st.get("best_head")
        log(f"[{fdir.name}] resuming after epoch {st['epoch']} (best val BA {best['ba']:.4f} @ {best['epoch']})")
    if r.ema_decay:
        log(f"[{fdir.name}] note: ema_decay={r.ema_decay} is not applied to the linear probe")

    for epoch in range(start_epoch, r.epochs):
        t0 = time.time()
        if r.sampling == "balanced":
            idx = D.balanced_indices(ytr, steps_per_epoch * r.batch_size, g)
        else:
            idx = torch.randperm(len(tr), generator=g)[: steps_per_epoch * r.batch_size]
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            b = idx[step * r.batch_size:(step + 1) * r.batch_size]
            loss = _loss(head(xtr[b]).squeeze(1), ytr[b], r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r.scheduler == "cosine":
                sched.step()
            loss_sum += loss.item()
        row = {"epoch": epoch, "train_loss": loss_sum / steps_per_epoch, "lr": opt.param_groups[0]["lr"],
               "seconds": round(time.time() - t0, 3)}
        if xva is not None:
            m = _metrics_or_reason(yva.numpy(), _probs(head, xva))
            row.update({"val_ba": m.get("balanced_accuracy"), "val_auroc": m.get("auroc")})
            ba = m.get("balanced_accuracy", -1.0)
            if r.scheduler == "plateau":
                sched.step(ba)
            if ba > best["ba"]:
                best = {"ba": ba, "epoch": epoch, "auroc": m.get("auroc")}
                best_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
                bad_epochs = 0
            else:
                bad_epochs += 1
        history.append(row)
        log(f"[{fdir.name}] epoch {epoch + 1}/{r.epochs} loss {row['train_loss']:.4f}"
            + (f" val BA {row['val_ba']:.4f} AUROC {row['val_auroc']:.4f} (best {best['ba']:.4f} @ {best['epoch'] + 1})"
               if xva is not None and row.get("val_ba") is not None else ""))
        atomic_torch_save({"head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                           "epoch": epoch, "best": best, "history": history, "bad_epochs": bad_epochs,
                           "rng": g.get_state(), "best_head": best_head}, state_path)
        run._write_history(fdir, history)
        if xva is not None and r.early_stop_patience and bad_epochs >= r.early_stop_patience:
            log(f"[{fdir.name}] early stop: no val BA gain for {bad_epochs} epochs")
            break
    train_seconds = time.time() - t_start

    # -- final head: the best validation epoch (fold) or the last epoch (all training crops) --
    if fold is None or best_head is None:
        best = {"ba": None, "epoch": len(history) - 1, "auroc": None} if fold is None else best
        best_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_head)
    getattr(classifier_of(model), HEAD).load_state_dict({k: v.to(run.device) for k, v in best_head.items()})
    meta = {"epoch": best["epoch"], "val_ba": best["ba"], "method": "linear", "model": cfg.name}
    if random_init:  # nothing could rebuild this backbone: keep all of it
        save_weights(model, fdir / "best.safetensors", meta)
    else:
        save_weights(model, fdir / "best.safetensors", {**meta, "base_weights": identity["weights"].get("source")},
                     keys={HEAD_PREFIX + k for k in best_head})

    # -- evaluation, from the cache ----------------------------------------------------------
    resolved = spec.resolved()
    out = {"fold": fold if fold is not None else "all", "model": cfg.name, "method": spec.method,
           "best_epoch": best["epoch"], "epochs_run": len(history), "train_seconds": round(train_seconds, 1),
           "versions": versions(), "device": str(run.device),
           "split": {k: run.split.get(k) for k in ("folds_sha256", "train_fingerprint")},
           "selection": "epoch with the best validation balanced accuracy (threshold 0.5)"
           if fold is not None else f"last epoch of a fixed {r.epochs}-epoch schedule",
           "weights_source": resolved["weights_source"], "random_init": resolved["random_init"],
           "tiny_stand_in": spec.tiny, "weights": weights_record(model),
           "augmentation": "none: the head is trained on cached embeddings of the evaluation preprocessing",
           "validation": None, "tests": {}, "predictions": {}}
    t0 = time.time()
    if xva is not None:
        pv = _probs(head, xva)
        m = _metrics_or_reason(yva.numpy(), pv)
        try:
            thr, thr_ba = best_threshold(yva.numpy(), pv)
            m["best_threshold"], m["best_threshold_ba"] = thr, thr_ba
        except MetricError:
            pass
        out["validation"] = m
        out["predictions"]["validation"] = _rows(nva, yva, pv)
    for name, samples in available_eval_sets(spec.data_root).items():
        if name not in spec.eval_sets:
            continue
        if isinstance(samples, str):
            out["tests"][name] = {"absent": samples}
            log(f"[{fdir.name}] {name}: absent ({samples})")
            continue
        samples = _subset(samples, spec.max_eval)
        emb = cache.get(model, identity, name, samples, cfg.preprocess, run.device)
        caches[name] = emb.entry.name
        extract_s += emb.seconds
        x, y, names = emb.take(samples)
        p = _probs(head, x)
        out["tests"][name] = _metrics_or_reason(y.numpy(), p)
        out["predictions"][name] = _rows(names, y, p)
        t = out["tests"][name]
        if "balanced_accuracy" in t:
            log(f"[{fdir.name}] {name}: BA {t['balanced_accuracy']:.4f} AUROC {t['auroc']:.4f} (n={t['n']})")
    out["eval_seconds"] = round(time.time() - t0, 1)
    out["embedding_cache"] = {"root": str(cache.root), "entries": caches,
                              "extract_seconds_this_fold": round(extract_s, 1)}
    atomic_write_json(fdir / "metrics.json", out)
    state_path.unlink(missing_ok=True)
    return out
