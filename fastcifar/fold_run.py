"""One fold's parts, assembled once and complete: its data, the plain model, the engine around it, the step of
its current stage, its TensorBoard log. A fold that resumes is assembled at its checkpoint's stage, its log
continuing after the checkpoint's last step; fastcifar.codec then restores the parts' state into it.

    run = build_fold(ctx, fold, saved)      # saved: the fold's last.pt as a TrainState, or None
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastcifar.context import RunContext
from fastcifar.data.images import PREPROCESS
from fastcifar.device import recipe_amp_dtype
from fastcifar.engine import Engine, build_engine
from fastcifar.fold_data import FoldData, make_loaders
from fastcifar.models import build_model, init_from_data
from fastcifar.precision import choose_cpu_precision, model_desc
from fastcifar.recipe import Recipe
from fastcifar.runfiles import checkpoint_path
from fastcifar.splits import Fold
from fastcifar.state import TrainState
from fastcifar.step import EpochTotals, StepRunner, build_step, make_scaler, set_trainable
from fastcifar.strategy import Strategy
from fastcifar.tblog import FoldLog


@dataclass
class FoldRun:
    """The parts of one fold, built complete by build_fold. `step` is replaced when the fine-tuning stage
    changes; `partial` and `warmup_left` are the loop's running state."""

    ctx: RunContext
    fold: Fold
    dir: Path
    data: FoldData
    model: torch.nn.Module  # the plain module: its state_dict is what checkpoints hold
    engine: Engine
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    step: StepRunner
    tb: FoldLog  # TensorBoard (every call a no-op when off)
    partial: EpochTotals | None = None  # the epoch in progress's totals, as a mid-epoch checkpoint holds them
    warmup_left: int = 0  # steps still timed as warm-up (engine.StepClock)
    precision: dict[str, Any] | None = None  # train.amp = "auto" on the CPU: what was chosen and how

    @property
    def recipe(self) -> Recipe:
        return self.ctx.recipe

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def strategy(self) -> Strategy:
        return self.ctx.strategy

    @property
    def classes(self) -> list[str]:
        return list(self.ctx.store.classes)

    @property
    def image_size(self) -> int:
        """The stored size; predict resizes inputs to it."""
        return int(self.ctx.store.train_images.shape[1])

    @property
    def preprocess(self) -> str:
        """How an image file became a store image (data.images): predict applies the same to its files."""
        return self.ctx.store.meta.get("preprocess", PREPROCESS)

    @property
    def last_path(self) -> Path:
        return checkpoint_path(self.dir, "last")

    @property
    def eval_kwargs(self) -> dict[str, Any]:
        return {"tta": self.recipe.eval.tta, "channels_last": self.recipe.train.channels_last,
                "tta_fraction": self.recipe.eval.tta_fraction}

    def say(self, text: str) -> None:
        self.ctx.say(text)

    def enter_stage(self, stage: int) -> None:
        """The fine-tuning stage's own step (optimizer and schedule), keeping the accumulation and skip counts."""
        self.step = make_step(self.ctx, self.model, self.engine, self.dtype, self.scaler,
                              steps_per_epoch=len(self.data.train), stage=stage, accum=self.step.accum,
                              skipped_total=self.step.skipped_total)


def first_stage(recipe: Recipe) -> int:
    return 1 if recipe.finetune.head_epochs else 2


def build_fold(ctx: RunContext, fold: Fold, saved: TrainState | None = None) -> FoldRun:
    """Every part of `fold`, seeded alike for a fresh and a resumed fold; at `saved`'s stage when it resumes."""
    recipe, store, device, strategy = ctx.recipe, ctx.store, ctx.device, ctx.strategy
    fold_dir = ctx.fold_dir(fold)
    torch.manual_seed(recipe.train.seed * 1000 + fold.index)
    data = make_loaders(ctx.plan, fold, log=ctx.say)
    strategy.adopt_loader(data.train)
    model = build_model(recipe, len(store.classes), int(store.train_images.shape[1]), device)
    init_from_data(recipe.model.name, model, data.train.images, recipe.data.mean, recipe.data.std)
    dtype, precision = recipe_amp_dtype(recipe.train, device), None
    if recipe.train.amp == "auto" and device.type == "cpu":  # the faster of fp32 / bf16 here, measured
        image_size = recipe.augment.resize or int(store.train_images.shape[1])
        precision = choose_cpu_precision(model, model_desc(recipe.model), recipe.train.batch_size, image_size,
                                         len(store.classes), recipe.train.channels_last, recipe.train.amp_cpu,
                                         ctx.say)
        dtype = precision.dtype
    model = strategy.adopt_model(model)
    # The engine wraps the model for the step (compile / CUDA graphs) and validation (EMA); run.model stays
    # the plain module, so checkpoints never carry torch.compile's "_orig_mod." prefix.
    engine = build_engine(model, recipe, device, dtype, ctx.warn)
    scaler = make_scaler(dtype, device)
    stage, accum, skipped = (saved.stage, saved.accum_steps, saved.skipped_total) if saved is not None else \
        (first_stage(recipe), 1, 0)
    step = make_step(ctx, model, engine, dtype, scaler, steps_per_epoch=len(data.train), stage=stage, accum=accum,
                     skipped_total=skipped)
    strategy.seeded()
    # A resumed fold's TensorBoard log drops what the interrupted process logged after the checkpoint.
    done = saved.steps_done(len(data.train)) if saved is not None else 0
    tb = FoldLog(fold_dir, recipe, strategy.writes_fold, purge_step=FoldLog.purge_after(done))
    return FoldRun(ctx, fold, fold_dir, data, model, engine, dtype, scaler, step, tb,
                   warmup_left=engine.plan.warmup_steps,
                   precision=precision.as_dict() if precision is not None else None)


def make_step(ctx: RunContext, model: torch.nn.Module, engine: Engine, dtype: torch.dtype | None,
              scaler: torch.amp.GradScaler | None, *, steps_per_epoch: int, stage: int, accum: int = 1,
              skipped_total: int = 0) -> StepRunner:
    """The step of `stage`: its own optimizer over what trains in it, the net the strategy makes of the engine's."""
    set_trainable(model, stage)  # before the strategy wraps the model: DDP hooks what requires grad
    net = ctx.strategy.train_net(model, engine)
    return build_step(net, model, ctx.recipe, ctx.device, dtype, steps_per_epoch=steps_per_epoch, stage=stage,
                      scaler=scaler, ema=engine.ema, prepare=engine.prepare, log=ctx.say, accum=accum,
                      skipped_total=skipped_total)
