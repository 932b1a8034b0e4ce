"""The one exception base of ami and what each kind of failure means as an exit code.

Every tool (ami-data, ami-infer, ami-train, ami-export, ami-bench) ends with one of these codes,
and they mean the same thing in each:

====  =====================================================================================
code  meaning
====  =====================================================================================
0     done, and every check and every input was fine
1     the work ran, but a check failed or some inputs failed (error rows, a parity or verify
      mismatch, a sweep job that failed): read the report
2     bad usage or bad input: a wrong flag or value, a missing or malformed file, folder, data
      root, run directory or record. Nothing was done (no half-made outputs)
3     something this machine lacks: a library or extra, an engine, a GPU, model weights, the
      network
4     a fault while running: an engine that returned nonsense, or a bug in ami (the message
      says which; ``--debug`` or ``AMI_DEBUG=1`` prints the traceback)
130   interrupted (Ctrl-C); finished work is kept and ``--resume`` continues where applicable
====  =====================================================================================

Raise a subclass of :class:`AmiError` for every failure a person should read; the CLI contract
(:mod:`ami.runtime.cli.contract`) prints its message as one line and exits with its code. Module
exceptions keep their builtin bases (``ValueError``, ``FileNotFoundError``, ...) alongside, so
existing ``except`` clauses still catch them. This module is a leaf: it imports nothing of ami.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_FAULT = 4
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "done; every check and every input was fine",
    EXIT_CHECK_FAILED: "the work ran, but a check failed or some inputs failed (see the report)",
    EXIT_BAD_INPUT: "bad usage or bad input (flag, file, folder, data root, run directory, record); nothing was done",
    EXIT_UNAVAILABLE: "something this machine lacks: a library or extra, an engine, a GPU, weights, the network",
    EXIT_FAULT: "a fault while running: an engine returned nonsense, or a bug in ami (--debug shows the traceback)",
    EXIT_INTERRUPTED: "interrupted; finished work is kept",
}


class AmiError(Exception):
    """A failure a person should read: one line, and the exit code that says what kind it is."""

    exit_code: int = EXIT_BAD_INPUT


class BadInput(AmiError):
    """Bad usage or input: a flag, file, folder, data root, run directory or record (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class CheckFailed(AmiError):
    """The work ran and a check did not pass (exit 1)."""

    exit_code = EXIT_CHECK_FAILED


class Unavailable(AmiError):
    """Something this machine lacks: a library, an engine, a device, weights, the network (exit 3)."""

    exit_code = EXIT_UNAVAILABLE


class Fault(AmiError):
    """A fault while running, such as an engine returning nonsense (exit 4)."""

    exit_code = EXIT_FAULT


def first_line(text: object) -> str:
    """The first non-empty line of a message (library errors are often many lines long)."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return str(text).strip()
