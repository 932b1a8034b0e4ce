"""ami-export (filled in by the export work)."""

import typer

from ami.runtime.cli import not_yet

app = typer.Typer(add_completion=False)


@app.command()
def export(source: str = typer.Argument(None)):
    """Export a trained run to ONNX / int8 / TensorRT."""
    not_yet("ami-export", "issue 6")


def main() -> None:
    app()
