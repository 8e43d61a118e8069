"""A fold's state to and from its checkpoints: last.pt (everything a resume needs) and best.pt (the weights that
were validated best).

The parts of a fold's state are one list, PARTS: each a name (its key in last.pt and its TrainState field) with
how to capture it from the running fold and how to restore it into a fold built at the saved stage
(fastcifar.fold_run.build_fold). save_last captures every part; restore_fold restores every part in the list's
order (the random number generators after everything else). A new part is one row here. A part reads only what
FoldParts names, so several folds trained as one stacked model can run a view of each member through the list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from fastcifar.checkpoint import load_checkpoint, save_checkpoint
from fastcifar.engine import Engine
from fastcifar.errors import CheckpointError, first_line
from fastcifar.fold_data import FoldData
from fastcifar.fold_run import FoldRun
from fastcifar.runfiles import checkpoint_path
from fastcifar.state import TrainState
from fastcifar.step import EpochTotals, StepRunner


class FoldParts(Protocol):
    """What the parts are captured from and restored into: a FoldRun, or one member of a model that stacks
    several folds (it keeps a view like this per fold)."""

    model: torch.nn.Module
    step: StepRunner
    engine: Engine
    scaler: torch.amp.GradScaler | None
    data: FoldData
    partial: EpochTotals | None

    @property
    def device(self) -> torch.device: ...


@dataclass(frozen=True)
class Part:
    name: str  # its key in last.pt: a TrainState field
    capture: Callable[[FoldParts], Any]  # a state dict or tensor on the CPU; None where the fold has no such part
    restore: Callable[[FoldParts, Any], None]


def _optional(holder: Callable[[FoldParts], Any]) -> tuple[Callable[[FoldParts], Any],
                                                          Callable[[FoldParts, Any], None]]:
    """Capture and restore of a part not every fold has (EMA, Lookahead): None when absent; a fold that has it
    restores it (train.ema_decay and optim.lookahead_every cannot change on resume: preflight.RESUMABLE_DIFFS)."""
    def capture(f: FoldParts) -> Any:
        part = holder(f)
        return part.state_dict() if part is not None else None

    def restore(f: FoldParts, saved: Any) -> None:
        part = holder(f)
        if part is not None:
            part.load_state_dict(saved)

    return capture, restore


def _restore_scaler(f: FoldParts, saved: Any) -> None:
    # fp16 on CUDA only has a GradScaler: a run resumed on another device (train.device may change) may lack one
    if f.scaler is not None and saved is not None:
        f.scaler.load_state_dict(saved)


def _capture_cuda_rng(f: FoldParts) -> torch.Tensor | None:
    return torch.cuda.get_rng_state(f.device) if f.device.type == "cuda" else None


def _restore_cuda_rng(f: FoldParts, saved: Any) -> None:
    if f.device.type == "cuda" and saved is not None:
        torch.cuda.set_rng_state(saved, f.device)


def _restore_partial(f: FoldParts, saved: Any) -> None:
    f.partial = EpochTotals.from_state(saved, f.device) if saved is not None else None


PARTS: tuple[Part, ...] = (
    Part("model", lambda f: f.model.state_dict(), lambda f, s: f.model.load_state_dict(s)),
    # The optimizer and its schedule belong to the stage they were saved in: build_fold makes that stage's step.
    Part("optimizer", lambda f: f.step.optimizer.state_dict(), lambda f, s: f.step.optimizer.load_state_dict(s)),
    Part("scheduler", lambda f: f.step.scheduler.state_dict(), lambda f, s: f.step.scheduler.load_state_dict(s)),
    Part("ema", *_optional(lambda f: f.engine.ema)),
    Part("lookahead", *_optional(lambda f: f.step.lookahead)),
    Part("scaler", lambda f: f.scaler.state_dict() if f.scaler is not None else None, _restore_scaler),
    Part("loader", lambda f: f.data.train.state_dict(), lambda f, s: f.data.train.load_state_dict(s)),
    Part("torch_rng", lambda f: torch.get_rng_state(), lambda f, s: torch.set_rng_state(s)),
    Part("cuda_rng", _capture_cuda_rng, _restore_cuda_rng),
    # The epoch in progress's running totals: None at an epoch's end (a mid-epoch checkpoint holds them).
    Part("partial", lambda f: f.partial.state_dict() if f.partial is not None else None, _restore_partial),
)


def capture(fold: FoldParts, state: TrainState) -> None:
    """Every part of `fold` into `state`'s fields of the same names."""
    for part in PARTS:
        setattr(state, part.name, part.capture(fold))


def restore(fold: FoldParts, saved: TrainState) -> None:
    """Every part `saved` holds into `fold` (built at saved.stage), in PARTS order."""
    for part in PARTS:
        part.restore(fold, getattr(saved, part.name))


def fold_meta(run: FoldRun) -> dict[str, Any]:
    """What every checkpoint of the fold carries besides its state: evaluate and predict rebuild the model from it."""
    return {"recipe": run.recipe.to_dict(), "classes": run.classes, "fold": run.fold.index,
            "image_size": run.image_size, "preprocess": run.preprocess}


def save_last(run: FoldRun, state: TrainState) -> None:
    """last.pt: `state`'s progress with every part captured (run.partial: the epoch in progress, if any)."""
    state.accum_steps, state.skipped_total = run.step.accum, run.step.skipped_total
    if not run.strategy.writes_fold:
        return
    capture(run, state)
    run.tb.flush()  # the events this checkpoint covers are on disk before it is (fastcifar.tblog)
    save_checkpoint(run.last_path, {**fold_meta(run), **state.to_dict()})


def save_best(run: FoldRun, row: dict[str, Any]) -> None:
    """best.pt holds the weights that were validated: the EMA's when train.ema_decay is on."""
    if run.strategy.writes_fold:
        ema = run.engine.ema
        save_checkpoint(checkpoint_path(run.dir, "best"),
                        {**fold_meta(run), "model": (ema.module if ema is not None else run.model).state_dict(),
                         "weights": "ema" if ema is not None else "model", "epoch": row["epoch"], "metrics": row})


def read_last(path: Path) -> TrainState | None:
    """The TrainState last.pt holds, parts included; None when there is no checkpoint (the fold had not
    written one yet)."""
    if not path.exists():
        return None
    try:
        return TrainState.from_dict(load_checkpoint(path))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot resume from it ({first_line(e)})") from None


def restore_fold(run: FoldRun, saved: TrainState) -> None:
    """`run` (built at saved.stage) as `saved` left it: every part restored, then the strategy's say on the
    epoch in progress."""
    try:
        restore(run, saved)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{run.last_path}: cannot resume from it ({first_line(e)})") from None
    resumed_mid_epoch = run.partial is not None
    run.partial = run.strategy.resumed(run.partial)  # after the RNG: DDP ranks other than 0 re-seed their own
    where = f"epoch {saved.epoch + 1} step {run.data.train.position}" if resumed_mid_epoch else \
        f"the end of epoch {saved.epoch}"
    run.say(f"resumed {run.last_path} at {where}")
