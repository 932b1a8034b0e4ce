"""ami-bench: results tables, the parity suite and latency benchmarks.

Each verb lives in its own module (table.py, parity.py, latency.py) and is registered here.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Results tables (Table 3), the engine parity suite, latency benchmarks and the GPU device check.")


def _register() -> None:
    from . import card, evaluate, gpu_check, latency, parity, table

    for mod in (table, parity, latency, card, gpu_check, evaluate):
        mod.register(app)


def main() -> None:
    _register()
    app()
