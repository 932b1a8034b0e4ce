"""Typer command-line front ends (torch-free ones live here: ami-data, ami-infer)."""

from __future__ import annotations

DATA_ROOT_HELP = ("Folder holding AMi-Br/, AtNorM-Br/, AtNorM-MD/ and amibr_train_split.csv. "
                  "Default: $AMI_DATA_ROOT, else ~/.local/share/ami/ami-br-benchmark.")
