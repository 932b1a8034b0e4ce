"""``ami-infer --slides``: the command-line side of :mod:`ami.runtime.slides`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..engines import EngineError
from ..infer import InputError


def _fail(msg: str, code: int = 2) -> typer.Exit:
    typer.echo(f"ami-infer: error: {msg}", err=True)
    return typer.Exit(code)


def run_slides_cli(detections: Path, engine, out: Path, fmt: str, *, mpp: float | None, border: str, **kw) -> None:
    """Run, print the run's and the per-slide summary, and exit with the run's code (never returns)."""
    from .. import slides as S

    try:
        crop = engine.meta.training_crop()
        note = " (assumed: the artefact does not record it)" if crop["assumed"] else ""
        typer.echo(f"crops: {crop['size_px']} px at {crop['mpp']:g} um/px, centred{note}; border: {border}", err=True)
        summary, sums = S.run_slides(detections, engine, out, fmt, slide_mpp=mpp, border=border, **kw)
    except InputError as e:
        raise _fail(str(e)) from None
    except EngineError as e:
        raise _fail(f"{e}\nrows written so far are kept in {out}; rerun with --resume", 3) from None
    except OSError as e:
        raise _fail(f"cannot write {out}: {e.strerror or e}") from None
    except ValueError as e:  # e.g. a malformed 'crop' in the artefact's metadata (ArtifactError)
        raise _fail(str(e)) from None
    for line in summary.lines():
        typer.echo(line)
    for line in S.summary_lines(sums, out):
        typer.echo(line)
    if summary.any_failed and not summary.interrupted:
        n = summary.failed + summary.skipped_failed
        typer.echo(f"exit code 1: {n} of {summary.found} detections failed", err=True)
    raise typer.Exit(summary.exit_code)
