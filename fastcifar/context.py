"""What one run is and what its folds share, each built once and handed down whole:

    plan = check_inputs(recipe, run_dir, resume, device)        # fastcifar.preflight: a RunPlan, all checked
    ctx = RunContext(plan, console, strategy, hooks, stop, resuming)   # fastcifar.run.drive

The driver passes the context to the fold loop (fastcifar.train), which passes it to the fold it assembles
(fastcifar.fold_run): nobody threads these by hand, and nothing the plan holds is checked twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.markup import escape

from fastcifar.data.store import Store
from fastcifar.lifecycle import StopFlag
from fastcifar.recipe import Recipe
from fastcifar.splits import Fold
from fastcifar.strategy import Strategy


@dataclass
class Hooks:
    """Callbacks for tests and tooling: on_step(epoch, step), on_epoch_end(epoch) after the checkpoint, and
    on_epoch_row(fold, row) after that with the epoch's metrics.csv row (`fastcifar tune` reports its validation
    numbers to the pruner, which may stop the run by raising: the checkpoint is already written)."""

    on_step: Callable[[int, int], None] | None = None
    on_epoch_end: Callable[[int], None] | None = None
    on_epoch_row: Callable[[int, dict[str, Any]], None] | None = None


@dataclass(frozen=True)
class RunPlan:
    """What fastcifar.preflight checked, for the run to consume as it is. The one check repeated is the run
    folder's, under the run lock (preflight.recheck_run_dir): another process may act between the two."""

    recipe: Recipe  # data.mean / data.std resolved from the store
    store: Store  # opened, hashes verified
    device: torch.device
    run_dir: Path
    resume: bool  # --resume: continue the run the folder holds
    folds: tuple[Fold, ...]  # the folds to train (split.fold picks one of k), each with a full training batch
    beton: Path | None  # train.loader = "ffcv": the .beton, written from this store


@dataclass(frozen=True)
class RunContext:
    plan: RunPlan
    console: Console  # what this process prints (quiet on DDP ranks other than 0)
    strategy: Strategy  # what differs across processes (fastcifar.strategy)
    hooks: Hooks
    stop: StopFlag | None  # read once per step; None: nothing can ask this run to stop
    resuming: bool  # run_dir holds this run and --resume was given: finished folds are kept, the rest resume

    @property
    def recipe(self) -> Recipe:
        return self.plan.recipe

    @property
    def store(self) -> Store:
        return self.plan.store

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir

    def fold_dir(self, fold: Fold) -> Path:
        """k-fold runs keep each fold in foldN/; other splits keep their one fold in the run directory."""
        return self.run_dir / f"fold{fold.index}" if self.recipe.split.kind == "kfold" else self.run_dir

    def say(self, text: str) -> None:
        self.console.print(text)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]warning: {escape(text)}[/yellow]")
