"""ami-bench: results tables, the parity suite and latency benchmarks.

Each verb lives in its own module (table.py, parity.py, latency.py) and is registered here. The app
follows the CLI contract (:mod:`ami.runtime.cli.contract`): one line per error, the shared exit codes.
"""

from __future__ import annotations

from ami.runtime.cli.contract import AmiTyper, run

EPILOG = """\b
Examples:
  ami-bench table runs/*                          # Table 3 from every run directory under runs/
  ami-bench parity --max-crops 200                # the shipped models on every engine against PyTorch
  ami-bench latency --batch-size 1,8 --crops 64 --seconds 0.5    # a quick latency smoke run
  ami-bench evaluate edge AtNorM-Br -o eval-br    # score the shipped model on a labelled crop set
  ami-bench card runs/edge -o cards/              # the model card of the edge model's run
  ami-bench gpu-check --out gpu-check/            # the device check, on a GPU box
  ami-bench gpu-hours gpu-check/gpu-check.json    # the GPU-hour table from its report

Each command's --help lists its options and more examples."""

app = AmiTyper(prog="ami-bench", no_args_is_help=True, rich_markup_mode=None, epilog=EPILOG,
               help="Results tables (Table 3), the engine parity suite, latency benchmarks and the GPU device check.")


def _register() -> None:
    from . import card, evaluate, gpu_check, gpu_hours, latency, parity, table

    for mod in (table, parity, latency, card, gpu_check, gpu_hours, evaluate):
        mod.register(app)


def main() -> None:
    _register()
    run(app, "ami-bench")
