"""Where pretrained weights come from, and refusing to train without them.

``load_pretrained(net, cfg, weights)`` fills the registry's architecture (built by
:func:`ami.train.models.build_backbone`) from, in this order:

1. ``weights`` (``--weights``): a local ``.safetensors`` file, a state-dict file read with
   ``torch.load(weights_only=True)`` (pickled code is never executed), a downloaded hub snapshot
   folder holding one of those, or ``hf-hub:ORG/NAME``;
2. otherwise the entry's hub id: first the local Hugging Face cache (works offline, and with
   ``HF_HUB_OFFLINE=1``), then the hub itself when it is reachable (a 3-second probe first, so an
   offline machine fails at once instead of after a minute of retries; behind an HTTPS proxy named
   by the environment, the probe connects to the proxy, as huggingface_hub's client will).

Keys and shapes must match the architecture exactly, except the classifier head (the entry's
``head``), which is always the fresh one-logit head; a foreign key layout may be renamed by timm's
own converter, but a conversion that changes a tensor's shape (a resampled patch or position
embedding) is refused. When nothing can be loaded the function raises
:class:`WeightsUnavailable` naming every source it tried and how to supply one; a checkpoint that
does not fit raises :class:`WeightsMismatch` listing the offending keys. Nothing here ever falls
back to random weights: that is ``--random-init``, and only that.

Trained weights (a fold's ``best.safetensors``) are written and read back by :func:`save_weights`
and :func:`load_weights`: all tensors, or only the trained ones (``contents=trainable`` in the file's
metadata; the frozen rest comes back from the weight source, :func:`load_partial_state`).
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ami.runtime import DIST_NAME, hashing
from ami.runtime.atomic import atomic_write_via
from ami.runtime.errors import Unavailable

from .registry import ModelConfig

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
PACKAGE_PREFIX = "pkg:"  # pkg:MODULE/relative/path - a weights file shipped inside an installed package
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
LOCAL_FILES = HUB_FILES + ("pytorch_model.safetensors",)
PROBE_TIMEOUT_S = 3.0
_SHA_MEMO: dict[tuple, str] = {}
CONTENTS = "contents"  # safetensors metadata key of a checkpoint ...
TRAINABLE = "trainable"  # ... whose value marks a file holding only the trained tensors


class WeightsUnavailable(Unavailable, RuntimeError):
    """No weight source for a pretrained entry could be reached."""


class WeightsMismatch(WeightsUnavailable):
    """A weight source was read but its tensors do not fit the registry's architecture."""


