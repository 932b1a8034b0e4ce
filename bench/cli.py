"""ami-bench: results tables, the parity suite and latency benchmarks.

Each verb lives in its own module (table.py, parity.py, latency.py) and is registered here.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Results tables (Table 3), the engine parity suite and latency benchmarks.")


def _register() -> None:
    from . import card, latency, parity, table

    for mod in (table, parity, latency, card):
        mod.register(app)


def main() -> None:
    _register()
    app()
