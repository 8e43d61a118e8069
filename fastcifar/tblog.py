"""TensorBoard logging (train.log = [..., "tensorboard"], extra [tensorboard]) through torch.utils.tensorboard.

One event folder per fold, FOLD_DIR/tensorboard, written only by the process that writes the fold. Every scalar
sits on one step axis, the optimizer step, so a fold whose event folder exists already (resumed, or restarted
after a kill -9 before its first checkpoint) opens its writer with purge_step = the step it resumes at:
TensorBoard then drops what the interrupted process logged after its checkpoint, and the resumed run appends
without duplicate steps. Three rules make a stopped and resumed fold log the very events of an uninterrupted one:
events are flushed before every checkpoint (what a checkpoint covers is on disk before it), a step point's mean
starts from the epoch totals' log_mark, which a mid-epoch checkpoint keeps, and the resumed writer's file sorts
after the files it purges (_after_earlier_files).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fastcifar.atomic import disk_full
from fastcifar.errors import DiskFullError, RecipeError
from fastcifar.recipe import Recipe

MISSING = ('train.log: "tensorboard" needs the tensorboard package, which is not installed: '
           "pip install 'fastcifar[tensorboard]'")


def check_tensorboard(recipe: Recipe) -> None:
    if "tensorboard" in recipe.train.log and importlib.util.find_spec("tensorboard") is None:
        raise RecipeError(MISSING)


class FoldLog:
    """TensorBoard writer of one fold; every method is a no-op when TensorBoard is off or this process does not
    write the fold."""

    def __init__(self, fold_dir: Path, recipe: Recipe | None, enabled: bool, purge_step: int = 0):
        self.writer, self.every = None, recipe.train.log_every if recipe is not None else 1
        self.folder = fold_dir / "tensorboard"
        if enabled and "tensorboard" in recipe.train.log:
            from torch.utils.tensorboard import SummaryWriter  # an optional extra: imported only when asked for

            # Events already there are an earlier attempt's (a new fold has no folder): purge what it logged after
            # the checkpoint, or all of it when it died before the first one (purge_step 1).
            resumed = self.folder.exists()
            if resumed:
                _after_earlier_files(self.folder)
            with self._writing():
                self.writer = SummaryWriter(str(self.folder), purge_step=purge_step if resumed else None)
            self._hook, threading.excepthook = threading.excepthook, self._writer_thread_failed

    def _writer_thread_failed(self, args) -> None:
        """The event writer's thread dies on a write error and Python would print its traceback; the error
        reaches the trainer at its next call (_writing: one line), so only other threads' errors pass on."""
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            self._hook(args)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """The event writer's OSError (raised by its thread at the next call) as the run's disk-full line."""
        try:
            yield
        except OSError as e:
            full = disk_full(e, self.folder if self.folder.exists() else self.folder.parent)
            if full is None:
                raise
            self.writer = None  # its thread has failed: a later close (in a finally) only restores the hook
            raise DiskFullError(f"{self.folder}: disk full while writing TensorBoard events ({full}); the "
                                "checkpoints are intact, free some space and resume") from None

    @staticmethod
    def purge_after(steps_done: int) -> int:
        """The purge step of a fold resumed after `steps_done` optimizer steps: points are logged at the count of
        steps done, so everything up to steps_done is the checkpoint's and kept, everything later dropped."""
        return steps_done + 1

    def step(self, global_step: int, totals, lr: float) -> None:
        """Every log_every steps: the mean training loss over those steps (one host read) and the lr."""
        if self.writer is None or (global_step + 1) % self.every:
            return
        loss_sum, seen = float(totals.loss_sum), int(totals.seen)
        last_sum, last_seen = totals.log_mark or (0.0, 0)  # None: the epoch's first point, from its start
        with self._writing():
            if seen > last_seen:
                self.writer.add_scalar("step/train_loss", (loss_sum - last_sum) / (seen - last_seen),
                                       global_step + 1)
            self.writer.add_scalar("step/lr", lr, global_step + 1)
        totals.log_mark = (loss_sum, seen)

    def flush(self) -> None:
        """Before a checkpoint: the events it covers reach the disk first, since the resumed run purges
        everything after the checkpoint's step and re-logs only that (a kill -9 loses the writer's queue)."""
        if self.writer is not None:
            with self._writing():
                self.writer.flush()

    def epoch(self, global_step: int, row: dict[str, float]) -> None:
        if self.writer is None:
            return
        with self._writing():
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "img_per_s", "epoch_time_s"):
                if row[key] is not None:  # val_* on an epoch eval.every skipped
                    self.writer.add_scalar(f"epoch/{key}", row[key], global_step)
            self.writer.flush()

    def finish(self, recipe: Recipe, result: dict[str, Any], fold_dir: Path) -> None:
        """The hyper-parameters with the fold's final metrics (the HParams view), and the report's figures."""
        if self.writer is None:
            return
        metrics = {f"hparam/{k}": float(result[k]) for k in ("val_acc", "val_loss", "test_acc", "test_loss")
                   if isinstance(result.get(k), (int, float))}
        from PIL import Image  # the figures are PNGs written by fastcifar.figures

        with self._writing():
            self.writer.add_hparams(_flat(recipe.to_dict()), metrics, run_name=".")
            for rel in result.get("figures", []):
                with Image.open(fold_dir / rel) as im:
                    self.writer.add_image(f"figures/{Path(rel).stem}", np.asarray(im.convert("RGB")),
                                          dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        try:
            if self.writer is not None:
                with self._writing():
                    self.writer.close()
        finally:
            self.writer = None
            if threading.excepthook == self._writer_thread_failed:
                threading.excepthook = self._hook


def _after_earlier_files(folder: Path, clock=time.time, sleep=time.sleep) -> None:
    """TensorBoard reads a folder's event files in name order, and a name is `events.out.tfevents.<second>.
    <host>.<pid>.<counter>`: a writer opened in the same second as the file it must purge can sort before it
    (pid 10000 or counter 10 sort before 9 as text), and then the purge does not apply. So wait for the next
    second after the newest file's (on resume only; at most 2 s, whatever a clock skew says)."""
    stamps = [int(m.group(1)) for p in folder.glob("events.out.tfevents.*")
              if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", p.name))]
    deadline = clock() + 2.0
    while stamps and clock() < max(stamps) + 1 and clock() < deadline:
        sleep(0.05)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}; lists become strings (HParams takes scalars only)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(list(v))
    return out
