"""ami-bench latency (filled in by issue 7)."""

import typer

from ami.runtime.cli import not_yet


def register(app: typer.Typer) -> None:
    @app.command("latency")
    def _cmd():
        """Not implemented yet."""
        not_yet("ami-bench latency", "issue 7")
