"""ami-infer: batched inference on crops (filled in by the inference work)."""

import typer

from . import not_yet

app = typer.Typer(add_completion=False)


@app.command()
def infer(paths: list[str] = typer.Argument(None)):
    """Classify crops as Atypical / Normal."""
    not_yet("ami-infer", "issue 5")


def main() -> None:
    app()
