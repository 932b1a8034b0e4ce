"""ami-bench parity (filled in by issue 7)."""

import typer

from ami.runtime.cli import not_yet


def register(app: typer.Typer) -> None:
    @app.command("parity")
    def _cmd():
        """Not implemented yet."""
        not_yet("ami-bench parity", "issue 7")
