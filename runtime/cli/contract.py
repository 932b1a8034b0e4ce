"""The one command-line contract of every ami tool (ami-data, ami-infer, ami-train, ami-export,
ami-bench). Torch-free.

- A failure a person should read is an :class:`~ami.runtime.errors.AmiError` (or a module exception
  that inherits from one): it ends the tool with one line on stderr, ``ami-X: error: <message>``,
  and the exit code of its kind (the table in :mod:`ami.runtime.errors`).
- Anything else is a bug or a fault ami did not foresee: one line, ``ami-X: internal error: <type>:
  <first line> (run with --debug or AMI_DEBUG=1 for the traceback)``, exit 4.
- Ctrl-C: exit 130.
- ``--debug`` (anywhere on the command line) or ``AMI_DEBUG=1``: the traceback is printed too.

A tool builds its app as ``AmiTyper(prog="ami-X", ...)`` (its commands then turn AmiErrors into
the line and the exit code even when called through ``typer.testing.CliRunner``; there, set
``AMI_DEBUG=1`` for tracebacks) and its console script is ``def main(): run(app, "ami-X")``.
:func:`run` also serves a plain ``typer.Typer`` app (ami-infer's).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import typer

from .. import DIST_NAME
from ..errors import EXIT_FAULT, EXIT_INTERRUPTED, EXIT_UNAVAILABLE, AmiError, first_line

# The extra that brings each optional library a command may import (pyproject's extras).
EXTRA_OF = {"torch": "train", "torchvision": "train", "timm": "train", "peft": "train", "safetensors": "train",
            "huggingface_hub": "train", "sklearn": "train", "matplotlib": "train", "onnx": "export",
            "onnxscript": "export", "openvino": "openvino", "cv2": "openvino", "openslide": "slides",
            "tifffile": "slides", "submitit": "slurm", "ray": "ray"}

ENV_DEBUG = "AMI_DEBUG"
DEBUG_FLAG = "--debug"
CONTRACT_EPILOG = (f"Errors are one line; {DEBUG_FLAG} (anywhere on the line) or {ENV_DEBUG}=1 adds the traceback. "
                   "Exit codes (the same in every ami tool): 0 done; 1 a check or some inputs failed; 2 bad usage "
                   "or input; 3 missing on this machine (library, engine, GPU, weights, network); 4 a fault or "
                   "internal error; 130 interrupted.")


def with_contract_epilog(epilog: str | None) -> str:
    """A command's epilog followed by :data:`CONTRACT_EPILOG` (its own paragraph)."""
    return f"{epilog.rstrip()}\n\n{CONTRACT_EPILOG}" if epilog else CONTRACT_EPILOG

_debug = False


def debug_enabled() -> bool:
    """``--debug`` was given, or ``$AMI_DEBUG`` is set to something other than '', '0', 'false' or 'no'."""
    return _debug or os.environ.get(ENV_DEBUG, "").strip().lower() not in ("", "0", "false", "no")


def set_debug(on: bool = True) -> None:
    global _debug
    _debug = on


def error_line(prog: str, err: BaseException) -> str:
    """The line a tool prints for an expected error (an AmiError)."""
    return f"{prog}: error: {err}"


def internal_error_line(prog: str, err: BaseException) -> str:
    """The line a tool prints for an unexpected exception."""
    msg = first_line(err)
    return (f"{prog}: internal error: {type(err).__name__}{': ' + msg if msg else ''} "
            f"(run with {DEBUG_FLAG} or {ENV_DEBUG}=1 for the traceback)")


def fail(prog: str, message: str, code: int) -> typer.Exit:
    """Print ``prog: error: message`` on stderr and return the :class:`typer.Exit` to raise (for code
    that ends a command itself rather than raising an AmiError)."""
    typer.echo(f"{prog}: error: {message}", err=True)
    return typer.Exit(code)


def guarded(prog: str, func: Callable) -> Callable:
    """``func`` (a command) with its AmiErrors turned into the one line and the exit code, and
    Ctrl-C into exit 130. With debugging on, AmiErrors propagate (:func:`run` prints the traceback)."""

    @functools.wraps(func)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AmiError as e:
            if debug_enabled():
                raise
            typer.echo(error_line(prog, e), err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo(f"{prog}: interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return command


def guard(prog: str) -> Callable[[Callable], Callable]:
    """Decorator form of :func:`guarded`, for a command module that may be registered on a plain
    ``typer.Typer`` as well (put it under ``@app.command(...)``)."""
    return functools.partial(guarded, prog)


class AmiTyper(typer.Typer):
    """``typer.Typer`` bound to the contract: every command is :func:`guarded`, every help ends with
    :data:`CONTRACT_EPILOG`, and calling the app runs it through :func:`run`."""

    def __init__(self, *, prog: str, **kwargs: Any):
        kwargs.setdefault("add_completion", False)
        kwargs.setdefault("pretty_exceptions_enable", False)
        kwargs["epilog"] = with_contract_epilog(kwargs.get("epilog"))
        super().__init__(**kwargs)
        self.prog = prog

    def command(self, *args: Any, **kwargs: Any) -> Callable:
        kwargs["epilog"] = with_contract_epilog(kwargs.get("epilog"))
        register = super().command(*args, **kwargs)

        def decorator(func: Callable) -> Callable:
            register(guarded(self.prog, func))
            return func

        return decorator

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        run(self, self.prog)


def take_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without its ``--debug`` flags (up to a ``--``), and whether there was one."""
    out, found, options_done = [], False, False
    for a in argv:
        if a == "--":
            options_done = True
        if a == DEBUG_FLAG and not options_done:
            found = True
            continue
        out.append(a)
    return out, found


def run(app: typer.Typer, prog: str, argv: Sequence[str] | None = None) -> NoReturn:
    """Run a tool's Typer ``app`` as console script ``prog`` under the contract; never returns."""
    args, flag = take_debug_flag(sys.argv[1:] if argv is None else argv)
    if flag:
        set_debug(True)
    try:
        command = typer.main.get_command(app)
        command.main(args=args, prog_name=prog, standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _end(f"{prog}: interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # the reader went away (`ami-infer ... | head`): leave quietly
        _quiet_stdout()
        os._exit(1)
    except AmiError as e:
        _end(error_line(prog, e), e.exit_code)
    except ModuleNotFoundError as e:  # an optional library of an extra this install lacks: exit 3
        extra = EXTRA_OF.get((e.name or "").split(".")[0])
        if extra is None:
            _end(internal_error_line(prog, e), EXIT_FAULT)
        _end(f"{prog}: error: this needs {e.name}, which is not installed: pip install '{DIST_NAME}[{extra}]'",
             EXIT_UNAVAILABLE)
    except Exception as e:  # the contract: any other failure is one line and exit 4
        _end(internal_error_line(prog, e), EXIT_FAULT)
    sys.exit(0)  # pragma: no cover - click's standalone mode always exits


def _end(line: str, code: int) -> NoReturn:
    if debug_enabled():
        traceback.print_exc()
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # pragma: no cover
        pass
