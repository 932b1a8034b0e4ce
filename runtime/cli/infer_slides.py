"""``ami-infer --slides``: the command-line side of :mod:`ami.runtime.slides`."""

from __future__ import annotations

import typer


def run_slides_cli(a, engine) -> int:
    """Run on the detections of ``a.slides`` (the checked :class:`~ami.runtime.cli.infer.InferArgs`),
    print the run's and the per-slide summary (to stderr when the rows stream to stdout); return the
    exit code. Errors are raised (the caller turns them into one line and their exit code)."""
    from .. import slides as S
    from .infer import kept_on_fault, report

    crop = engine.meta.training_crop()
    note = " (assumed: the artefact does not record it)" if crop["assumed"] else ""
    typer.echo(f"crops: {crop['size_px']} px at {crop['mpp']:g} um/px, centred{note}; border: {a.border}", err=True)
    with kept_on_fault(a):
        summary, sums = S.run_slides(a.slides, engine, "-" if str(a.output) == "-" else a.output,
                                     slide_mpp=a.mpp, border=a.border, options=a.options())
    return report(a, summary, noun="detections", more=tuple(S.summary_lines(sums, a.output, stream=a.stream)))
