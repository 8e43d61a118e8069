"""Test helper shared by the resume tests: train a recipe whole, train it again cut short by a hook, resume the
cut run, and compare the two runs' final weights."""

import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fastcifar.checkpoint import load_checkpoint
from fastcifar.context import Hooks
from fastcifar.run import run_training

QUIET = Console(quiet=True)


def interrupt_at(epoch: int, step: int | None) -> Hooks:
    """Raise KeyboardInterrupt at (epoch, step), or after epoch `epoch` ends when step is None."""
    def on_step(e, s):
        if e == epoch and s == step:
            raise KeyboardInterrupt

    def on_epoch_end(e):
        if step is None and e == epoch:
            raise KeyboardInterrupt

    return Hooks(on_step=on_step, on_epoch_end=on_epoch_end)


def full_and_resumed(recipe, tmp_path: Path, epoch: int, step: int | None) -> tuple[Path, Path, dict]:
    """(run dir of an uninterrupted run, run dir of one stopped at (epoch, step) then resumed, the uninterrupted
    run's summary); asserts the two runs' last.pt weights are bit-identical."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    summary = run_training(recipe, full, QUIET)
    with pytest.raises(KeyboardInterrupt):
        run_training(recipe, cut, QUIET, hooks=interrupt_at(epoch, step))
    run_training(recipe, cut, QUIET, resume=True)
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (full, cut))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return full, cut, summary


def wait_until(proc, condition, timeout: float) -> bool:
    """Poll (1 ms) until condition() holds; False if the process ended or the time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.001)
    return False
