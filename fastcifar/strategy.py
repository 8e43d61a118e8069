"""What differs when several processes train one run, as one small object the run driver and the fold loop call.

`Solo` is the single process: every hook does nothing (or returns its argument). fastcifar.distributed has the
two others: DDP (every rank trains every fold on its slice of the global batch; rank 0 writes) and fold-parallel
(each rank trains its own folds as ordinary single-process runs; rank 0 writes the run's summary).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class Solo:
    """One process trains every fold and writes everything."""

    writes_run = True  # recipe.toml, data.json, env.json, summary.json, report.md
    writes_fold = True  # a fold's checkpoints, metrics.csv, result.json, figures
    resume_command = "fastcifar train"
    env: dict[str, Any] = {}  # extra env.json entries (world size and mode)

    def open_run(self, start: Callable[[], bool]) -> bool:
        """Lock and prepare the run directory (`start`, on the writing process); True when resuming."""
        return start()

    def folds(self, folds: list) -> list:
        """This process's share of the run's folds."""
        return folds

    def stop(self, stop):
        """The stop flag the step loop reads (DDP: one the ranks agree on)."""
        return stop

    def adopt_loader(self, loader) -> None:
        """Fit the training loader to this process (DDP: keep this rank's slice of every global batch)."""

    def adopt_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as this process trains it, before its optimizer exists (DDP: SyncBatchNorm)."""
        return model

    def train_net(self, model: torch.nn.Module, engine) -> torch.nn.Module:
        """What the step calls: the engine's net, compiled or graphed (DDP: the model wrapped for gradient
        averaging, then compiled)."""
        return engine.net

    def seeded(self) -> None:
        """After the fold's parts are built from the seed (DDP: each rank's own dropout stream)."""

    def reduce(self, totals):
        """An epoch's running totals over every process (DDP: summed across ranks)."""
        return totals

    def agree(self, row: dict[str, float]) -> dict[str, float]:
        """The epoch's metrics every process acts on (DDP: rank 0's)."""
        return row

    def resumed(self, partial):
        """The resumed epoch's totals this process counts from (DDP: rank 0's checkpoint holds the world's)."""
        return partial

    def finish_fold(self, finish: Callable[[], dict[str, Any]], fold_index: int) -> dict[str, Any]:
        """The fold's final evaluation and result.json (DDP: on rank 0, while the others wait)."""
        return finish()

    def gather(self, results: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Every fold's result on the writing process, in fold order; None elsewhere."""
        return results
