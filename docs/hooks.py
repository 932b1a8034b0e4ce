"""Generated parts of the documentation: numbers come from results files, never typed by hand.

Used two ways:

- as an MkDocs hook (``hooks:`` in mkdocs.yml): a page line ``<!-- gen: NAME -->`` is replaced by
  the block :data:`GENERATORS` makes for NAME (exit codes from ``ami.runtime.errors``, the headline
  numbers from ``results/bench/latency.json`` and the model card); the Python API reference finds the
  ``ami`` package of this checkout (the folders ``runtime/``, ``train/``, ... are its layers);
- as a script, ``python docs/hooks.py`` rewrites the same blocks in README.md between
  ``<!-- gen: NAME -->`` and ``<!-- /gen -->`` (``--check`` only says whether README.md is current;
  tests/test_docs.py runs it).

Whole results files are included by the snippets extension (``--8<-- "results/bench/latency.md"``),
which fails the strict build when a file is missing.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

try:  # the script mode (README blocks) needs no mkdocs
    from mkdocs.plugins import event_priority
except ImportError:  # pragma: no cover
    def event_priority(_priority):
        return lambda f: f

REPO = Path(__file__).resolve().parents[1]
LATENCY = REPO / "results" / "bench" / "latency.json"
CARD = REPO / "runtime" / "assets" / "edge-card.json"
SIZES = REPO / "results" / "install-sizes.json"
GPU_CHECK = REPO / "results" / "gpu" / "h200-2026-12-04" / "gpu-check.json"  # the GPU-hour table's source
LAYERS = {"runtime": "runtime", "train": "train", "export": "export", "bench": "bench"}
# Pages other helpers write; until they land the site builds with a placeholder that says so.
PENDING = {"guarantees.md": "What `ami-infer` guarantees", "evaluate.md": "Evaluate a model"}
GEN = re.compile(r"<!-- gen: ([a-z0-9-]+) -->")
README_BLOCK = re.compile(r"(<!-- gen: ([a-z0-9-]+) -->\n)(.*?)(<!-- /gen -->)", re.S)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def machine_name(latency: dict) -> str:
    """The machine a latency record was measured on, in words: CPU, cores, GPU, date."""
    m = latency["machine"]
    gpu = m.get("gpu") or "no GPU"
    return f"{m['cpu']}, {m['cores']} cores, {gpu} ({latency['created'][:10]})"


def _row(latency: dict, engine: str, model: str, precision: str, batch: int) -> dict:
    for r in latency["rows"]:
        if (r["engine"], r["model"], r["precision"], r["batch"]) == (engine, model, precision, batch):
            return r
    raise KeyError(f"{LATENCY.name} has no row {engine} / {model} / {precision} / batch {batch}")


def _e2e(latency: dict, engine: str, model: str) -> dict:
    for r in latency["end_to_end"]["ami_infer"]:
        if (r["engine"], r["model"]) == (engine, model):
            return r
    raise KeyError(f"{LATENCY.name} has no end-to-end row {engine} / {model}")


def headline() -> str:
    """The README's small table: the shipped model's quality and its speed on the measured machine."""
    lat, card = _json(LATENCY), _json(CARD)
    tests = card["shipped"]["tests"]
    amibr, md, br, brd = tests["AMi-Br-test"], tests["AtNorM-MD"], tests["AtNorM-Br"], tests["AtNorM-Br (dedup)"]
    where = machine_name(lat)
    ort = _row(lat, "ONNX Runtime", "edge.onnx", "fp32", 64)["stats"]["crops_per_s"]
    ov8 = _row(lat, "OpenVINO", "edge-int8.onnx", "int8", 64)["stats"]["crops_per_s"]
    e2e = _e2e(lat, "OpenVINO", "edge-int8.onnx")
    ref = lat["end_to_end"]["reference"]["crops_per_s"]
    return "\n".join([
        "| what | number | measured on | source |",
        "|---|---|---|---|",
        f"| shipped `edge.onnx`, AMi-Br test: balanced accuracy / AUROC | {amibr['balanced_accuracy']:.3f} / "
        f"{amibr['auroc']:.3f} | any machine: ONNX Runtime or OpenVINO fp32, identical labels (`results/bench/parity.md`) | `runtime/assets/edge-card.json` |",
        f"| shipped `edge.onnx`, AtNorM-MD: BA / AUROC | {md['balanced_accuracy']:.3f} / "
        f"{md['auroc']:.3f} | any machine, as above | `runtime/assets/edge-card.json` |",
        f"| shipped `edge.onnx`, AtNorM-Br, all {br['n']} crops / de-duplicated {brd['n']}: BA / AUROC | "
        f"{br['balanced_accuracy']:.3f} / {br['auroc']:.3f}, {brd['balanced_accuracy']:.3f} / {brd['auroc']:.3f} | "
        "any machine, as above | `runtime/assets/edge-card.json` |",
        f"| model only, batch 64: ONNX Runtime fp32 / OpenVINO int8 | {ort:,.0f} / {ov8:,.0f} crops/s | {where} "
        "| `results/bench/latency.json` |",
        f"| `ami-infer` end to end on {e2e['crops']} PNG crops, OpenVINO int8 | {e2e['crops_per_s']:,.0f} crops/s "
        f"({e2e['crops_per_s'] / ref:.1f}x the public scripts' PyTorch loop) | {where} | `results/bench/latency.json` |",
        gpu_hours_row(),
    ])


def gpu_hours_row() -> str:
    """Table 3's training cost on the measured GPU (ami-bench gpu-hours from a gpu-check record)."""
    from ami.bench.gpu_hours import gpu_hours

    rep = _json(GPU_CHECK)
    rows = gpu_hours(rep)
    steps, total = sum(r["training_h"] for r in rows), sum(r["with_evaluation_h"] for r in rows)
    gpu = rep["sections"]["environment"]["data"]["nvidia_smi"]["gpus"][0]["name"]
    return (f"| Table 3, all {len(rows)} configurations x 5 folds at the 100-epoch ceiling | {total:.1f} GPU-hours "
            f"({steps:.1f} of training steps) | {gpu} ({rep['created'][:10]}) | "
            f"`results/gpu/gpu-hours.md` |")


