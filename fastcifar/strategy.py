"""What differs when several processes train one run, as one small object the run driver and the fold loop call.

`Strategy` is the interface. `Solo` is the single process: every hook does nothing (or returns its argument).
fastcifar.distributed has the two others: DDP (every rank trains every fold on its slice of the global batch;
rank 0 writes) and fold-parallel (each rank trains its own folds as ordinary single-process runs; rank 0 writes
the run's summary). Both start from Solo's do-nothing hooks and override what differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from fastcifar.lifecycle import GracefulStop, StopFlag

if TYPE_CHECKING:
    from fastcifar.engine import Engine
    from fastcifar.loader import TrainLoader
    from fastcifar.splits import Fold
    from fastcifar.step import EpochTotals


class Strategy(Protocol):
    """The hooks the run driver (fastcifar.run) and the fold loop (fastcifar.train) call; see Solo for each."""

    writes_run: bool
    writes_fold: bool
    resume_command: str
    env: dict[str, Any]

    def open_run(self, start: Callable[[], bool]) -> bool: ...
    def folds(self, folds: list[Fold]) -> list[Fold]: ...
    def stop(self, stop: GracefulStop) -> StopFlag: ...
    def adopt_loader(self, loader: TrainLoader) -> None: ...
    def adopt_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def train_net(self, model: torch.nn.Module, engine: Engine) -> torch.nn.Module: ...
    def seeded(self) -> None: ...
    def reduce(self, totals: EpochTotals) -> EpochTotals: ...
    def agree(self, row: dict[str, Any]) -> dict[str, Any]: ...
    def resumed(self, partial: EpochTotals | None) -> EpochTotals | None: ...
    def finish_fold(self, finish: Callable[[], dict[str, Any]], fold_index: int) -> dict[str, Any]: ...
    def gather(self, results: list[dict[str, Any]]) -> list[dict[str, Any]] | None: ...


class Solo:
    """One process trains every fold and writes everything (the Strategy of `fastcifar train` without torchrun)."""

    writes_run = True  # recipe.toml, data.json, env.json, summary.json, report.md
    writes_fold = True  # a fold's checkpoints, metrics.csv, result.json, figures
    resume_command = "fastcifar train"
    env: dict[str, Any] = {}  # extra env.json entries (world size and mode)

    def open_run(self, start: Callable[[], bool]) -> bool:
        """Lock and prepare the run directory (`start`, on the writing process); True when resuming."""
        return start()

    def folds(self, folds: list[Fold]) -> list[Fold]:
        """This process's share of the run's folds."""
        return folds

    def stop(self, stop: GracefulStop) -> StopFlag:
        """The stop flag the step loop reads (DDP: one the ranks agree on)."""
        return stop

    def adopt_loader(self, loader: TrainLoader) -> None:
        """Fit the training loader to this process (DDP: keep this rank's slice of every global batch)."""

    def adopt_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as this process trains it, before its optimizer exists (DDP: SyncBatchNorm)."""
        return model

    def train_net(self, model: torch.nn.Module, engine: Engine) -> torch.nn.Module:
        """What the step calls: the engine's net, compiled or graphed (DDP: the model wrapped for gradient
        averaging, then compiled)."""
        return engine.net

    def seeded(self) -> None:
        """After the fold's parts are built from the seed (DDP: each rank's own dropout stream)."""

    def reduce(self, totals: EpochTotals) -> EpochTotals:
        """An epoch's running totals over every process (DDP: summed across ranks)."""
        return totals

    def agree(self, row: dict[str, Any]) -> dict[str, Any]:
        """The epoch's metrics every process acts on (DDP: rank 0's)."""
        return row

    def resumed(self, partial: EpochTotals | None) -> EpochTotals | None:
        """The resumed epoch's totals this process counts from (DDP: rank 0's checkpoint holds the world's)."""
        return partial

    def finish_fold(self, finish: Callable[[], dict[str, Any]], fold_index: int) -> dict[str, Any]:
        """The fold's final evaluation and result.json (DDP: on rank 0, while the others wait)."""
        return finish()

    def gather(self, results: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Every fold's result on the writing process, in fold order; None elsewhere."""
        return results
