"""Linear probing on cached embeddings: the frozen backbone runs once per crop, not once per epoch.

``ami-train -m uni --method linear`` lands here: :class:`LinearProbeTrainer` is the method's
:class:`~ami.train.loop.FoldTrainer` (chosen by :func:`ami.train.fit.trainer_for`). For
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
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ami.runtime.datasets import Sample, fingerprint
from ami.runtime.errors import BadInput
from ami.runtime.hashing import file_sha256
from ami.runtime.preprocess import Preprocess
from ami.runtime.rundir import FoldDir

from . import data as D
from .adapt import HEAD, classifier_of, init_head
from .loop import (
    FoldTrainer,
    LRSchedule,
    Progress,
    atomic_torch_save,
    autocast,
    epoch_batches,
    load_resume_state,
    make_optimizer,
    metrics_or_reason,
    recipe_loss,
    steps_per_epoch,
    versions,
    write_history,
)
from .models import create
from .registry import ModelConfig
from .weights import save_weights, weights_record

ENV_CACHE = "AMI_CACHE_DIR"
MANIFEST = "manifest.json"
EMB_FILE = "embeddings.safetensors"
HEAD_PREFIX = f"net.{HEAD}."  # state-dict prefix of the head inside LogitModel(EmbeddingClassifier)


class EmbeddingCacheError(BadInput, RuntimeError):
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
        "model": cfg.name, "arch": (cfg.tiny_arch or cfg.arch) if tiny else cfg.arch,
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
                    "built_with": versions(), "device": str(device),
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


@torch.inference_mode()
def extract(model: nn.Module, samples: list[Sample], pre: Preprocess, device: torch.device, amp: str = "none",
            batch: int = 64, chunk: int = 512, desc: str = "embed") -> torch.Tensor:
    """Embeddings [N, D] (float32, CPU) of the frozen backbone, in ``samples`` order."""
    from tqdm.auto import tqdm

    clf = classifier_of(model)
    clf.eval()
    out = []
    bar = tqdm(total=len(samples), desc=desc, unit="crop", mininterval=2.0, disable=None, leave=False)
    for i in range(0, len(samples), chunk):
        cs = D.load_crops(samples[i:i + chunk], pre)
        for j in range(0, len(cs), batch):
            x = D.eval_batch(cs.images[j:j + batch], pre).to(device)
            with autocast(device, amp):
                out.append(clf.features(x).float().cpu())
            bar.update(min(batch, len(cs) - j))
    bar.close()
    return torch.cat(out) if out else torch.zeros(0, clf.embed_dim)


# -- the fold -------------------------------------------------------------------------------
def _probs(head: nn.Linear, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(head(x).squeeze(1)).numpy().astype(np.float64)


def _clone(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


@dataclass
class _Probe:
    """The frozen backbone of a fold, its cache and the fold's embeddings."""

    model: nn.Module
    identity: dict
    cache: EmbeddingCache
    xtr: torch.Tensor
    ytr: torch.Tensor
    xva: torch.Tensor | None
    yva: torch.Tensor | None
    nva: list[str]
    caches: dict = field(default_factory=dict)  # set name -> cache entry used
    extract_seconds: float = 0.0


