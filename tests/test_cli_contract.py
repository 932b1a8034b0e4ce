"""The one CLI contract of the five tools (ami.runtime.cli.contract): an expected error is one line with
the exit code of its kind (the table in ami.runtime.errors), anything else one line and exit 4 (the
traceback with --debug or AMI_DEBUG=1), Ctrl-C 130; a missing data root is one line saying where ami
looked; damaged run records (config.json, metrics.json, split.json, sweep records) are one line naming
the file and the field; shipped models are found by name from any folder."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ami.runtime import errors
from ami.runtime.cli.contract import AmiTyper, internal_error_line, take_debug_flag
from ami.runtime.datasets import DataRootMissing, describe_data_root, require_data_root
from ami.runtime.models import SHIPPED, ModelNotFound, model_lines, resolve_model
from ami.runtime.rundir import RunDir, RunDirError

REPO = Path(__file__).resolve().parents[1]
TOOLS = {"ami-data": "ami.runtime.cli.data", "ami-infer": "ami.runtime.cli.infer", "ami-train": "ami.train.cli",
         "ami-export": "ami.export.cli", "ami-bench": "ami.bench.cli"}
# Runs a tool's console-script main() in a child process. argv: MODULE PROG PATCH ARGS...; PATCH
# ("-" for none) is "pkg.mod:attr" replaced by a function raising an unexpected RuntimeError, or
# "callback" for the app's only command (a single-command app, whatever its internals).
RUNNER = """
import importlib, sys
mod, prog, patch = sys.argv[1:4]
m = importlib.import_module(mod)
def boom(*a, **k):
    raise RuntimeError("boom: the first line\\nthe second line")
def command():  # the app's only command, replaced: no parameters
    boom()
if patch == "callback":
    m.app.registered_commands[0].callback = command
elif patch != "-":
    owner, attr = patch.split(":")
    setattr(importlib.import_module(owner), attr, boom)
