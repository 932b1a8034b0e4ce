"""ami-bench: results tables, the parity suite and latency benchmarks.

Each verb lives in its own module (table.py, parity.py, latency.py) and is registered here. The app
follows the CLI contract (:mod:`ami.runtime.cli.contract`): one line per error, the shared exit codes.
"""

from __future__ import annotations

from ami.runtime.cli.contract import AmiTyper, run

app = AmiTyper(prog="ami-bench", no_args_is_help=True, rich_markup_mode=None,
               help="Results tables (Table 3), the engine parity suite, latency benchmarks and the GPU device check.")


def _register() -> None:
    from . import card, evaluate, gpu_check, gpu_hours, latency, parity, table

    for mod in (table, parity, latency, card, gpu_check, gpu_hours, evaluate):
        mod.register(app)


def main() -> None:
    _register()
    run(app, "ami-bench")
