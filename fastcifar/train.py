"""The fold loop: train one fold from its parts to its result.

    saved = read_last(...)                          # fastcifar.codec: the fold's last.pt, or None
    run = build_fold(ctx, fold, saved)              # fastcifar.fold_run: every part, at the saved stage
    restore_fold(run, saved)                        # fastcifar.codec, when it resumes
    fit(run, state, progress)                       # the epochs: train, validate, checkpoint
    result = finish_fold(run, state)                # fastcifar.artifacts: best.pt evaluated, result.json, figures

What differs for several processes (who writes, how totals and stops are agreed) is the strategy's business
(fastcifar.strategy); this module calls its hooks and nothing else knows about ranks.
"""

from __future__ import annotations

import csv
import io
import signal
import time
from typing import Any

from fastcifar.artifacts import finish_fold
from fastcifar.atomic import write_text
from fastcifar.codec import read_last, restore_fold, save_best, save_last
from fastcifar.context import RunContext
from fastcifar.engine import StepClock, images_per_second, sync
from fastcifar.evaluate import evaluate
from fastcifar.fold_run import FoldRun, build_fold, first_stage
from fastcifar.lifecycle import Interrupted
from fastcifar.models import set_whiten_bias
from fastcifar.progress import RunProgress
from fastcifar.recipe import Recipe
from fastcifar.runfiles import checkpoint_path
from fastcifar.splits import Fold
from fastcifar.state import EarlyStopping, TrainState
from fastcifar.step import EpochTotals, NonFiniteError, NonFiniteStep

CSV_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "img_per_s",
              "skipped_steps"]


def train_one_fold(ctx: RunContext, fold: Fold, progress: RunProgress) -> dict[str, Any]:
    """One fold from its parts to its result (the run driver calls this for each of its folds)."""
    saved = read_last(checkpoint_path(ctx.fold_dir(fold), "last")) if ctx.resuming else None
    run = build_fold(ctx, fold, saved)
    if saved is not None:
        restore_fold(run, saved)
    state = saved or TrainState(stage=first_stage(ctx.recipe))
    try:
        fit(run, state, progress)
        return ctx.strategy.finish_fold(lambda: finish_fold(run, state), fold.index)
    finally:
        run.tb.close()


# ---------------------------------------------------------------------------------------------- the loop


def fit(run: FoldRun, state: TrainState, progress: RunProgress) -> None:
    """The fold's remaining epochs: stage changes, train, validate, book (best.pt, metrics.csv, last.pt)."""
    tr = run.recipe.train
    early = EarlyStopping(run.recipe.eval.metric, tr.early_stopping_patience)
    steps = len(run.data.train)
    progress.start_fold(run.fold.index, tr.epochs, state.epoch, steps, run.data.train.position)
    while state.epoch < tr.epochs and not state.stopped_early:
        epoch = state.epoch
        open_epoch(run, state)
        totals = train_epoch(run, state, epoch, progress)
        close_epoch(run, state, early, epoch, totals)


def open_epoch(run: FoldRun, state: TrainState) -> None:
    """What changes as epoch state.epoch begins: the fine-tuning stage, the whitening bias."""
    epoch = state.epoch
    if state.stage == 1 and epoch >= run.recipe.finetune.head_epochs:
        run.enter_stage(2)
        state.stage = 2
        run.say(f"fold {run.fold.index}: stage 2 from epoch {epoch + 1}: all layers train")
    whiten = run.recipe.model.whiten_bias_epochs
    if whiten and state.stage == 2 and set_whiten_bias(run.model, epoch < whiten):
        run.step.net = run.strategy.train_net(run.model, run.engine)  # DDP hooks what requires grad


def close_epoch(run: FoldRun, state: TrainState, early: EarlyStopping, epoch: int, totals: EpochTotals) -> None:
    """An epoch's trained totals to its books: validation, best.pt, metrics.csv, last.pt, its line, the hooks."""
    hooks, tr = run.ctx.hooks, run.recipe.train
    totals = run.strategy.reduce(totals)
    row = run.strategy.agree(validate(run, epoch, totals, validates(run.recipe, epoch)))
    run.tb.epoch((epoch + 1) * len(run.data.train), row)  # before end_epoch's checkpoint: resuming never re-logs
    end_epoch(run, state, early, row)
    val = (f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}" if row["val_acc"] is not None
           else "not validated")
    run.say(f"fold {run.fold.index} epoch {row['epoch']:>3}/{tr.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.2%}  {val}  "
            f"lr {row['lr']:.3g}  {row['epoch_time_s']:.1f}s  {row['img_per_s']:,.0f} img/s"
            + (f"  skipped {row['skipped_steps']} steps" if row["skipped_steps"] else ""))
    if hooks.on_epoch_end:
        hooks.on_epoch_end(epoch + 1)
    if hooks.on_epoch_row:
        hooks.on_epoch_row(run.fold.index, row)
    if state.stopped_early:
        run.say(f"early stopping: no improvement of {run.recipe.eval.metric} for "
                f"{tr.early_stopping_patience} epochs (best epoch {state.best_epoch})")