def hub_repo(hub_id: str) -> str:
    for p in HUB_PREFIXES:
        if hub_id.startswith(p):
            return hub_id[len(p):]
    return hub_id


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def file_sha256(path: Path) -> str:
    """:func:`ami.runtime.hashing.file_sha256`, memoised per (file, size, mtime): weights are large."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = hashing.file_sha256(path)
    return _SHA_MEMO[key]


def how_to_supply(cfg: ModelConfig) -> str:
    repo = hub_repo(cfg.hub_id) if cfg.hub_id else None
    lines = ["Supply one of:",
             "  --weights FILE        a local .safetensors or state-dict file (.bin/.pth/.pt, read without executing "
             "pickled code), or a downloaded hub snapshot folder holding one"]
    if repo:
        lines.append("  --weights hf-hub:ORG/NAME  another hub repository")
        lines.append(f"  hub access            accept the model's terms at https://huggingface.co/{repo}, then "
                     "`hf auth login` (or export HF_TOKEN=...); to work offline afterwards: "
                     f"`hf download {repo}` once, then HF_HUB_OFFLINE=1")
    lines.append("  --random-init         train from random weights instead (every record of the run then says "
                 "it is NOT the pretrained model)")
    return "\n".join(lines)


def _unavailable(cfg: ModelConfig, tried: list[str]) -> WeightsUnavailable:
    body = "\n".join(f"  {i + 1}. {t}" for i, t in enumerate(tried)) or "  (none)"
    return WeightsUnavailable(
        f"No pretrained weights for {cfg.name} ({cfg.display}); refusing to train a random backbone under its name.\n"
        f"Sources tried, in order:\n{body}\n{how_to_supply(cfg)}")


# -- reading one file -------------------------------------------------------------------------
def _as_state_dict(obj, origin: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in ("state_dict", "model", "module", "model_state_dict"):
            if isinstance(obj.get(k), dict) and all(isinstance(v, torch.Tensor) for v in obj[k].values()):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{origin} does not hold a state dict (a mapping of tensor names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a local file. Raises ValueError with a reason when the file cannot be used."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # any reader failure is "unreadable", with its reason
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        return _as_state_dict(sd, str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = f"it references {m.group(1)}" if m else "not a plain tensor container"
        raise ValueError(f"{path} holds pickled objects other than tensors ({why}); it was NOT unpickled "
                         "(weights are read with torch.load(weights_only=True)). Save a plain state dict, "
                         "or convert it to .safetensors") from None
    except Exception as e:  # BLE001
        raise ValueError(f"{path} is not a readable state-dict file ({type(e).__name__}: {e})") from None
    return _as_state_dict(obj, str(path))


# -- sources ----------------------------------------------------------------------------------
def _from_path(p: Path, tried: list[str]):
    if p.is_dir():
        cands = [p / n for n in LOCAL_FILES if (p / n).is_file()]
        if not cands:
            tried.append(f"--weights {p}: a folder without any of {', '.join(LOCAL_FILES)}")
            return None
        p = cands[0]
    if not p.is_file():
        tried.append(f"--weights {p}: no such file")
        return None
    try:
        sd = read_state_dict(p)
    except (ValueError, OSError) as e:
        tried.append(f"--weights {p}: {e}")
        return None
    return sd, {"kind": "file", "source": str(p), "sha256": file_sha256(p)}


def package_file(spec: str) -> Path:
    """The file named by ``pkg:MODULE/relative/path`` inside the installed package MODULE, found
    through importlib.resources (wherever pip put it). Raises ValueError with the reason."""
    import importlib.resources as ir

    body = spec[len(PACKAGE_PREFIX):] if spec.startswith(PACKAGE_PREFIX) else spec
    module, _, rel = body.partition("/")
    if not module or not rel:
        raise ValueError(f"{spec!r} is not of the form pkg:MODULE/relative/path")
    try:
        root = ir.files(module)
    except ModuleNotFoundError:
        raise ValueError(f"the package {module!r} is not installed") from None
    path = Path(str(root.joinpath(*rel.split("/"))))
    if not path.is_file():
        raise ValueError(f"the installed package {module!r} has no file {rel} (looked at {path})")
    return path


def _from_package(spec: str, tried: list[str], label: str, extra: str | None):
    try:
        path = package_file(spec)
        sd = read_state_dict(path)
    except (ValueError, OSError) as e:
        how = f" (pip install '{DIST_NAME}[{extra}]')" if extra else ""
        tried.append(f"{label} {spec}: {e}{how}")
        return None
    return sd, {"kind": "package", "source": spec, "file": str(path.name), "sha256": file_sha256(path)}


def rename_keys(sd: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    """Apply an entry's ``weights_rename`` rules (ordered (regex, replacement) pairs, each applied
    once per key). Two keys renamed to one name, or a rule that renames nothing, raise ValueError:
    renaming is by explicit rules, and a rule that no longer matches means the checkpoint changed."""
    if not rules:
        return sd
    out: dict[str, torch.Tensor] = {}
    used = [0] * len(rules)
    for k, v in sd.items():
        new = k
        for i, (pat, repl) in enumerate(rules):
            new2 = re.sub(pat, repl, new)
            if new2 != new:
                used[i] += 1
                new = new2
        if new in out:
            raise ValueError(f"renaming maps two checkpoint keys onto {new!r}")
        out[new] = v
    unused = [rules[i][0] for i, n in enumerate(used) if n == 0]
    if unused:
        raise ValueError(f"renaming rules that match no checkpoint key: {unused[:5]}")
    return out


def probe_target(endpoint: str) -> tuple[str, int, str | None]:
    """(host, port, proxy variable or None) that a connection to the hub ``endpoint`` goes through, as
    huggingface_hub's HTTP client (httpx, ``trust_env``) chooses it: the scheme's proxy from the
    environment (``HTTPS_PROXY``/``https_proxy``, ``HTTP_PROXY`` for an http endpoint, else
    ``ALL_PROXY``) unless ``NO_PROXY``/``no_proxy`` names the host; otherwise the endpoint itself."""
    import urllib.request

    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    proxies = urllib.request.getproxies_environment()
    scheme = "http" if url.scheme == "http" else "https"
    for key in (scheme, "all"):
        proxy = proxies.get(key)
        if proxy and not urllib.request.proxy_bypass_environment(host, proxies):
            p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
            default = 443 if p.scheme == "https" else 1080 if p.scheme.startswith("socks") else 80
            return p.hostname or "", p.port or default, f"{key}_proxy"
    return host, port, None


def _probe_hub() -> str | None:
    """None when the hub endpoint (or the proxy the environment routes it through) accepts a TCP
    connection within a few seconds, else the reason."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host, port, proxy = probe_target(endpoint)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        via = f"proxy {host}:{port} (from {proxy.upper()}, for {endpoint})" if proxy else f"{host}:{port}"
        return f"{via} unreachable ({e.__class__.__name__}: {e})"


