"""A fold's training state (what a checkpoint holds, in one dataclass with one to_dict / from_dict) and early
stopping as a small pure rule."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

OPTIONAL = ("lookahead",)  # parts newer than the first checkpoints: absent from those, None when read
# The progress fields, stored under "state" in a checkpoint (the layout of checkpoints written since resume
# existed, so older runs still resume).
PROGRESS = ("epoch", "history", "best_metric", "best_epoch", "bad_epochs", "stopped_early", "accum_steps",
            "compile_time_s")


@dataclass
class TrainState:
    """Everything a fold needs to continue exactly where it stopped."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics.csv row per epoch
    best_metric: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    accum_steps: int = 1  # micro-batches per batch (raised by an out-of-memory retry)
    compile_time_s: float = 0.0  # warm-up (compile / CUDA-graph capture) wall time, summed over resumes
    stage: int = 2  # 1: only the classifier head trains (finetune.head_epochs), 2: everything
    skipped_total: int = 0  # non-finite steps skipped in this fold (train.on_nonfinite = "skip")
    # State dicts of the parts, captured at a checkpoint; None where the run has no such part.
    model: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None
    lookahead: dict[str, Any] | None = None  # optim.lookahead_every: the slow weights and the step count
    loader: dict[str, Any] | None = None  # the training loader's state_dict: "pos" = batches of the epoch done
    torch_rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None
    partial: dict[str, Any] | None = None  # the interrupted epoch's running totals (a mid-epoch checkpoint)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint payload (fastcifar.checkpoint adds its format tag and the run's meta)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PROGRESS}
        out["state"] = {k: getattr(self, k) for k in PROGRESS}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        """KeyError / TypeError / ValueError on a payload of another layout (the caller names the file)."""
        parts = {f.name: d[f.name] if f.name not in OPTIONAL else d.get(f.name)
                 for f in fields(cls) if f.name not in PROGRESS}
        progress = {k: d["state"][k] for k in PROGRESS}
        state = cls(**parts, **progress)
        state.epoch, state.stage, state.skipped_total = int(state.epoch), int(state.stage), int(state.skipped_total)
        if not isinstance(state.loader, dict):
            raise TypeError(f"loader: expected a dict, got {type(state.loader).__name__}")
        int(state.loader.get("pos", 0))  # read by steps_done before anything is restored
        return state

    def steps_done(self, steps_per_epoch: int) -> int:
        """Optimizer steps the fold had taken when this state was captured (a resumed fold continues after it)."""
        return self.epoch * steps_per_epoch + int(self.loader.get("pos", 0) if self.loader is not None else 0)


@dataclass(frozen=True)
class EarlyStopping:
    """eval.metric decides the best epoch; `patience` epochs without improvement stop the fold (0 = never)."""

    metric: str  # "val_acc" (higher is better) or "val_loss" (lower is better)
    patience: int

    def score(self, row: dict[str, float]) -> float:
        return row["val_acc"] if self.metric == "val_acc" else -row["val_loss"]

    def update(self, state: TrainState, row: dict[str, float]) -> bool:
        """Book the epoch's row into `state`; True when it is the best so far (its weights are best.pt)."""
        score = self.score(row)
        improved = state.best_metric is None or score > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = score, int(row["epoch"]), 0
        else:
            state.bad_epochs += 1
        state.stopped_early = bool(self.patience) and state.bad_epochs >= self.patience
        return improved