class LinearProbeTrainer(FoldTrainer):
    """``linear``: the frozen backbone embeds every crop once (:class:`EmbeddingCache`); a linear
    head trains on those vectors on the CPU (no augmentation, no EMA); the fold ends with the head of
    the best validation epoch (the all-crops model: the last epoch)."""

    def train(self, run, fd: FoldDir) -> dict:
        t_start = time.time()
        probe = self._embed(run, fd)
        head, progress, best_head = self._fit_head(run, fd, probe)
        train_seconds = time.time() - t_start
        self._save(run, fd, probe, head, progress, best_head)
        return self._evaluate(run, fd, probe, head, progress, train_seconds)

    def _embed(self, run, fd: FoldDir) -> _Probe:
        spec, cfg, r = run.spec, run.cfg, run.recipe
        random_init = spec.random_init or not cfg.pretrained
        # the frozen backbone: one for all folds (a random one is seeded by the recipe, not the fold)
        torch.manual_seed(r.seed)
        model = create(cfg, "linear", weights=spec.weights, random_init=spec.random_init, tiny=spec.tiny)
        model.to(run.device).eval()
        identity = extractor_identity(cfg, model, tiny=spec.tiny, random_init=random_init, seed=r.seed, amp=spec.amp)
        cache = EmbeddingCache(getattr(spec, "cache_dir", None), run.log)
        tr, va = run.fold_split(fd.fold, self.seed(run, fd))
        pool = cache.get(model, identity, "AMi-Br-train", tr + va, cfg.preprocess, run.device)
        xtr, ytr, _ = pool.take(tr)
        xva, yva, nva = pool.take(va) if va else (None, None, [])
        run.log(f"[{fd.name}] {cfg.name}/linear: {len(tr)} train ({int(ytr.sum())} atypical), {len(va)} val "
                f"embeddings of dim {xtr.shape[1]} ({'extracted' if pool.extracted else 'from cache'} {pool.entry})")
        return _Probe(model, identity, cache, xtr, ytr, xva, yva, nva, {"AMi-Br-train": pool.entry.name},
                      pool.seconds)

    def _fit_head(self, run, fd: FoldDir, probe: _Probe) -> tuple[nn.Linear, Progress, dict | None]:
        """The head's epochs on the CPU (resumed from state.pt); returns it, the progress and the best head."""
        r = run.recipe
        seed = self.seed(run, fd)
        torch.manual_seed(seed)
        head = nn.Linear(probe.xtr.shape[1], 1)
        if r.head_init != "linear":  # nn.Linear's own init already ran; the other one draws again
            init_head(head, r.head_init)
        opt = make_optimizer(head.parameters(), r)
        steps = steps_per_epoch(len(probe.ytr), r)
        schedule = LRSchedule(opt, r, steps)
        g = torch.Generator().manual_seed(seed)
        progress, best_head = Progress(), None
        if fd.state.exists():
            st = load_resume_state(fd.state, ("head", "opt", "sched", "rng"))
            head.load_state_dict(st["head"])
            opt.load_state_dict(st["opt"])
            schedule.load_state_dict(st["sched"])
            g.set_state(st["rng"])
            progress, best_head = Progress.from_state(st), st.get("best_head")
            run.log(progress.resumed(fd))
        if r.ema_decay:
            run.log(f"[{fd.name}] note: ema_decay={r.ema_decay} is not applied to the linear probe")
        for epoch in range(progress.start_epoch, r.epochs):
            t0 = time.time()
            loss_sum = 0.0
            for b in epoch_batches(probe.ytr, r, steps, g):
                loss = recipe_loss(head(probe.xtr[b]).squeeze(1), probe.ytr[b], r)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.after_step()
                loss_sum += loss.item()
            row = {"epoch": epoch, "train_loss": loss_sum / steps, "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.time() - t0, 3)}
            if probe.xva is not None:
                m = metrics_or_reason(probe.yva.numpy(), _probs(head, probe.xva))
                schedule.after_validation(m.get("balanced_accuracy", -1.0))
                if progress.validated(epoch, row, m):
                    best_head = _clone(head.state_dict())
            progress.history.append(row)
            run.log(progress.epoch_line(fd, r.epochs, row))
            atomic_torch_save({"head": head.state_dict(), "opt": opt.state_dict(), "sched": schedule.state_dict(),
                               **progress.state(epoch), "rng": g.get_state(), "best_head": best_head}, fd.state)
            write_history(fd.history, progress.history)
            if probe.xva is not None and progress.stop_early(r.early_stop_patience):
                run.log(f"[{fd.name}] early stop: no val BA gain for {progress.bad_epochs} epochs")
                break
        return head, progress, best_head

    @staticmethod
    def _save(run, fd: FoldDir, probe: _Probe, head: nn.Linear, progress: Progress, best_head: dict | None) -> None:
        """The final head (best validation epoch; the all-crops model: the last) into the model and
        best.safetensors: the head only, or everything when the backbone was randomly initialised
        (which no weight source can rebuild)."""
        if fd.is_all or best_head is None:
            if fd.is_all:
                progress.select_last()
            best_head = _clone(head.state_dict())
        head.load_state_dict(best_head)
        getattr(classifier_of(probe.model), HEAD).load_state_dict({k: v.to(run.device) for k, v in best_head.items()})
        best = progress.best
        meta = {"epoch": best["epoch"], "val_ba": best["ba"], "method": "linear", "model": run.cfg.name}
        if run.spec.random_init or not run.cfg.pretrained:
            save_weights(probe.model, fd.weights, meta)
        else:
            save_weights(probe.model, fd.weights, {**meta, "base_weights": probe.identity["weights"].get("source")},
                         keys={HEAD_PREFIX + k for k in best_head})

    def _evaluate(self, run, fd: FoldDir, probe: _Probe, head: nn.Linear, progress: Progress,
                  train_seconds: float) -> dict:
        """metrics.json from the cache: validation and every test set present."""
        cfg = run.cfg

        def validation():
            return probe.nva, probe.yva.numpy(), _probs(head, probe.xva)

        def score(name: str, samples: list[Sample]):
            emb = probe.cache.get(probe.model, probe.identity, name, samples, cfg.preprocess, run.device)
            probe.caches[name] = emb.entry.name
            probe.extract_seconds += emb.seconds
            x, y, names = emb.take(samples)
            return names, y.numpy(), _probs(head, x)

        out = self.record(run, fd, progress, train_seconds, weights=weights_record(probe.model),
                          augmentation="none: the head is trained on cached embeddings of the evaluation preprocessing")
        self.evaluate(run, fd, out, validation if probe.xva is not None else None, score)
        out["embedding_cache"] = {"root": str(probe.cache.root), "entries": probe.caches,
                                  "extract_seconds_this_fold": round(probe.extract_seconds, 1)}
        return self.finish(fd, out)