def _revision_of(path: Path) -> str | None:
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


class CachedCopiesDisagree(WeightsUnavailable):
    """The local hub cache holds the same repository under two spellings, with different files."""


def cached_spellings(repo: str, cache: Path) -> list[str]:
    """Spellings of ``repo`` present in the local hub cache, the exact one first. The hub treats
    repository ids case-insensitively (``MahmoodLab/UNI`` and ``MahmoodLab/uni`` are one repository),
    but its cache keeps one folder per spelling that was downloaded."""
    want = "models--" + repo.replace("/", "--")
    found = []
    try:
        found = sorted(p.name for p in Path(cache).iterdir()
                       if p.is_dir() and p.name.lower() == want.lower() and p.name != want)
    except OSError:
        pass
    others = [n[len("models--"):].replace("--", "/", 1) for n in found]
    return [repo] + others


def _cache_hit(repo: str, cache: Path, tried: list[str], label: str, hub_id: str):
    """(path, file name, spelling) of the checkpoint in the local cache under any spelling of ``repo``."""
    from huggingface_hub import try_to_load_from_cache

    hits = []
    for spelling in cached_spellings(repo, cache):
        for fname in HUB_FILES:
            hit = try_to_load_from_cache(spelling, fname, cache_dir=str(cache))
            if isinstance(hit, str) and Path(hit).is_file():
                hits.append((Path(hit), fname, spelling))
                break
    if len(hits) > 1:
        shas = {h[2]: file_sha256(h[0]) for h in hits}
        if len(set(shas.values())) > 1:
            lines = "\n".join(f"  hf-hub:{sp}: {path} (sha256 {shas[sp][:16]}...)" for path, _, sp in hits)
            raise CachedCopiesDisagree(
                f"{label} {hub_id}: the local Hugging Face cache ({cache}) holds this repository under "
                f"{len(hits)} spellings, and their checkpoints differ:\n{lines}\n"
                "The hub treats the names as one repository, so one copy is stale or altered. Delete the folder you "
                "do not want (or `hf cache delete`), or choose one with --weights FILE.")
    return hits[0] if hits else None


def _from_hub(hub_id: str, tried: list[str], label: str):
    repo = hub_repo(hub_id)
    cache = hub_cache_dir()
    try:
        importlib.import_module("huggingface_hub")
    except ImportError:
        tried.append(f"{label} {hub_id}: huggingface_hub is not installed (pip install '{DIST_NAME}[train]')")
        return None
    hit = _cache_hit(repo, cache, tried, label, hub_id)
    if hit is not None:
        path, fname, spelling = hit
        try:
            sd = read_state_dict(path)
        except (ValueError, OSError) as e:
            tried.append(f"{label} {hub_id}: cached {fname} (as hf-hub:{spelling}) unusable: {e}")
        else:
            info = {"kind": "hub-cache", "source": f"hf-hub:{repo}", "file": fname,
                    "revision": _revision_of(path), "sha256": file_sha256(path)}
            if spelling != repo:
                info["cached_as"] = f"hf-hub:{spelling}"
            return sd, info
    where = f"not in the local Hugging Face cache ({cache})"
    if _offline():
        tried.append(f"{label} {hub_id}: {where}; HF_HUB_OFFLINE is set, so the hub was not asked")
        return None
    reason = _probe_hub()
    if reason:
        tried.append(f"{label} {hub_id}: {where}; hub {reason}")
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    for fname in HUB_FILES:
        try:
            path = Path(hf_hub_download(repo, fname, cache_dir=str(cache)))
        except EntryNotFoundError:
            continue
        except GatedRepoError:
            tried.append(f"{label} {hub_id}: gated repository and this token has no access (request it at "
                         f"https://huggingface.co/{repo}, then log in)")
            return None
        except RepositoryNotFoundError:
            tried.append(f"{label} {hub_id}: repository not found or not visible without a token")
            return None
        except Exception as e:  # network/HTTP failures are reported, not raised
            tried.append(f"{label} {hub_id}: download of {fname} failed ({type(e).__name__}: {e})")
            return None
        try:
            sd = read_state_dict(path)
        except (ValueError, OSError) as e:
            tried.append(f"{label} {hub_id}: downloaded {fname} unusable: {e}")
            return None
        return sd, {"kind": "hub", "source": f"hf-hub:{repo}", "file": fname, "revision": _revision_of(path),
                    "sha256": file_sha256(path)}
    tried.append(f"{label} {hub_id}: none of {', '.join(HUB_FILES)} in the repository")
    return None