sys.argv = [prog, *sys.argv[4:]]
m.main()
"""


def _tool(prog: str, *args, patch: str = "-", cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "AMI_DEBUG": "", **(env or {})}
    return subprocess.run([sys.executable, "-c", RUNNER, TOOLS[prog], prog, patch, *map(str, args)], cwd=cwd,
                          env=e, capture_output=True, text=True, timeout=300)


def _lines(r: subprocess.CompletedProcess) -> list[str]:
    return (r.stdout + r.stderr).strip().splitlines()


# -- the missing data root: one line, exit 2, where ami looked; no half-made run folder -----------------

MISSING_ROOT_CASES = {
    "ami-data": ["folds"],
    "ami-train": ["--folds", "0"],
    "ami-export": ["edge", "--engine", "onnx-int8", "-o", "int8.onnx"],
    "ami-bench": ["card", "."],
}


@pytest.mark.parametrize("prog", sorted(MISSING_ROOT_CASES))
def test_a_missing_data_root_is_one_line_saying_where_ami_looked(prog, tmp_path):
    if prog == "ami-train" and importlib.util.find_spec("torch") is None:
        pytest.skip("ami-train needs torch (the train extra), not installed: it says so instead (tested below)")
    nowhere = tmp_path / "no-data-here"
    r = _tool(prog, *MISSING_ROOT_CASES[prog], cwd=tmp_path, env={"AMI_DATA_ROOT": str(nowhere)})
    assert r.returncode == errors.EXIT_BAD_INPUT, r.stdout + r.stderr
    assert _lines(r) == [f"{prog}: error: no data root at {nowhere} (from $AMI_DATA_ROOT); set --data-root or "
                         "$AMI_DATA_ROOT to the folder holding AMi-Br/, or fetch it with `ami-data download`"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing is made before the inputs are checked"
    if prog == "ami-data":  # an expected error with --debug: its traceback, then the same line and code
        debug = _tool(prog, "--debug", *MISSING_ROOT_CASES[prog], cwd=tmp_path, env={"AMI_DATA_ROOT": str(nowhere)})
        assert debug.returncode == errors.EXIT_BAD_INPUT and "Traceback (most recent call last)" in debug.stderr
        assert debug.stderr.strip().splitlines()[-1] == _lines(r)[0]


def test_ami_infer_takes_no_data_root_and_its_bad_input_is_one_line(tmp_path):
    """ami-infer reads no data root; its expected errors follow the same contract."""
    r = _tool("ami-infer", tmp_path, "--model", tmp_path / "nope.onnx", "-o", tmp_path / "o.csv", cwd=tmp_path)
    assert r.returncode == errors.EXIT_BAD_INPUT
    assert _lines(r) == [f"ami-infer: error: model file not found: {tmp_path / 'nope.onnx'}"]


def test_data_root_resolution_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("AMI_DATA_ROOT", str(tmp_path / "env"))
    assert describe_data_root(tmp_path / "flag") == f"{tmp_path / 'flag'} (given with --data-root)"
    assert describe_data_root(None) == f"{tmp_path / 'env'} (from $AMI_DATA_ROOT)"
    monkeypatch.delenv("AMI_DATA_ROOT")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert describe_data_root(None) == (f"{tmp_path / 'xdg' / 'ami' / 'ami-br-benchmark'} (the default: neither "
                                        "--data-root nor $AMI_DATA_ROOT is set)")
    with pytest.raises(DataRootMissing) as e:
        require_data_root(tmp_path / "flag")
    assert e.value.exit_code == errors.EXIT_BAD_INPUT and isinstance(e.value, FileNotFoundError)
    (tmp_path / "flag").mkdir()
    with pytest.raises(errors.BadInput, match=r"dataset AMi-Br is not present: no AMi-Br/ in the data root .*flag "
                                              r"\(given with --data-root\)"):
        require_data_root(tmp_path / "flag", ("AMi-Br",))
    (tmp_path / "flag" / "AMi-Br").mkdir()
    with pytest.raises(errors.BadInput, match=r"no amibr_train_split\.csv in the data root"):
        require_data_root(tmp_path / "flag", ("AMi-Br",), train_split=True)
    (tmp_path / "flag" / "amibr_train_split.csv").write_text("")
    assert require_data_root(tmp_path / "flag", ("AMi-Br",), train_split=True) == tmp_path / "flag"


# -- an unexpected exception: one line and exit 4; the traceback with --debug / AMI_DEBUG=1 ----------

UNEXPECTED_CASES = {
    "ami-data": ("ami.runtime.cli.data:require_data_root", ["folds"]),
    "ami-infer": ("callback", []),
    "ami-train": ("callback", []),
    "ami-export": ("callback", []),
    "ami-bench": ("ami.bench.table:collect", ["table", "."]),
}


@pytest.mark.parametrize("prog", sorted(UNEXPECTED_CASES))
def test_an_unexpected_exception_is_one_line_and_exit_4(prog, tmp_path):
    patch, args = UNEXPECTED_CASES[prog]
    r = _tool(prog, *args, patch=patch, cwd=tmp_path)
    assert r.returncode == errors.EXIT_FAULT, r.stdout + r.stderr
    assert _lines(r) == [f"{prog}: internal error: RuntimeError: boom: the first line (run with --debug or "
                         "AMI_DEBUG=1 for the traceback)"]
    debug = _tool(prog, "--debug", *args, patch=patch, cwd=tmp_path)
    assert debug.returncode == errors.EXIT_FAULT
    assert "Traceback (most recent call last)" in debug.stderr and "the second line" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == _lines(r)[0]
    env = _tool(prog, *args, patch=patch, cwd=tmp_path, env={"AMI_DEBUG": "1"})
    assert env.returncode == errors.EXIT_FAULT and "Traceback (most recent call last)" in env.stderr


def test_a_missing_optional_library_is_one_line_naming_the_extra_and_exit_3(tmp_path):
    """On a base install (no torch) `ami-train` cannot start: one line naming the extra, exit 3."""
    script = RUNNER.replace('raise RuntimeError("boom: the first line\\nthe second line")',
                            'raise ModuleNotFoundError("No module named \'torch\'", name="torch")')
    patch, args = UNEXPECTED_CASES["ami-data"]
    r = subprocess.run([sys.executable, "-c", script, TOOLS["ami-data"], "ami-data", patch, *args], cwd=tmp_path,
                       env={**os.environ, "AMI_DEBUG": ""}, capture_output=True, text=True, timeout=300)
    assert r.returncode == errors.EXIT_UNAVAILABLE, r.stdout + r.stderr
    assert _lines(r) == ["ami-data: error: this needs torch, which is not installed: pip install 'ami-mitosis[train]'"]


def test_debug_flag_is_taken_out_before_the_parser_sees_it():
    assert take_debug_flag(["a", "--debug", "-o", "x"]) == (["a", "-o", "x"], True)
    assert take_debug_flag(["a", "--", "--debug"]) == (["a", "--", "--debug"], False)
    assert internal_error_line("ami-x", KeyError("k")) == ("ami-x: internal error: KeyError: 'k' (run with --debug "
                                                          "or AMI_DEBUG=1 for the traceback)")


# -- the exit-code table is what the tools do -------------------------------------------------------

def test_the_exit_code_table():
    assert sorted(errors.EXIT_CODES) == [0, 1, 2, 3, 4, 130]
    kinds = {errors.BadInput: 2, errors.CheckFailed: 1, errors.Unavailable: 3, errors.Fault: 4}
    assert {k: k.exit_code for k in kinds} == kinds
    assert errors.AmiError.exit_code == errors.EXIT_BAD_INPUT


def _kind_app(exc: BaseException) -> typer.Typer:
    app = AmiTyper(prog="ami-test")

    @app.command()
    def go():
        raise exc

    return app


@pytest.mark.parametrize("exc, code", [(errors.BadInput("bad flag"), 2), (errors.CheckFailed("3 inputs failed"), 1),
                                       (errors.Unavailable("no GPU"), 3), (errors.Fault("engine nonsense"), 4),
                                       (KeyboardInterrupt(), 130)])
def test_each_kind_ends_a_command_with_its_code_and_one_line(exc, code, monkeypatch):
    monkeypatch.delenv("AMI_DEBUG", raising=False)
    r = CliRunner().invoke(_kind_app(exc), [])
    assert r.exit_code == code
    want = "ami-test: interrupted" if isinstance(exc, KeyboardInterrupt) else f"ami-test: error: {exc}"
    assert r.output.strip().splitlines() == [want]


def _exception_classes() -> list[tuple[str, str]]:
    """(module, class) of every exception class defined in runtime/, train/, export/, bench/."""
    out = []
    for folder in ("runtime", "train", "export", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            module = "ami." + ".".join(path.relative_to(REPO).with_suffix("").parts)
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef) and any(
                        isinstance(b, (ast.Name, ast.Attribute)) and ast.unparse(b).split(".")[-1].endswith(
                            ("Error", "Exception", "Missing", "Unavailable", "Mismatch", "Rejected", "Failed",
                             "Busy", "Disagree", "BadInput", "Fault", "NotFound", "Input"))
                        for b in node.bases):
                    out.append((module, node.name))
    return out


def test_every_exception_class_is_an_ami_error_and_keeps_its_builtin_base():
    classes = _exception_classes()
    assert len(classes) >= 22
    wrong = []
    for module, name in classes:
        if module.endswith("runtime.errors"):
            continue
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError as e:  # an extra this install lacks (torch for train/)
            pytest.importorskip(e.name or "torch", reason=f"{module} needs {e.name}")
            raise
        if not issubclass(cls, errors.AmiError):
            wrong.append(f"{module}.{name}")
    assert wrong == []
    from ami.runtime.datasets import DatasetMissing
    from ami.runtime.rundir import RunDirError as RDE

    assert issubclass(DatasetMissing, FileNotFoundError) and issubclass(RDE, ValueError)


def test_export_error_kinds_keep_their_exit_codes():
    from ami.export.errors import CheckFailed, ExportError, Int8Rejected, TensorRTUnavailable

    assert [c.exit_code for c in (ExportError, CheckFailed, Int8Rejected, TensorRTUnavailable)] == [2, 1, 1, 3]
    assert issubclass(CheckFailed, ExportError) and issubclass(TensorRTUnavailable, RuntimeError)


def test_every_console_script_runs_through_the_contract():
    text = (REPO / "pyproject.toml").read_text()
    scripts = dict(line.replace('"', "").split(" = ") for line in
                   text.split("[project.scripts]")[1].split("\n\n")[0].strip().splitlines())
    assert set(scripts) == set(TOOLS)
    for prog, target in scripts.items():
        module, func = target.split(":")
        assert module == TOOLS[prog] and func == "main"
        tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        calls = [ast.unparse(c) for c in ast.walk(main) if isinstance(c, ast.Call)]
        assert f"run(app, '{prog}')" in calls, (prog, calls)


# -- damaged run records: one line naming the file and the field, exit 2 -----------------------------

def _run(root: Path, config: dict | None = None, metrics: dict | None = None) -> Path:
    d = root / "run"
    (d / "fold0").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config if config is not None else
                                              {"model": "edge", "method": "full", "recipe": {"epochs": 1}}))
    (d / "fold0" / "metrics.json").write_text(json.dumps(metrics if metrics is not None else {
        "fold": 0, "validation": {"balanced_accuracy": 0.8, "auroc": 0.9}, "tests": {}, "predictions": {}}))
    (d / "fold0" / "best.safetensors").write_bytes(b"")
    return d


def _bench(*args):
    from ami.bench.cli import _register, app

    if not app.registered_commands:
        _register()
    return CliRunner().invoke(app, [str(a) for a in args])


def test_table_on_a_config_of_the_wrong_shape(tmp_path):
    run = _run(tmp_path, config={"model": "edge", "method": "full", "recipe": [1, 2]})
    r = _bench("table", run)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [f"ami-bench: error: {run / 'config.json'}: field 'recipe' should be "
                                             "an object, not a list"]
    (run / "config.json").write_text('["model", "edge"]')
    r = _bench("table", run)
    assert r.exit_code == 2 and f"{run / 'config.json'}: it should be an object, not a list" in r.output
    (run / "config.json").write_text('{"model": "edge"}')
    r = _bench("table", run)
    assert r.exit_code == 2 and f"{run / 'config.json'}: field 'method' is missing" in r.output


@pytest.mark.parametrize("metrics, field, want", [
    ({"fold": "zero"}, "fold", "'zero' is not a fold"),
    ({"fold": 0, "tests": ["AMi-Br-test"]}, "tests", "should be an object, not a list"),
    ({"fold": 0, "tests": {"AMi-Br-test": {"auroc": "0.9"}}}, "tests.AMi-Br-test.auroc",
     "should be a number or null, not a string"),
    ({"fold": 0, "validation": {"balanced_accuracy": True}}, "validation.balanced_accuracy",
     "should be a number or null, not true or false"),
    ({"fold": 0, "predictions": {"validation": {"c1": 1}}}, "predictions.validation", "should be a list, not an object"),
    ({}, "fold", "is missing"),
])
def test_table_on_metrics_of_the_wrong_shape(tmp_path, metrics, field, want):
    run = _run(tmp_path, metrics=metrics)
    r = _bench("table", run)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ami-bench: error: {run / 'fold0' / 'metrics.json'}: field "
                                                   f"'{field}'") and want in lines[0], lines


def test_split_json_of_the_wrong_shape(tmp_path):
    run = _run(tmp_path)
    (run / "split.json").write_text(json.dumps({"folds_sha256": 12}))
    with pytest.raises(RunDirError, match=r"split.json: field 'folds_sha256' should be a string, not an integer$"):
        RunDir(run).split()


def _export(*args):
    pytest.importorskip("torch", reason="ami-export reads run directories with the train extra installed")
    from ami.export.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture()
def fake_data_root(tmp_path) -> Path:
    """A data root that passes the up-front check (the source is refused before any crop is read)."""
    root = tmp_path / "data"
    (root / "AMi-Br").mkdir(parents=True)
    (root / "amibr_train_split.csv").write_text("")
    return root


def test_export_refuses_a_config_of_the_wrong_shape(tmp_path, fake_data_root):
    run = _run(tmp_path, config={"model": "edge", "method": ["full"]})
    r = _export(run, "-o", tmp_path / "m.onnx", "--data-root", fake_data_root)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == (f"ami-export: error: {run / 'config.json'}: field 'method' should "
                                                 "be a string, not a list")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("metrics, want", [
    ({}, "metrics.json: field 'fold' is missing"),
    ({"fold": 0, "validation": None, "tests": {}}, "metrics.json: field 'validation' is empty: fold 0 of run has no "
                                                   "validation record"),
    ({"fold": 0, "validation": "0.8"}, "metrics.json: field 'validation' should be an object or null, not a string"),
])
def test_export_refuses_empty_or_damaged_metrics(tmp_path, fake_data_root, metrics, want):
    run = _run(tmp_path, metrics=metrics)
    r = _export(run / "fold0", "-o", tmp_path / "m.onnx", "--data-root", fake_data_root)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ami-export: error: ") and want in lines[0], lines
    assert not (tmp_path / "m.onnx").exists()


def test_parity_reads_a_damaged_config_as_one_line(tmp_path):
    pytest.importorskip("torch", reason="the parity reference is the PyTorch model")
    from ami.train.foldmodel import FoldModelError, load_fold_model

    run = _run(tmp_path, config={"model": "edge", "method": "full", "tiny_stand_in": "yes"})
    with pytest.raises(FoldModelError, match=r"config.json: field 'tiny_stand_in' should be true or false, "
                                             r"not a string$") as e:
        load_fold_model(run, 0)
    assert e.value.exit_code == errors.EXIT_BAD_INPUT


def _sweep_status(root: Path):
    from ami.train.cli import app

    return CliRunner().invoke(app, ["--sweep", "edge", "--folds", "0", "--out", str(root), "--status"])


def test_sweep_status_on_damaged_records(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps({"sweeps": ["edge"], "jobs": "edge-full-f0"}))
    r = _sweep_status(root)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [f"ami-train: error: {root / 'sweep.json'}: field 'jobs' should be a "
                                             "list, not a string"]
    job = {"id": "edge-full-f0", "model": "edge", "method": "full", "fold": 0, "root": str(root),
           "run_dir": str(root / "edge-full")}
    (root / "sweep.json").write_text(json.dumps({"sweeps": ["edge"], "jobs": [{**job, "fold": 7}]}))
    r = _sweep_status(root)
    assert r.exit_code == 2 and "field 'jobs[0].fold' should be 'full' or 0-4, not 7" in r.output
    (root / "sweep.json").write_text(json.dumps({"sweeps": ["edge"], "jobs": [job]}))
    (root / "logs").mkdir()
    (root / "logs" / "edge-full-f0.json").write_text(json.dumps({"id": job["id"], "state": "running", "pid": "12"}))
    r = _sweep_status(root)
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [f"ami-train: error: {root / 'logs' / 'edge-full-f0.json'}: field 'pid' "
                                             "should be an integer, not a string"]
    (root / "logs" / "edge-full-f0.json").write_text(json.dumps(["running"]))
    r = _sweep_status(root)
    assert r.exit_code == 2 and "edge-full-f0.json: it should be an object, not a list" in r.output
    (root / "logs" / "edge-full-f0.json").write_text(json.dumps({"id": job["id"], "state": "failed", "error": "x"}))
    r = _sweep_status(root)
    assert r.exit_code == 1 and "failed" in r.output  # a sound record: the status table, exit 1 for a failed job


# -- shipped models by name ---------------------------------------------------------------------------

def test_shipped_models_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, m in SHIPPED.items():
        assert resolve_model(name) == m.path and resolve_model(m.file) == m.path
    assert resolve_model(None) == SHIPPED["edge"].path
    own = tmp_path / "edge"
    own.write_bytes(b"mine")
    assert resolve_model("edge") == Path("edge"), "a file path is used as is"
    with pytest.raises(ModelNotFound, match=r"model nope.onnx not found: no such file, and not a shipped model "
                                            r"\(edge, edge-int8; list them"):
        resolve_model("nope.onnx")
    lines = model_lines()
    assert [ln.split()[0] for ln in lines] == list(SHIPPED) and all(" MB)" in ln for ln in lines)


def test_ami_infer_runs_a_shipped_model_by_name_from_another_folder(tmp_path):
    pytest.importorskip("onnxruntime")
    from ami.runtime.cli.infer import SAMPLES

    crop = next(SAMPLES.glob("*.png"))
    r = _tool("ami-infer", crop, "--model", "edge-int8", "-o", tmp_path / "o.csv", "--no-progress",
              "--engine", "onnxruntime", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "edge-int8.onnx" in r.stderr
    rows = (tmp_path / "o.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[3] == "ok"