def train_epoch(run: FoldRun, state: TrainState, epoch: int, progress: RunProgress) -> EpochTotals:
    """Train until the epoch ends, or until a signal asks to stop (then checkpoint mid-epoch and raise)."""
    hooks, stop = run.ctx.hooks, run.ctx.stop
    totals = run.partial or EpochTotals.zeros(run.device, run.step.optimizer.param_groups[0]["lr"])
    run.partial = None
    loader = run.data.train
    run.model.train()
    progress.start_epoch(epoch, run.recipe.train.epochs, loader.num_images, loader.position * loader.batch_size)
    clock = StepClock(run.warmup_left, lambda: sync(run.device))
    clock.start()
    try:
        for x, y in loader:
            step, seen = loader.position - 1, totals.seen
            run.step.step(x, y, totals, step)
            clock.step_done(totals.seen - seen)
            progress.step(loader.position, len(y))
            run.tb.step(epoch * len(loader) + step, totals, run.step.optimizer.param_groups[0]["lr"])
            if hooks.on_step:
                hooks.on_step(epoch, step)
            if run.recipe.train.steps and epoch * len(loader) + loader.position >= run.recipe.train.steps:
                break  # train.steps: a fractional last epoch (preflight.check_steps put it in this one)
            if stop is not None and stop.requested:
                run.step.check_pending()  # never checkpoint a step that went non-finite
                book_time(run, state, totals, clock)
                run.partial = run.strategy.reduce(totals)  # last.pt holds the epoch so far
                save_last(run, state)
                raise _interrupted(run, stop.signum, epoch, loader.position)
        run.step.check_pending()
    except NonFiniteStep as e:
        raise non_finite_error(run, state, e, epoch) from None
    finally:
        progress.end_epoch()
    book_time(run, state, totals, clock)
    return totals


def book_time(run: FoldRun, state: TrainState, totals: EpochTotals, clock: StepClock, share: float = 1.0) -> None:
    """Warm-up time (compile / capture) goes to compile_time_s and is kept out of img/s (StepClock's rule).
    share: the part of the clock's time that is this fold's (a packed fold: fastcifar.pack_train splits each
    step's time evenly among the folds it trained, so the folds' times add up to the run's wall time)."""
    clock.stop()
    totals.seconds += clock.steady_s * share
    totals.warmup_s += clock.warmup_s * share
    totals.warmup_seen += clock.warmup_images
    state.compile_time_s += clock.warmup_s * share
    run.warmup_left = clock.warmup_left


def validates(recipe: Recipe, epoch: int) -> bool:
    """eval.every: validate after every `every`-th epoch (0: none) and always after the last (0-based epoch)."""
    every, done = recipe.eval.every, epoch + 1
    return done == recipe.train.epochs or (every > 0 and done % every == 0)


def validate(run: FoldRun, epoch: int, totals: EpochTotals, validating: bool = True) -> dict[str, Any]:
    """The epoch's metrics.csv row: training totals and one validation pass (val_* None when not validating)."""
    t0 = time.perf_counter()
    val = {"loss": None, "acc": None}
    if validating:
        val = evaluate(run.engine.eval_net, run.data.val, run.device, run.dtype, len(run.classes),
                       **run.eval_kwargs)
    seen = max(totals.seen, 1)
    return {"epoch": epoch + 1, "train_loss": float(totals.loss_sum) / seen,
            "train_acc": int(totals.correct) / seen, "val_loss": val["loss"], "val_acc": val["acc"],
            "lr": totals.lr, "lr_steps": totals.lr_curve(epoch, len(run.data.train)),
            "epoch_time_s": totals.seconds + totals.warmup_s + time.perf_counter() - t0,
            "img_per_s": images_per_second(totals.seen, totals.seconds, totals.warmup_seen, totals.warmup_s),
            "skipped_steps": totals.skipped}


def end_epoch(run: FoldRun, state: TrainState, early: EarlyStopping, row: dict[str, float]) -> None:
    """Book the epoch: best.pt when it improved, metrics.csv, and last.pt on schedule."""
    state.history.append(row)
    state.epoch = row["epoch"]
    if row["val_acc"] is not None and early.update(state, row):  # eval.every: only validated epochs compete
        save_best(run, row)
    if run.strategy.writes_fold:
        write_text(run.dir / "metrics.csv", metrics_csv(state.history))
    tr = run.recipe.train
    if state.epoch % tr.checkpoint_every == 0 or state.stopped_early or state.epoch == tr.epochs:
        save_last(run, state)


def metrics_csv(history: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in CSV_FIELDS})
    return buf.getvalue()


def _interrupted(run: FoldRun, signum: int, epoch: int, steps: int) -> Interrupted:
    run_dir = run.ctx.run_dir
    return Interrupted(f"stopped by {signal.Signals(signum).name} in fold {run.fold.index} epoch {epoch + 1} "
                       f"after step {steps}/{len(run.data.train)}; checkpoint saved to {run.last_path}; resume "
                       f"with: {run.strategy.resume_command} {run_dir / 'recipe.toml'} --out {run_dir} --resume",
                       signum)


def non_finite_error(run: FoldRun, state: TrainState, e: NonFiniteStep, epoch: int) -> NonFiniteError:
    kept = (f"the last good checkpoint {run.last_path} (end of epoch {state.epoch}) is kept"
            if run.last_path.exists() else "no checkpoint was written before it")
    return NonFiniteError(f"{e.what} went non-finite in fold {run.fold.index} epoch {epoch + 1} step {e.step}; "
                          f"stopped, {kept}; lower optim.lr, set train.grad_clip, or set "
                          f'train.on_nonfinite = "skip"')