def exit_codes() -> str:
    """The exit-code table of every tool, from ami.runtime.errors.EXIT_CODES."""
    from ami.runtime.errors import EXIT_CODES

    lines = ["| code | meaning |", "|---|---|"]
    lines += [f"| {code} | {text} |" for code, text in sorted(EXIT_CODES.items())]
    return "\n".join(lines)


BOXES = {  # install line (as in results/install-sizes.json) -> the box it is for
    "pip install ami-mitosis": "edge box: inference only, no torch",
    "pip install 'ami-mitosis[openvino]'": "fast x86 CPU box (OpenVINO)",
    "pip install 'ami-mitosis[slides]'": "whole-slide images",
    "pip install 'ami-mitosis[train]'": "training (PyTorch, CUDA build)",
    "pip install 'ami-mitosis[train,export]'": "training and export",
    "pip install -e '.[train,export,slides,dev,docs,lite0,openvino,slurm]'": "development: what CI installs",
}


def install_sizes() -> str:
    """The measured size of each install line, from results/install-sizes.json (docs/measure_install.py)."""
    rec = _json(SIZES)
    lines = ["| box | install line | size installed |", "|---|---|---|"]
    for row in rec["lines"]:
        nvidia = row.get("nvidia_and_triton_bytes", 0)
        extra = f" ({nvidia / 1e9:.1f} GB of it NVIDIA libraries)" if nvidia else ""
        lines.append(f"| {BOXES.get(row['line'], '')} | `{row['line']}` | {row['bytes'] / 1e9:.2f} GB{extra} |")
    lines.append("")
    lines.append(f"Sizes measured on {rec['machine']}, {rec['created'][:10]}: {rec['method']}")
    return "\n".join(lines)


GENERATORS: dict[str, Callable[[], str]] = {
    "headline": headline,
    "exit-codes": exit_codes,
    "install-sizes": install_sizes,
}


def expand(markdown: str) -> str:
    """Replace each ``<!-- gen: NAME -->`` line of a page by its generated block."""
    def one(m: re.Match) -> str:
        name = m.group(1)
        if name not in GENERATORS:
            raise ValueError(f"unknown generated block {name!r}; known: {', '.join(GENERATORS)}")
        return GENERATORS[name]()
    return GEN.sub(one, markdown)


def render_readme(text: str) -> str:
    """README.md with every generated block between its markers made anew."""
    return README_BLOCK.sub(lambda m: m.group(1) + GENERATORS[m.group(2)]() + "\n" + m.group(4), text)


# ---- MkDocs hooks ------------------------------------------------------------------------------

def api_path() -> str:
    """A folder where ``ami/<layer>`` points at this checkout's layers, for the API reference."""
    tag = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / f"ami-docs-api-{tag}"
    (root / "ami").mkdir(parents=True, exist_ok=True)
    for name, folder in LAYERS.items():
        link = root / "ami" / name
        if not link.is_symlink():
            link.symlink_to(REPO / folder, target_is_directory=True)
    return str(root)


@event_priority(100)  # before mkdocstrings reads its handler options
def on_config(config):
    handlers = config["plugins"]["mkdocstrings"].config["handlers"]
    handlers.setdefault("python", {}).setdefault("paths", []).insert(0, api_path())
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for name, title in PENDING.items():
        if files.get_file_from_path(name) is None:
            files.append(File.generated(config, name, content=f"# {title}\n\nThis page is not written yet.\n"))
    return files


def on_page_markdown(markdown, page, config, files):
    return expand(markdown)


def main(argv: list[str]) -> int:
    readme = REPO / "README.md"
    old = readme.read_text(encoding="utf-8")
    new = render_readme(old)
    if "--check" in argv:
        if new != old:
            print("README.md is out of date with the results files: run python docs/hooks.py")
            return 1
        return 0
    readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
