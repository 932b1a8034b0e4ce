"""Every shell and Python example of README.md and docs/*.md runs, and shows its real output.

Each fenced ``bash``, ``console`` or ``python`` block (at the start of a line) is one test, named
``PAGE:LINE``. The blocks of a page run in order in one temporary folder of their own that holds
``crops/`` (a copy of the 32 sample crops shipped with the package), with ``AMI_DATA_ROOT`` set to
the benchmark data the other tests use. The rules (docs/contributing-docs.md says them to writers):

- ``bash``: the block runs with ``bash -e -o pipefail``; lines starting with ``pip install`` or
  ``pip uninstall`` are not run (the tests run in the environment CI installed).
- ``console``: ``$ CMD`` lines are commands (a trailing backslash continues one); the lines after a
  command, up to the next, are its output (stdout and stderr together). ``...`` alone on a line
  matches any lines; ``...`` in a line matches any text in it.
- ``python``: the block runs as one script.

A comment on the lines right before the fence changes that: ``<!-- not-run: REASON -->`` (REASON starts
with one of :data:`SKIP_REASONS`), ``<!-- example: in-checkout, needs-data, needs-slides, exit=N -->``.

An unmarked shell example that would train (``ami-train`` without ``--list``, ``--print-config``,
``--dry-run``, ``--status`` or ``--help``), download or serve fails without being started, naming
the command; ``<!-- example: quick-training -->`` lets a run of seconds through.

``python tests/test_docs_examples.py PAGE...`` prints each example of the pages with its real
output, for pasting into a ``console`` block.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SAMPLES = REPO / "runtime" / "assets" / "samples"
LANGS = ("bash", "console", "python")
SKIP_REASONS = ("needs a GPU", "needs the network", "needs the gated weights", "long", "serves until stopped")
CHECKOUT_LINKS = ("results", "runtime")  # what an in-checkout example sees of the checkout
TIMEOUT_S = 120
# Commands an unmarked example may not start: the test names them instead of running them.
GUARDS = ((r"(^|[;&|(]\s*|\s)ami-train\b", "trains a model"), (r"\bami-data download\b", "downloads the data"),
          (r"\bmkdocs serve\b", "serves until stopped"))
HARMLESS = r"\s--(list|print-config|dry-run|status|help)\b"
FENCE = re.compile(r"^```([A-Za-z0-9_-]*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.+?)\s*-->\s*$")
OPTIONS = re.compile(r"^<!--\s*example:\s*(.+?)\s*-->\s*$")


@dataclass
class Example:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def parse_options(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        key, _, value = part.strip().partition("=")
        if key:
            out[key] = value or "yes"
    return out


def extract(page: Path) -> list[Example]:
    """The examples of one page, in order; other fenced blocks are skipped whole."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if lang in LANGS:
            k, skip, opts = start - 1, None, None
            while k >= 0 and lines[k].strip().startswith("<!--"):  # the comments right above the fence
                skip, opts = skip or NOT_RUN.match(lines[k].strip()), opts or OPTIONS.match(lines[k].strip())
                k -= 1
            found.append(Example(page, start + 1, lang, "\n".join(lines[start + 1:j]) + "\n",
                                 skip.group(1) if skip else None, parse_options(opts.group(1)) if opts else {}))
        i = j + 1
    return found


EXAMPLES = [ex for page in PAGES for ex in extract(page)]


# ---- running ---------------------------------------------------------------------------------

def missing_imports(code: str) -> list[str]:
    """The top-level modules a Python example imports that this install lacks."""
    import ast

    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level]
    return sorted({m.split(".")[0] for m in names if importlib.util.find_spec(m.split(".")[0]) is None})


def data_root() -> Path | None:
    """The benchmark data as every ami command finds it: $AMI_DATA_ROOT, else the per-user default."""
    from ami.runtime.datasets import resolve_data_root

    cand = resolve_data_root(None)
    return cand if (cand / "AMi-Br").is_dir() else None


