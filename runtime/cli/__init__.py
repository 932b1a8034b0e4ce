"""Typer command-line front ends (torch-free ones live here: ami-data, ami-infer)."""

from __future__ import annotations

import typer

DATA_ROOT_HELP = ("Folder holding AMi-Br/, AtNorM-Br/, AtNorM-MD/ and amibr_train_split.csv. "
                  "Default: $AMI_DATA_ROOT, else ~/.local/share/ami/ami-br-benchmark.")


def not_yet(command: str, issue: str) -> None:
    """For verbs that a later piece of work fills in: fail loudly instead of pretending."""
    typer.echo(f"{command} is not implemented yet ({issue}).", err=True)
    raise typer.Exit(2)
