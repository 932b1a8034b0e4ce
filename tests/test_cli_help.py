"""Issue 27: the --help of every ami tool and of every subcommand has an Examples section, and its
examples run as written from any folder: every example line parses with the command's own parser
(an unknown flag, a missing argument or a bad value fails), and the cheap ones that need no data,
GPU or run directory are run from an empty temporary folder."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

TOOLS = {"ami-data": "ami.runtime.cli.data", "ami-infer": "ami.runtime.cli.infer", "ami-train": "ami.train.cli",
         "ami-export": "ami.export.cli", "ami-bench": "ami.bench.cli"}
WIDE = 250  # no wrapped example lines
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*\s+")
ABSOLUTE = re.compile(r"(^|\s|=)/(?!dev/)\w")  # /data/x, --out=/tmp/y; not /dev/null
COMMENT = re.compile(r"\s{2,}|\s#\s")  # an example's note starts after two spaces or at ' # '


def _app(prog: str) -> typer.Typer:
    mod = importlib.import_module(TOOLS[prog])
    if prog == "ami-bench" and not mod.app.registered_commands:
        mod._register()
    return mod.app


def _root(prog: str):
    """The tool's click command (a group when it has subcommands: then it has ``commands``)."""
    return typer.main.get_command(_app(prog))


def _is_usage_error(e: Exception) -> bool:
    """A click usage error (typer vendors click: matched by what it offers, not by class)."""
    return hasattr(e, "format_message") and hasattr(e, "exit_code")


def _commands() -> list[tuple[str, tuple[str, ...]]]:
    """(tool, subcommand path) for every tool and every (nested) subcommand, from the apps themselves."""
    out = []

    def walk(prog, cmd, path):
        out.append((prog, path))
        if hasattr(cmd, "commands"):
            for name, sub in sorted(cmd.commands.items()):
                if not sub.hidden:
                    walk(prog, sub, (*path, name))

    for prog in TOOLS:
        walk(prog, _root(prog), ())
    return out


COMMANDS = _commands()


def _help(prog: str, path: tuple[str, ...]) -> str:
    r = CliRunner().invoke(_app(prog), [*path, "--help"], prog_name=prog, terminal_width=WIDE,
                           max_content_width=WIDE, env={"COLUMNS": str(WIDE), "TERMINAL_WIDTH": str(WIDE)})
    assert r.exit_code == 0, r.output
    return r.output


def _examples(prog: str, text: str) -> list[tuple[str, str]]:
    """(the line as written, the command of ``prog`` on it without its VAR=value prefixes and its
    note) for every line of the help that is a command of ``prog``."""
    out = []
    for raw in text.splitlines():
        written = line = COMMENT.split(raw.strip(" │"), maxsplit=1)[0]
        while ENV_ASSIGNMENT.match(line):
            line = ENV_ASSIGNMENT.sub("", line, count=1)
        if line == prog or line.startswith(prog + " "):
            out.append((written, line))
    return out


def _example_lines(prog: str, text: str) -> list[str]:
    return [line for _, line in _examples(prog, text)]


def _invocations(prog: str, line: str) -> list[list[str]]:
    """The argument lists of ``prog`` on one example line (split at pipes, '&' and ';')."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    tokens, out, current = list(lex), [], []
    for t in [*tokens, ";"]:
        if t in ("|", "||", "&", "&&", ";"):
            while current and ENV_ASSIGNMENT.match(current[0] + " "):
                current.pop(0)
            if current and current[0] == prog:
                out.append(current[1:])
            current = []
        else:
            current.append(t)
    return out


def _parse(prog: str, args: list[str]) -> None:
    """Parse ``args`` with the command they name, as click would before running it; raises on an
    unknown command or flag, a missing argument or a bad value."""
    cmd, name, rest = _root(prog), prog, list(args)
    while hasattr(cmd, "commands"):
        assert rest and rest[0] in cmd.commands, f"{prog}: no command in {args}"
        name, cmd, rest = f"{name} {rest[0]}", cmd.commands[rest[0]], rest[1:]
    with cmd.make_context(name, rest) as ctx:
        assert ctx.command is cmd


def _refusal(prog: str, args: list[str]) -> str:
    """Why :func:`_parse` refuses ``args`` ('' when it accepts them)."""
    try:
        _parse(prog, args)
    except AssertionError as e:
        return str(e)
    except Exception as e:
        if not _is_usage_error(e):
            raise
        return e.format_message()
    return ""


@pytest.mark.parametrize(("prog", "path"), COMMANDS, ids=[" ".join((p, *c)) for p, c in COMMANDS])
def test_every_help_has_examples_that_parse(prog, path):
    text = _help(prog, path)
    assert "Examples:" in text, f"`{' '.join((prog, *path))} --help` has no Examples section"
    full = " ".join((prog, *path))
    examples = [e for e in _example_lines(prog, text) if e == full or e.startswith(full + " ")]
    assert examples, f"`{full} --help` has no example line starting with `{full}`"
    for written, line in _examples(prog, text):
        assert "../shared" not in written and not ABSOLUTE.search(written), \
            f"example of `{full} --help` points at a path of one machine: {written}"
        calls = _invocations(prog, line)
        assert calls, line
        for args in calls:
            why = _refusal(prog, args)
            assert not why, f"example `{line}` of `{full} --help` does not parse: {why}"


# Examples cheap enough to run (no data, GPU, network or run directory): each must appear verbatim in
# its command's --help, and runs from an empty folder with no data root.
RUN_AS_WRITTEN = [
    ("ami-infer", (), "ami-infer --sample"),
    ("ami-infer", (), "ami-infer --list-models"),
    ("ami-train", (), "ami-train --list"),
    ("ami-train", (), "ami-train -m virchow2 --method lora --print-config"),
]
RUNNER = "import importlib, sys; m = importlib.import_module(sys.argv[1]); sys.argv = sys.argv[2:]; m.main()"


@pytest.mark.parametrize(("prog", "path", "example"), RUN_AS_WRITTEN, ids=[e for _, _, e in RUN_AS_WRITTEN])
def test_cheap_examples_run_as_written_from_any_folder(prog, path, example, tmp_path):
    assert example in _example_lines(prog, _help(prog, path))
    (args,) = _invocations(prog, example)
    env = {**os.environ, "AMI_DATA_ROOT": str(tmp_path / "no-data-here"), "AMI_DEBUG": ""}
    r = subprocess.run([sys.executable, "-c", RUNNER, TOOLS[prog], prog, *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"`{example}` from an empty folder: exit {r.returncode}\n{r.stdout}\n{r.stderr}"


def test_the_parser_check_can_fail():
    """An unknown flag, a missing argument and a bad value are refused (so the check above means something)."""
    for prog, args in (("ami-infer", ["--no-such-flag"]), ("ami-bench", ["gpu-hours"]),
                       ("ami-infer", ["--batch-size", "many"]), ("ami-bench", ["no-such-command"])):
        assert _refusal(prog, args), (prog, args)
    assert _examples("ami-data", "  AMI_DATA_ROOT=~/d ami-data folds   # note") == [
        ("AMI_DATA_ROOT=~/d ami-data folds", "ami-data folds")]
    assert ABSOLUTE.search("AMI_DATA_ROOT=/data/ami ami-data folds") and ABSOLUTE.search("ami-x --out /tmp/r")
    assert not ABSOLUTE.search("ami-x crops/ -o - > /dev/null --data-root ~/data/x")
    assert _invocations("ami-infer", "ami-infer a/ -o - | grep x & ami-infer b/") == [["a/", "-o", "-"], ["b/"]]