def environment() -> dict[str, str]:
    env = dict(os.environ)
    root = data_root()
    if root is not None:
        env["AMI_DATA_ROOT"] = str(root.resolve())
    env.setdefault("COLUMNS", "120")
    return env


def prepare(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "crops").exists():
        (folder / "crops").mkdir()
        for png in SAMPLES.glob("*.png"):
            shutil.copy2(png, folder / "crops" / png.name)
    return folder


def link_checkout(folder: Path) -> None:
    for name in CHECKOUT_LINKS:
        if not (folder / name).exists():
            (folder / name).symlink_to(REPO / name, target_is_directory=True)


def clean(output: str) -> str:
    """What a terminal would show: the text after the last carriage return of each line."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in output.splitlines()]
    return "\n".join(lines) + "\n" if lines else ""


def pattern(expected: list[str]) -> re.Pattern:
    parts = []
    for line in expected:
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(re.escape(line.rstrip()).replace(re.escape("..."), r"[^\n]*") + r"\n")
    return re.compile("".join(parts))


def console_steps(code: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each ``$ `` command of a console block."""
    steps: list[tuple[str, list[str]]] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            raise ValueError(f"console block line {i + 1} is output without a `$ ` command before it")
        cmd = lines[i][2:]
        while cmd.endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd = cmd[:-1] + "\n" + lines[i]
        out = []
        i += 1
        while i < len(lines) and not lines[i].startswith("$ "):
            out.append(lines[i])
            i += 1
        while out and not out[-1].strip():
            out.pop()
        steps.append((cmd, out))
    return steps


def shell(code: str) -> str:
    kept = [(": # not run here: " + ln) if ln.lstrip().startswith(("pip install", "pip uninstall")) else ln
            for ln in code.splitlines()]
    trap = "trap 'echo \"(block line $((LINENO - 2)) failed: $BASH_COMMAND)\" >&2' ERR"
    return "set -e -o pipefail\n" + trap + "\n" + "\n".join(kept) + "\n"


def run(argv: list[str], folder: Path) -> subprocess.CompletedProcess:
    """Run one step in its own process group; on time-out the whole group is killed (a sweep's jobs too)."""
    proc = subprocess.Popen(argv, cwd=folder, env=environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, None)


def guarded(ex: Example) -> str | None:
    """Why a shell example must be marked instead of run (it would train, download or serve), or None."""
    if ex.lang == "python" or "quick-training" in ex.options:
        return None
    for line in ex.code.splitlines():
        cmd = line.split("#", 1)[0].strip().removeprefix("$ ")
        for rx, what in GUARDS:
            if re.search(rx, cmd) and not re.search(HARMLESS, cmd):
                return f"`{cmd}` {what}"
    return None


def tail(text: str, n: int = 25) -> str:
    lines = text.splitlines()
    return "\n".join(("    " + ln) for ln in lines[-n:]) or "    (no output)"


def check(ex: Example, folder: Path) -> list[str]:
    """Run one example in its page's folder; the problems found (empty: it is true)."""
    want_exit = int(ex.options.get("exit", "0"))
    if "in-checkout" in ex.options:
        link_checkout(folder)
    if ex.lang == "python":
        script = folder / f"example_{ex.line}.py"
        script.write_text(ex.code, encoding="utf-8")
        steps = [([sys.executable, script.name], ex.code.strip().splitlines()[0], None)]
    elif ex.lang == "bash":
        steps = [(["bash", "-c", shell(ex.code)], "the block", None)]
    else:
        steps = [(["bash", "-o", "pipefail", "-c", cmd], cmd, out) for cmd, out in console_steps(ex.code)]
    problems = []
    for n, (argv, shown, expected) in enumerate(steps, 1):
        try:
            got = run(argv, folder)
        except subprocess.TimeoutExpired:
            return [f"`{shown}` ran past {TIMEOUT_S} s (mark it `<!-- not-run: long ... -->`)"]
        code = want_exit if n == len(steps) else 0
        if got.returncode != code:
            what = shown if shown == "the block" else f"`{shown}`"
            problems.append(f"{what} exited {got.returncode} (expected {code}); its output:\n{tail(got.stdout)}")
            break
        if expected is not None and not pattern(expected).fullmatch(clean(got.stdout)):
            problems.append(f"`{shown}`: the output differs from the page.\n  page shows:\n"
                            + "\n".join("    " + ln for ln in expected) + f"\n  real output:\n{tail(clean(got.stdout), 40)}")
    return problems


