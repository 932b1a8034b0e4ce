"""ami-bench table (filled in by issue 3)."""

import typer

from ami.runtime.cli import not_yet


def register(app: typer.Typer) -> None:
    @app.command("table")
    def _cmd():
        """Not implemented yet."""
        not_yet("ami-bench table", "issue 3")
