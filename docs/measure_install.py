"""Measure the installed size of each install line: writes results/install-sizes.json.

    python docs/measure_install.py            # from a checkout, on a box with the dev install

How: ``pip install --dry-run --ignore-installed --report`` resolves each line against the package
index as a fresh environment would (nothing is installed), and each resolved distribution's size is
the sum of the file sizes in its installed RECORD on this machine (the same wheels, possibly another
patch version; a distribution not installed here is counted as unknown and named). The project's
own share is its wheel, built here, uncompressed. The numbers are of a Linux x86-64 box with
Python 3.11; the CUDA build of PyTorch brings the NVIDIA libraries, which a CPU-only box can leave
out (docs/install.md).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "install-sizes.json"
LINES = {  # the line a user types -> the extras it names
    "pip install ami-mitosis": "",
    "pip install 'ami-mitosis[openvino]'": "openvino",
    "pip install 'ami-mitosis[slides]'": "slides",
    "pip install 'ami-mitosis[train]'": "train",
    "pip install 'ami-mitosis[train,export]'": "train,export",
    "pip install -e '.[train,export,slides,dev,docs,lite0,openvino,slurm]'": "train,export,slides,dev,docs,lite0,openvino,slurm",
}


def resolve(extras: str) -> list[tuple[str, str]]:
    """(name, version) of every distribution a fresh install of the checkout with these extras gets."""
    target = f"{REPO}[{extras}]" if extras else str(REPO)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                        "--report", str(report), target], check=True, capture_output=True)
        rec = json.loads(report.read_text())
    return [(i["metadata"]["name"], i["metadata"]["version"]) for i in rec["install"]]


def installed_bytes(name: str) -> int | None:
    try:
        files = metadata.distribution(name).files or []
    except metadata.PackageNotFoundError:
        return None
    return sum(f.size or 0 for f in files)


def project_bytes() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", tmp, str(REPO)], check=True, capture_output=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            return sum(i.file_size for i in z.infolist())


def measure() -> dict:
    own = project_bytes()
    rows = []
    for line, extras in LINES.items():
        total, unknown = 0, []
        dists = resolve(extras)
        for name, version in dists:
            if name.lower().replace("_", "-") == "ami-mitosis":
                total += own
                continue
            size = installed_bytes(name)
            if size is None:
                unknown.append(f"{name} {version}")
            else:
                total += size
        nvidia = sum(installed_bytes(n) or 0 for n, _ in dists if n.startswith("nvidia-") or n == "triton")
        rows.append({"line": line, "packages": len(dists), "bytes": total, "nvidia_and_triton_bytes": nvidia,
                     "not_installed_here": unknown})
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "method": ("pip install --dry-run --ignore-installed --report resolves each line as a fresh environment "
                   "would; each distribution counts the file sizes of its installed RECORD on the measuring machine; "
                   "the project counts its wheel, uncompressed. Distributions that machine did not have are "
                   "not counted (a few small ones, listed in results/install-sizes.json)."),
        "lines": rows,
    }


if __name__ == "__main__":
    rec = measure()
    OUT.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
    for r in rec["lines"]:
        print(f"{r['bytes'] / 1e9:6.2f} GB  {r['packages']:4d} packages  {r['line']}"
              + (f"  (not counted: {', '.join(r['not_installed_here'])})" if r["not_installed_here"] else ""))
