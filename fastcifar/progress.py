"""What a user sees while a run trains. In a terminal: rich bars for the epoch and for the whole run, with its ETA.
Elsewhere (nohup, CI, `make train > log`), where bars print nothing until the epoch ends: one short line at most
every LINE_EVERY_S seconds with fold, epoch, step, img/s and the ETA of the epoch and of the run, folds included.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from rich.progress import (BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

if TYPE_CHECKING:
    from rich.console import Console

LINE_EVERY_S = 30.0  # a 10-minute CPU epoch prints ~20 lines; a 5-second GPU epoch prints none between epochs


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "-- img/s")


def clock_text(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunProgress:
    """The run's progress over the folds this process trains (`folds`: how many are left to train)."""

    def __init__(self, console: Console, folds: int, clock: Callable[[], float] = time.monotonic):
        self.console, self.clock, self.folds_left = console, clock, folds
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                             RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                             transient=True, disable=not console.is_terminal)
        self.run_task = None
        self.epoch_task = None
        self.fold_steps = 0  # this fold's steps still to train when it started (an upper bound: early stopping)
        self.steps_done = 0  # steps trained by this process in this fold, since it started
        self._t0 = self._last_line = self.clock()
        self._line_images = 0

    def __enter__(self) -> "RunProgress":
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def start_fold(self, index: int | str, epochs: int, epochs_done: int, steps_per_epoch: int, position: int) -> None:
        self.fold, self.steps_per_epoch, self.full_fold = index, steps_per_epoch, epochs * steps_per_epoch
        self.fold_steps = self.full_fold - epochs_done * steps_per_epoch - position
        self.steps_done = 0
        self.folds_left -= 1
        total = self.fold_steps + self.folds_left * self.full_fold
        if self.run_task is None:
            self.run_task = self.bars.add_task("run (steps, all folds)", total=total)
        self._t0 = self._last_line = self.clock()
        self._line_images = 0

    def start_epoch(self, epoch: int, epochs: int, total_images: int, done_images: int) -> None:
        self.epoch, self.epochs = epoch, epochs
        self.epoch_task = self.bars.add_task(f"fold {self.fold} epoch {epoch + 1}/{epochs}", total=total_images,
                                             completed=done_images)

    def end_epoch(self) -> None:
        if self.epoch_task is not None:
            self.bars.remove_task(self.epoch_task)
            self.epoch_task = None

    def step(self, position: int, images: int) -> None:
        """After each step; `position`: batches of the epoch done."""
        self.steps_done += 1
        self._line_images += images
        self.bars.advance(self.epoch_task, images)
        self.bars.advance(self.run_task, 1)
        now = self.clock()
        if not self.console.is_terminal and now - self._last_line >= LINE_EVERY_S:
            self._line(position, now)

    def _line(self, position: int, now: float) -> None:
        rate = self.steps_done / max(now - self._t0, 1e-9)  # steps/s of this fold so far
        img_s = self._line_images / max(now - self._last_line, 1e-9)
        epoch_left = (self.steps_per_epoch - position) / rate
        run_left = (self.fold_steps - self.steps_done + self.folds_left * self.full_fold) / rate
        self.console.print(f"fold {self.fold} epoch {self.epoch + 1}/{self.epochs} step {position}/"
                           f"{self.steps_per_epoch}  {img_s:,.0f} img/s  ETA epoch {clock_text(epoch_left)}, "
                           f"run {clock_text(run_left)}", highlight=False)
        self._last_line, self._line_images = now, 0