# ---- the tests ---------------------------------------------------------------------------------

FAILED: dict[Path, str] = {}


@pytest.fixture(scope="module")
def page_folder(tmp_path_factory):
    folders: dict[Path, Path] = {}

    def get(page: Path) -> Path:
        if page not in folders:
            folders[page] = prepare(tmp_path_factory.mktemp(page.stem.replace(".", "-")))
        return folders[page]
    return get


def test_every_page_has_examples_found():
    pages = {ex.page for ex in EXAMPLES}
    assert REPO / "README.md" in pages and REPO / "docs" / "getting-started.md" in pages, sorted(map(str, pages))


@pytest.mark.parametrize("ex", [ex for ex in EXAMPLES if ex.not_run], ids=lambda ex: ex.name)
def test_not_run_reason_is_one_of_the_allowed(ex):
    assert ex.not_run.startswith(SKIP_REASONS), (
        f"{ex.name}: not-run reason {ex.not_run!r} must start with one of {', '.join(SKIP_REASONS)}")


@pytest.mark.parametrize("ex", EXAMPLES, ids=lambda ex: ex.name)
def test_example_runs_as_shown(ex, page_folder):
    if ex.not_run:
        pytest.skip(f"{ex.name} not run: {ex.not_run}")
    if "needs-data" in ex.options and data_root() is None:
        pytest.skip(f"{ex.name} needs the benchmark data: set AMI_DATA_ROOT to the folder holding AMi-Br/")
    if ex.lang == "python" and (absent := missing_imports(ex.code)):
        pytest.skip(f"{ex.name} imports {', '.join(absent)}, not installed (an extra of this install)")
    if "needs-slides" in ex.options and importlib.util.find_spec("openslide") is None:
        pytest.skip(f"{ex.name} needs the slides extra (OpenSlide), which is not installed")
    unknown = set(ex.options) - {"in-checkout", "needs-data", "needs-slides", "exit", "quick-training"}
    assert not unknown, f"{ex.name}: unknown example option(s) {sorted(unknown)}"
    why = guarded(ex)
    if why:
        pytest.fail(f"{ex.name} ({ex.lang}): {why}; not started. Mark the block `<!-- not-run: long (...) -->` "
                    "(or needs a GPU / the gated weights), or `<!-- example: quick-training -->` for a "
                    "run of seconds", pytrace=False)
    problems = check(ex, page_folder(ex.page))
    if problems:
        before = FAILED.get(ex.page)
        FAILED.setdefault(ex.page, ex.name)
        note = f"\n(an earlier example of this page failed too: {before})" if before else ""
        pytest.fail(f"{ex.name} ({ex.lang}): " + "\n".join(problems) + note, pytrace=False)


def main(argv: list[str]) -> int:
    """Print each example of the given pages with its real output (the blocks run in order)."""
    import tempfile

    for arg in argv:
        page = Path(arg).resolve()
        folder = prepare(Path(tempfile.mkdtemp(prefix="ami-docs-example-")))
        for ex in extract(page):
            print(f"==== {ex.name} ({ex.lang}{', not run: ' + ex.not_run if ex.not_run else ''})")
            if ex.not_run:
                continue
            if "in-checkout" in ex.options:
                link_checkout(folder)
            cmds = [c for c, _ in console_steps(ex.code)] if ex.lang == "console" else [ex.code]
            for cmd in cmds:
                argv_ = [sys.executable, "-c", cmd] if ex.lang == "python" else ["bash", "-c", shell(cmd)]
                got = run(argv_, folder)
                print(("$ " + cmd) if ex.lang == "console" else "", clean(got.stdout), f"(exit {got.returncode})", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
