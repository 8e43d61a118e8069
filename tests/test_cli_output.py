"""What a user sees from the command line: whole lines in log files, fast one-line errors, --version, JSON for
scripts (issue 24, items 3, 5 and 7)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import fastcifar
from fastcifar.cli import main
from fastcifar.recipe import recipe_to_toml
from fastcifar.run import run_training

ROOT = Path(__file__).resolve().parents[1]
QUIET = Console(quiet=True)


def fastcifar_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m fastcifar ARGS` with stdout and stderr pipes (not a terminal), as in `make train > log`."""
    return subprocess.run([sys.executable, "-m", "fastcifar", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "80", **(env or {})}, timeout=600)


# ---------------------------------------------------------------------------------------------- item 3: logs


def test_a_pipe_gets_whole_epoch_lines_and_uncut_sweep_tables(tiny, tmp_path):
    """COLUMNS=80 and a pipe: rich used to lay out for 80 columns, splitting the ~110-character epoch line and
    cutting the sweep table's variant names to `optim.l…`."""
    (tmp_path / "r.toml").write_text(recipe_to_toml(tiny(train={"epochs": 1})))
    variant = "optim.lr=0.0400000000000000000000001"  # 37 characters: more than an 80-column table gives it
    done = fastcifar_cli("sweep", "r.toml", "--vary", variant, "--out", "sw", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    epoch = [line for line in done.stdout.splitlines() if line.startswith("fold 0 epoch")]
    assert len(epoch) == 2 and all(len(line) > 80 and line.rstrip().endswith("img/s") for line in epoch), epoch
    rows = [line for line in done.stdout.splitlines() if variant in line]
    assert rows and "…" not in rows[0]  # the table row holds the whole variant name, on one line
    assert not any(len(line) > 80 for line in done.stdout.splitlines() if "…" in line)
