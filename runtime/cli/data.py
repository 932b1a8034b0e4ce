"""ami-data: check, fetch and split the benchmark's datasets."""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import typer

from ..datasets import DATASETS, ENV_DATA_ROOT, require_data_root, resolve_data_root, verify_dataset
from ..errors import BadInput, CheckFailed, Unavailable
from ..splits import FOLDS_FILE, SplitError, check_against_data, folds_sha256, load_folds, pinned_sha256
from . import DATA_ROOT_HELP
from .contract import AmiTyper, run

# ami-data's help is rendered by rich: one example per paragraph (a blank line between examples).
VERIFY_EPILOG = ("Examples:\n\n"
                 "  ami-data verify --data-root ~/data/ami-br-benchmark    # every dataset, every PNG decoded\n\n"
                 "  ami-data verify --quick    # counts and fingerprints only, at $AMI_DATA_ROOT or the default root\n\n"
                 "  ami-data verify --data-root ~/data/ami-br-benchmark --dataset AMi-Br --dataset AtNorM-MD"
                 "    # a partial data root, on purpose")
FOLDS_EPILOG = ("Examples:\n\n"
                "  ami-data folds --data-root ~/data/ami-br-benchmark\n\n"
                "  AMI_DATA_ROOT=~/data/ami-br-benchmark ami-data folds")
DOWNLOAD_EPILOG = ("Examples:\n\n"
                   "  ami-data download --data-root ~/data/ami-br-benchmark    # then: ami-data verify with the same root\n\n"
                   "  ami-data download --data-root ~/data/ami-br-benchmark --timeout 60    # a slow network")

app = AmiTyper(prog="ami-data", no_args_is_help=True, help=(
    "Check, download and split the AMi-Br / AtNorM-Br / AtNorM-MD datasets.\n\n"
    "Examples:\n\n"
    "  ami-data verify --data-root ~/data/ami-br-benchmark\n\n"
    "  AMI_DATA_ROOT=~/data/ami-br-benchmark ami-data folds\n\n"
    "  ami-data download --data-root ~/data/ami-br-benchmark"))

UPSTREAM_REPO = "DeepMicroscopy/AMi-Br_Benchmark"
UPSTREAM_COMMIT = "3acf4da"  # the commit shared/data was copied from


@app.command(epilog=VERIFY_EPILOG)
def verify(data_root: Path | None = typer.Option(None, "--data-root", help=DATA_ROOT_HELP),
           quick: bool = typer.Option(False, "--quick", help="Skip decoding every PNG (counts and fingerprints only)."),
           dataset: list[str] | None = typer.Option(
               None, "--dataset", help="Check only this dataset (repeatable); the others are not looked at.")):
    """Count every dataset's crops per class against the expected numbers and fingerprint them.

    Exit code 0 when every dataset checked is present and matches the public release (all three
    are pinned). Exit code 1 when one is missing or differs: missing or extra files, a crop in both
    class folders, an unreadable PNG, a wrong train/test split, a content fingerprint that differs
    from the release's, or two crops with identical bytes that the release itself does not ship.
    A missing dataset fails the check because the benchmark needs all three; to check a partial
    data root on purpose, name the datasets you have with --dataset. Exit code 2 when the data root
    itself is not there (the message says where ami looked: --data-root, else $AMI_DATA_ROOT, else
    the default).

    AtNorM-Br's release holds 27 groups of byte-identical crops (2 with conflicting labels); they
    are listed with the package and reported as the release's own, not as tampering.
    """
    names = list(dataset) if dataset else list(DATASETS)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise BadInput(f"unknown dataset {unknown[0]!r}; known: {', '.join(DATASETS)}")
    root = require_data_root(data_root)
    typer.echo(f"data root: {root}")
    bad = False
    header = f"{'dataset':<10} {'status':<8} {'Atypical':>14} {'Normal':>14}  fingerprint (sha256)"
    typer.echo(header)
    typer.echo("-" * len(header))
    reports = [verify_dataset(root, name, check_images=not quick) for name in names]
    for r in reports:
        bad |= not r.ok
        if not r.present:
            typer.echo(f"{r.name:<10} {'MISSING':<8} {'-':>14} {'-':>14}  -")
            continue
        cells = [f"{r.counts.get(c, 0)}/{r.expected[c]}" for c in ("Atypical", "Normal")]
        pin = ("= public release" if r.fingerprint == r.pinned else "!= public release") if r.pinned else "(not pinned)"
        typer.echo(f"{r.name:<10} {'ok' if r.ok else 'MISMATCH':<8} {cells[0]:>14} {cells[1]:>14}  "
                   f"{r.fingerprint} {pin}")
    for r in reports:
        if not r.present:
            typer.echo(f"\n{r.name}: {r.message}")
        for note in r.notes:
            typer.echo(f"  {r.name}: {note}")
        for p in r.problems[:20]:
            typer.echo(f"  {r.name}: {p}")
        if len(r.problems) > 20:
            typer.echo(f"  {r.name}: ... and {len(r.problems) - 20} more problems")
    if "AMi-Br" not in names:
        raise typer.Exit(1 if bad else 0)
    try:
        rows = load_folds()
        from ..datasets import amibr_split

        check_against_data(rows, amibr_split(root)[0])
        typer.echo(f"\nfolds: {FOLDS_FILE.name} sha256 {folds_sha256()[:16]}... matches the data")
    except (SplitError, FileNotFoundError, ValueError) as e:
        typer.echo(f"\nfolds: {e}")
        bad = True
    raise typer.Exit(1 if bad else 0)


