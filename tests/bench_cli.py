"""The one test helper for ``ami-bench`` verbs: a fresh app holding one verb module, registered as
bench/cli.py registers it (so a test can invoke ``[verb, ...]`` with typer's CliRunner)."""

import typer


def cli_app(module) -> typer.Typer:
    """A fresh ``ami-bench``-like app holding one verb module."""
    app = typer.Typer(add_completion=False, rich_markup_mode=None)

    @app.callback()
    def _root():  # keeps the verb a sub-command
        pass

    module.register(app)
    return app