# -- fitting tensors into the architecture ----------------------------------------------------
def _is_head(key: str, head: str) -> bool:
    return key == head or key.startswith(head + ".")


def _mismatches(net_sd: dict, sd: dict, head: str) -> tuple[list, list, list]:
    want = {k: v for k, v in net_sd.items() if not _is_head(k, head)}
    got = {k: v for k, v in sd.items() if not _is_head(k, head)}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = sorted(f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(want[k].shape)}"
                    for k in set(want) & set(got) if tuple(got[k].shape) != tuple(want[k].shape))
    return missing, unexpected, shapes


def _fmt(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


class ShapeConverted(WeightsMismatch):
    """timm's checkpoint filter would fit a checkpoint by changing tensor shapes (resampling)."""


def _reshaped(before: dict, after: dict, head: str) -> list[str]:
    """Tensors that keep their name through a conversion but not their shape (head excluded)."""
    return sorted(f"{k}: {tuple(before[k].shape)} -> {tuple(v.shape)}" for k, v in after.items()
                  if k in before and not _is_head(k, head) and tuple(v.shape) != tuple(before[k].shape))


def _timm_converted(net: nn.Module, sd: dict, cfg: ModelConfig, origin: str) -> dict | None:
    """The checkpoint through timm's own converter for the architecture (foreign key layouts such as
    the original DINOv2 or open_clip names), when the result fits the network exactly; else None.
    A conversion that changes any tensor's shape (a resampled patch or position embedding: the sign of
    a wrong patch or image size in the entry) raises :class:`ShapeConverted`: the load is strict."""
    filt = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    if filt is None:
        return None
    try:
        sd2 = filt(dict(sd), net)
    except Exception:  # a converter that cannot handle it changes nothing
        return None
    if sd2 is None or any(_mismatches(net.state_dict(), sd2, cfg.head)):
        return None
    changed = _reshaped(sd, sd2, cfg.head)
    if changed:
        raise ShapeConverted(
            f"{origin} fits {cfg.name} ({cfg.arch}) only if timm's checkpoint filter changes the shape of "
            f"{len(changed)} tensor(s): {_fmt(changed, 6)}. ami loads pretrained weights strictly and never "
            "resamples them: check the entry's patch size, image size and create_kwargs against the checkpoint.")
    return sd2


def _mismatch_error(origin: str, cfg: ModelConfig, missing: list, unexpected: list, shapes: list) -> WeightsMismatch:
    parts = [f"{origin} does not fit {cfg.name}'s architecture ({cfg.arch} with the registry's create_kwargs):"]
    if missing:
        parts.append(f"  missing from the checkpoint ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        parts.append(f"  unexpected in the checkpoint ({len(unexpected)}): {_fmt(unexpected)}")
    if shapes:
        parts.append(f"  shape mismatches ({len(shapes)}): {_fmt(shapes, 6)}")
    parts.append("Is this the checkpoint of this model? (Kwargs such as mlp_layer=SwiGLUPacked, reg_tokens or "
                 "init_values decide which tensors exist.)")
    return WeightsMismatch("\n".join(parts))


def fit_state_dict(net: nn.Module, sd: dict[str, torch.Tensor], cfg: ModelConfig, origin: str) -> dict:
    """Load ``sd`` into ``net``: strict on every key and shape except the classifier head. A checkpoint
    in a foreign key layout goes through timm's converter for the architecture, which may rename keys
    but never change a tensor's shape (:class:`ShapeConverted`). Returns a report."""
    mismatch = _mismatches(net.state_dict(), sd, cfg.head)
    converted = False
    if any(mismatch):
        sd2 = _timm_converted(net, sd, cfg, origin)
        if sd2 is None:
            raise _mismatch_error(origin, cfg, *mismatch)
        sd, converted = sd2, True
    skipped = sorted(k for k in sd if _is_head(k, cfg.head))
    body = {k: v for k, v in sd.items() if not _is_head(k, cfg.head)}
    result = net.load_state_dict(body, strict=False)
    left = [k for k in result.missing_keys if not _is_head(k, cfg.head)]
    if left or result.unexpected_keys:  # cannot happen after the checks above; never load half a model
        raise WeightsMismatch(f"{origin}: partial load (missing {left[:5]}, unexpected {result.unexpected_keys[:5]})")
    return {"tensors_loaded": len(body), "head_kept_fresh": cfg.head,
            "head_tensors_ignored": skipped, "converted_by_timm_filter": converted,
            "missing_keys": [], "unexpected_keys": []}


def load_pretrained(net: nn.Module, cfg: ModelConfig, weights: str | os.PathLike | None = None) -> dict:
    """Fill ``net`` from the first available source (see module docstring). Returns what was loaded.

    The returned record is also attached to the network as ``net.ami_weights`` so that training
    and caches can say exactly which weights they used.
    """
    tried: list[str] = []
    got = None
    if weights:
        w = str(weights)
        if w.startswith(HUB_PREFIXES):
            got = _from_hub(w, tried, "--weights")
        elif w.startswith(PACKAGE_PREFIX):
            got = _from_package(w, tried, "--weights", cfg.weights_extra)
        else:
            got = _from_path(Path(w).expanduser(), tried)
    elif cfg.hub_id:
        got = _from_hub(cfg.hub_id, tried, "registry hub id")
    elif cfg.weights_file:
        got = _from_package(cfg.weights_file, tried, "registry weights file", cfg.weights_extra)
    else:
        tried.append(f"{cfg.name} has no hub id and no --weights was given")
    if got is None:
        raise _unavailable(cfg, tried)
    sd, info = got
    if cfg.weights_rename and not set(sd) <= set(net.state_dict()):  # foreign names: the entry's rules
        try:
            sd = rename_keys(sd, cfg.weights_rename)
        except ValueError as e:
            raise WeightsMismatch(f"{info['source']}: {e}") from None
        info["renamed_by_rules"] = len(cfg.weights_rename)
    info.update(fit_state_dict(net, sd, cfg, info["source"]))
    net.ami_weights = info
    return info


def weights_record(model: nn.Module) -> dict | None:
    """The ``ami_weights`` record of the (possibly wrapped) backbone inside ``model``, if any."""
    for m in model.modules():
        rec = getattr(m, "ami_weights", None)
        if rec is not None:
            return rec
    return None


# -- trained weights (a fold's best.safetensors) ----------------------------------------------------
def save_weights(model: nn.Module, path: Path, metadata: dict | None = None, keys: set[str] | None = None) -> None:
    """All tensors, or with ``keys`` only those (the trained part of a linear/LoRA model, marked
    ``contents=trainable`` in the metadata; the frozen rest comes back from its weight source)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if keys is None or k in keys}
    metadata = {**(metadata or {}), **({CONTENTS: TRAINABLE} if keys is not None else {})}
    atomic_write_via(path, lambda tmp: save_file(sd, str(tmp), metadata={k: str(v) for k, v in metadata.items()}))


def is_partial(path: Path) -> bool:
    """True when the checkpoint holds only the trained tensors (linear/LoRA on pretrained weights)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get(CONTENTS) == TRAINABLE


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a file written by :func:`save_weights`: a complete one strictly, a trainable-only one onto
    the tensors the network was built with. Tensors that do not fit raise RuntimeError / KeyError."""
    from safetensors.torch import load_file

    partial = is_partial(path)
    sd = load_file(str(path))
    if partial:
        load_partial_state(model, sd)
    else:
        model.load_state_dict(sd)


def load_partial_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load a trainable-only state dict: every key must exist in the model; the rest stays as built."""
    unknown = sorted(set(sd) - set(model.state_dict()))
    if unknown:
        raise KeyError(f"partial state has keys the model lacks: {unknown[:8]}")
    model.load_state_dict(sd, strict=False)