@app.command(epilog=FOLDS_EPILOG)
def folds(data_root: Path | None = typer.Option(None, "--data-root", help=DATA_ROOT_HELP),
          write: bool = typer.Option(False, "--write", help="Rewrite the pinned folds file (maintainers only).")):
    """Show the pinned 5-fold split (slide-grouped, stratified) and check it equals a fresh computation."""
    from ..splits import compute_folds, write_folds

    root = require_data_root(data_root, ("AMi-Br",), train_split=True)
    fresh = compute_folds(root)
    if write:
        digest = write_folds(fresh)
        typer.echo(f"wrote {FOLDS_FILE} (sha256 {digest})")
        raise typer.Exit(0)
    stored = load_folds()
    typer.echo(f"{FOLDS_FILE.name}: sha256 {folds_sha256()} (pinned {pinned_sha256()})")
    typer.echo(f"{'fold':>4} {'crops':>6} {'atypical':>9} {'rate':>6} {'slides':>6}")
    for k in range(5):
        rows = [r for r in stored if r.fold == k]
        n_pos = sum(r.label for r in rows)
        typer.echo(f"{k:>4} {len(rows):>6} {n_pos:>9} {n_pos / len(rows):>6.1%} {len({r.slide for r in rows}):>6}")
    same = fresh == stored
    typer.echo("stored file equals a fresh StratifiedGroupKFold(5, shuffle=True, random_state=42): "
               + ("yes" if same else "NO"))
    raise typer.Exit(0 if same else 1)


@app.command(epilog=DOWNLOAD_EPILOG)
def download(data_root: Path | None = typer.Option(None, "--data-root", help=DATA_ROOT_HELP),
             commit: str = typer.Option(UPSTREAM_COMMIT, help="Upstream commit to fetch."),
             timeout: float = typer.Option(20.0, help="Network timeout, seconds.")):
    """Fetch the public release (GitHub DeepMicroscopy/AMi-Br_Benchmark at a pinned commit).

    Downloads into a temporary folder, verifies the counts, and only then moves the datasets
    into place: an interrupted download never leaves a half-written tree. Offline it fails fast.
    """
    root = resolve_data_root(data_root)
    url = f"https://codeload.github.com/{UPSTREAM_REPO}/zip/{commit}"
    typer.echo(f"fetching {url}")
    with tempfile.TemporaryDirectory(prefix="ami-download-") as tmp:
        zpath = Path(tmp) / "release.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(zpath, "wb") as f:
                shutil.copyfileobj(resp, f)
        except (urllib.error.URLError, OSError) as e:
            raise Unavailable(f"download failed ({e}); offline? Copy the release by hand and point --data-root "
                              f"(or ${ENV_DATA_ROOT}) at the folder that holds AMi-Br/ and amibr_train_split.csv") from None
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        found = [p.parent for p in Path(tmp).rglob("amibr_train_split.csv")]
        if not found:
            raise CheckFailed("the downloaded release has no amibr_train_split.csv; nothing was written")
        src = found[0]
        reports = [verify_dataset(src, n, check_images=False) for n in DATASETS]
        if any(r.present and not r.ok for r in reports):
            raise CheckFailed("downloaded data does not match the expected counts; nothing was written")
        root.mkdir(parents=True, exist_ok=True)
        for item in src.iterdir():
            dest = root / item.name
            if dest.exists():
                continue
            staged = root / f".{item.name}.partial"
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(item, staged) if item.is_dir() else shutil.copy2(item, staged)
            staged.rename(dest)
    typer.echo(f"data in {root}; run `ami-data verify --data-root {root}`")


def main() -> None:  # console script
    run(app, "ami-data")
