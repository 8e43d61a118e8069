"""Training one fold, top to bottom: build its parts once (data, model, engine, step), resume its TrainState if
a checkpoint exists, run the epoch loop, evaluate the best weights.

    run = build_fold(recipe, store, fold, fold_dir, device, console, strategy)
    state = resume_fold(run) or TrainState(stage=first_stage(recipe))
    fit(run, state, hooks, progress, stop)
    result = finish_fold(run, state)

What differs for several processes (who writes, how totals and stops are agreed) is the strategy's business
(fastcifar.strategy); this module calls its hooks and nothing else knows about ranks.
"""

from __future__ import annotations

import csv
import io
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.markup import escape

from fastcifar.artifacts import peak_memory_mb, timed_evaluate, write_figures
from fastcifar.atomic import write_json, write_text
from fastcifar.checkpoint import load_checkpoint, save_checkpoint
from fastcifar.device import recipe_amp_dtype
from fastcifar.engine import Engine, StepClock, build_engine, images_per_second, sync
from fastcifar.errors import CheckpointError, first_line
from fastcifar.evaluate import evaluate
from fastcifar.fold_data import FoldData, make_loaders
from fastcifar.lifecycle import Interrupted
from fastcifar.metrics import compute_metrics
from fastcifar.models import build_model, init_from_data, set_whiten_bias
from fastcifar.precision import choose_cpu_precision, model_desc, precision_name
from fastcifar.progress import RunProgress
from fastcifar.recipe import Recipe
from fastcifar.splits import Fold
from fastcifar.state import EarlyStopping, TrainState
from fastcifar.step import (EpochTotals, NonFiniteError, NonFiniteStep, StepRunner, build_step, make_scaler,
                            set_trainable)
from fastcifar.strategy import Solo
from fastcifar.tblog import FoldLog

CSV_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "img_per_s",
              "skipped_steps"]


@dataclass
class Hooks:
    """Callbacks for tests and tooling: on_step(epoch, step) and on_epoch_end(epoch) after the checkpoint."""

    on_step: Callable[[int, int], None] | None = None
    on_epoch_end: Callable[[int], None] | None = None


@dataclass
class FoldRun:
    """The parts of one fold, built once; `step` is rebuilt when the fine-tuning stage changes."""

    recipe: Recipe
    fold: Fold
    dir: Path
    device: torch.device
    console: Any
    strategy: Solo
    classes: list[str]
    image_size: int  # stored size; predict resizes inputs to it
    data: FoldData
    model: torch.nn.Module  # the plain module: its state_dict is what checkpoints hold
    engine: Engine
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    step: StepRunner | None = None
    partial: EpochTotals | None = None  # the interrupted epoch's totals, after a mid-epoch resume
    tb: FoldLog = field(default_factory=lambda: FoldLog(Path(), None, False))  # TensorBoard; off by default
    warmup_left: int = 0  # steps still timed as warm-up (engine.StepClock)
    precision: dict[str, Any] | None = None  # train.amp = "auto" on the CPU: what was chosen and how

    @property
    def last_path(self) -> Path:
        return self.dir / "checkpoints" / "last.pt"

    @property
    def eval_kwargs(self) -> dict[str, Any]:
        return {"tta": self.recipe.eval.tta, "channels_last": self.recipe.train.channels_last,
                "tta_fraction": self.recipe.eval.tta_fraction}

    def say(self, text: str) -> None:
        self.console.print(text)

    def meta(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_dict(), "classes": self.classes, "fold": self.fold.index,
                "image_size": self.image_size}


def warn(console, text: str) -> None:
    console.print(f"[yellow]warning: {escape(text)}[/yellow]")


def first_stage(recipe: Recipe) -> int:
    return 1 if recipe.finetune.head_epochs else 2


def build_fold(recipe: Recipe, store, fold: Fold, fold_dir: Path, device: torch.device, console,
               strategy: Solo | None = None) -> FoldRun:
    strategy = strategy or Solo()
    torch.manual_seed(recipe.train.seed * 1000 + fold.index)  # the same init for a fresh and a resumed run
    data = make_loaders(recipe, store, fold, device, log=console.print)
    strategy.adopt_loader(data.train)
    image_size = int(store.train_images.shape[1])
    model = build_model(recipe, len(store.classes), image_size, device)
    init_from_data(recipe.model.name, model, data.train.images, recipe.data.mean, recipe.data.std)
    dtype, precision = recipe_amp_dtype(recipe.train, device), None
    if recipe.train.amp == "auto" and device.type == "cpu":  # the faster of fp32 / bf16 here, measured
        precision = choose_cpu_precision(model, model_desc(recipe.model), recipe.train.batch_size,
                                         recipe.augment.resize or image_size, len(store.classes),
                                         recipe.train.channels_last, recipe.train.amp_cpu, console.print)
        dtype = precision.dtype
    model = strategy.adopt_model(model)
    # The engine wraps the model for the step (compile / CUDA graphs) and validation (EMA); run.model stays
    # the plain module, so checkpoints never carry torch.compile's "_orig_mod." prefix.
    engine = build_engine(model, recipe, device, dtype, lambda text: warn(console, text))
    run = FoldRun(recipe, fold, fold_dir, device, console, strategy, list(store.classes), image_size, data, model,
                  engine, dtype, make_scaler(dtype, device), warmup_left=engine.plan.warmup_steps,
                  precision=precision.as_dict() if precision is not None else None)
    run.step = make_step(run, first_stage(recipe))
    strategy.seeded()
    return run


def make_step(run: FoldRun, stage: int, accum: int = 1, skipped_total: int = 0) -> StepRunner:
    set_trainable(run.model, stage)  # before the strategy wraps the model: DDP hooks what requires grad
    net = run.strategy.train_net(run.model, run.engine)
    return build_step(net, run.model, run.recipe, run.device, run.dtype, steps_per_epoch=len(run.data.train),
                      stage=stage, scaler=run.scaler, ema=run.engine.ema, prepare=run.engine.prepare,
                      log=run.say, accum=accum, skipped_total=skipped_total)


# ---------------------------------------------------------------------------------------------- checkpoints


def save_last(run: FoldRun, state: TrainState, partial: EpochTotals | None = None) -> None:
    state.accum_steps, state.skipped_total = run.step.accum, run.step.skipped_total
    if not run.strategy.writes_fold:
        return
    opt, ema = run.step.optimizer, run.engine.ema
    state.model, state.optimizer, state.scheduler = (run.model.state_dict(), opt.state_dict(),
                                                     run.step.scheduler.state_dict())
    state.scaler = run.scaler.state_dict() if run.scaler is not None else None
    state.ema = ema.state_dict() if ema is not None else None
    state.lookahead = run.step.lookahead.state_dict() if run.step.lookahead is not None else None
    state.loader, state.torch_rng = run.data.train.state_dict(), torch.get_rng_state()
    state.cuda_rng = torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None
    state.partial = partial.state_dict() if partial is not None else None
    save_checkpoint(run.last_path, {**run.meta(), **state.to_dict()})


def save_best(run: FoldRun, row: dict[str, float]) -> None:
    """best.pt holds the weights that were validated: the EMA's when train.ema_decay is on."""
    if run.strategy.writes_fold:
        ema = run.engine.ema
        save_checkpoint(run.dir / "checkpoints" / "best.pt",
                        {**run.meta(), "model": (ema.module if ema is not None else run.model).state_dict(),
                         "weights": "ema" if ema is not None else "model", "epoch": row["epoch"], "metrics": row})


def resume_fold(run: FoldRun) -> TrainState | None:
    """The fold's TrainState from last.pt, with every part restored to it; None when there is no checkpoint."""
    path = run.last_path
    if not path.exists():
        return None
    try:
        state = TrainState.from_dict(load_checkpoint(path))
        run.model.load_state_dict(state.model)
        # The optimizer state belongs to the stage it was saved in.
        run.step = make_step(run, state.stage, state.accum_steps, state.skipped_total)
        run.step.optimizer.load_state_dict(state.optimizer)
        run.step.scheduler.load_state_dict(state.scheduler)
        if run.engine.ema is not None:  # ema_decay cannot change on resume (preflight.RESUMABLE_DIFFS)
            run.engine.ema.load_state_dict(state.ema)
        if run.step.lookahead is not None:
            run.step.lookahead.load_state_dict(state.lookahead)
        if run.scaler is not None and state.scaler is not None:
            run.scaler.load_state_dict(state.scaler)
        run.data.train.load_state_dict(state.loader)
        torch.set_rng_state(state.torch_rng)
        if run.device.type == "cuda" and state.cuda_rng is not None:
            torch.cuda.set_rng_state(state.cuda_rng, run.device)
        partial = EpochTotals.from_state(state.partial, run.device) if state.partial is not None else None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot resume from it ({first_line(e)})") from None
    run.partial = run.strategy.resumed(partial)
    where = f"epoch {state.epoch + 1} step {run.data.train.position}" if partial is not None else \
        f"the end of epoch {state.epoch}"
    run.say(f"resumed {path} at {where}")
    return state


# ---------------------------------------------------------------------------------------------- the loop


def fit(run: FoldRun, state: TrainState, hooks: Hooks, progress: RunProgress, stop=None) -> None:
    tr, early = run.recipe.train, EarlyStopping(run.recipe.eval.metric, run.recipe.train.early_stopping_patience)
    steps = len(run.data.train)
    progress.start_fold(run.fold.index, tr.epochs, state.epoch, steps, run.data.train.position)
    while state.epoch < tr.epochs and not state.stopped_early:
        epoch = state.epoch
        if state.stage == 1 and epoch >= run.recipe.finetune.head_epochs:
            run.step = make_step(run, 2, run.step.accum, run.step.skipped_total)
            state.stage = 2
            run.say(f"fold {run.fold.index}: stage 2 from epoch {epoch + 1}: all layers train")
        whiten = run.recipe.model.whiten_bias_epochs
        if whiten and state.stage == 2 and set_whiten_bias(run.model, epoch < whiten):
            run.step.model = run.strategy.train_net(run.model, run.engine)  # DDP hooks what requires grad
        totals = run.strategy.reduce(train_epoch(run, state, epoch, hooks, progress, stop))
        row = run.strategy.agree(validate(run, epoch, totals, validates(run.recipe, epoch)))
        end_epoch(run, state, early, row)
        run.tb.epoch((epoch + 1) * steps, row)
        val = (f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}" if row["val_acc"] is not None
               else "not validated")
        run.say(f"fold {run.fold.index} epoch {row['epoch']:>3}/{tr.epochs}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_acc']:.2%}  {val}  "
                f"lr {row['lr']:.3g}  {row['epoch_time_s']:.1f}s  {row['img_per_s']:,.0f} img/s"
                + (f"  skipped {row['skipped_steps']} steps" if row["skipped_steps"] else ""))
        if hooks.on_epoch_end:
            hooks.on_epoch_end(epoch + 1)
        if state.stopped_early:
            run.say(f"early stopping: no improvement of {run.recipe.eval.metric} for "
                    f"{tr.early_stopping_patience} epochs (best epoch {state.best_epoch})")


def train_epoch(run: FoldRun, state: TrainState, epoch: int, hooks: Hooks, progress: RunProgress,
                stop) -> EpochTotals:
    """Train until the epoch ends, or until a signal asks to stop (then checkpoint mid-epoch and raise)."""
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
                _book_time(run, state, totals, clock)
                save_last(run, state, partial=run.strategy.reduce(totals))
                raise _interrupted(run, stop.signum, epoch, loader.position)
        run.step.check_pending()
    except NonFiniteStep as e:
        raise _non_finite(run, state, e, epoch) from None
    finally:
        progress.end_epoch()
    _book_time(run, state, totals, clock)
    return totals


def _book_time(run: FoldRun, state: TrainState, totals: EpochTotals, clock: StepClock) -> None:
    """Warm-up time (compile / capture) goes to compile_time_s and is kept out of img/s (StepClock's rule)."""
    clock.stop()
    totals.seconds += clock.steady_s
    totals.warmup_s += clock.warmup_s
    totals.warmup_seen += clock.warmup_images
    state.compile_time_s += clock.warmup_s
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
            "lr": totals.lr, "epoch_time_s": totals.seconds + totals.warmup_s + time.perf_counter() - t0,
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
    run_dir = run.dir if run.recipe.split.kind != "kfold" else run.dir.parent
    return Interrupted(f"stopped by {signal.Signals(signum).name} in fold {run.fold.index} epoch {epoch + 1} "
                       f"after step {steps}/{len(run.data.train)}; checkpoint saved to {run.last_path}; resume "
                       f"with: {run.strategy.resume_command} {run_dir / 'recipe.toml'} --out {run_dir} --resume",
                       signum)


def _non_finite(run: FoldRun, state: TrainState, e: NonFiniteStep, epoch: int) -> NonFiniteError:
    kept = (f"the last good checkpoint {run.last_path} (end of epoch {state.epoch}) is kept"
            if run.last_path.exists() else "no checkpoint was written before it")
    return NonFiniteError(f"{e.what} went non-finite in fold {run.fold.index} epoch {epoch + 1} step {e.step}; "
                          f"stopped, {kept}; lower optim.lr, set train.grad_clip, or set "
                          f'train.on_nonfinite = "skip"')


# ---------------------------------------------------------------------------------------------- the result


def finish_fold(run: FoldRun, state: TrainState) -> dict[str, Any]:
    """Evaluate the best checkpoint on validation and test: full metrics, costs, figures -> result.json."""
    best = load_checkpoint(run.dir / "checkpoints" / "best.pt")
    # Into the module validation ran on (the EMA copy when on): its compiled eval graph is reused, so no
    # compile time lands in inference_ms_per_image.
    plain = run.engine.ema.module if run.engine.ema is not None else run.model
    plain.load_state_dict(best["model"])
    net, n_cls, kw = run.engine.eval_net, len(run.classes), run.eval_kwargs
    val, ms = timed_evaluate(net, run.data.val, run.device, run.dtype, n_cls, **kw)
    result: dict[str, Any] = {
        "fold": run.fold.index, "best_epoch": best["epoch"], "epochs_run": state.epoch,
        "stopped_early": state.stopped_early, "val_acc": val["acc"], "val_loss": val["loss"],
        "val_per_class_acc": val["per_class_acc"], "classes": run.classes,
        "train_time_s": sum(r["epoch_time_s"] for r in state.history),
        "params": sum(p.numel() for p in run.model.parameters()),
        "stage_boundary": run.recipe.finetune.head_epochs or None}
    final, split, final_loader = val, "val", run.data.val
    if run.data.test is not None:
        if run.data.test is not run.data.val:
            result["val_metrics"] = compute_metrics(val["logits"], val["targets"], n_cls)
            final, ms = timed_evaluate(net, run.data.test, run.device, run.dtype, n_cls, **kw)
        result.update(test_acc=final["acc"], test_loss=final["loss"], test_per_class_acc=final["per_class_acc"],
                      test_confusion=final["confusion"])
        split, final_loader = "test", run.data.test
    result["metrics"] = {"split": split, **compute_metrics(final["logits"], final["targets"], n_cls)}
    # best.pt competed on the validation set: numbers on that same set (official split, merged k-fold) flatter it
    # unless the last validated epoch won (its weights never depended on that set)
    validated = [int(r["epoch"]) for r in state.history if r["val_acc"] is not None]
    result["selection"] = {"validations": len(validated), "on_reported_set": final is val,
                           "last_validated_epoch": max(validated, default=None)}
    result["inference_ms_per_image"] = ms
    result["peak_memory_mb"], result["peak_memory_kind"] = peak_memory_mb(run.device)
    result["compile_time_s"] = state.compile_time_s  # warm-up steps, kept out of img_per_s
    if "tta_selection" in final:  # selective TTA: how many of the reported set got the views, at what threshold
        result["tta_selection"] = final["tta_selection"]
    result["engine"] = {**run.engine.summary(run.step.optimizer), "tta": run.recipe.eval.tta,
                        "tta_fraction": run.recipe.eval.tta_fraction,
                        "channels_last": run.recipe.train.channels_last,
                        "precision": run.precision or {"precision": precision_name(run.dtype), "chosen_by": "recipe"}}
    write_json(run.dir / "result.json", result)  # before the figures: a figure can never cost the result
    if run.recipe.eval.figures:
        _figures(run, state, result, final, final_loader, plain)
    run.tb.finish(run.recipe, result, run.dir)
    return result


def _figures(run: FoldRun, state: TrainState, result: dict[str, Any], final, loader, model) -> None:
    train = run.data.train
    try:
        result["figures"] = write_figures(
            run.dir, state.history, final, run.classes, loader, train.images.cpu().numpy(),
            train.labels.cpu().numpy(), model, run.recipe.finetune.head_epochs or None,
            run.recipe.eval.gradcam_layer)
    except Exception as e:  # noqa: BLE001 - plotting libraries fail in many ways; the fold is done
        result["figures_error"] = first_line(e)[:200]
        run.say(f"[yellow]fold {run.fold.index}: figures not written ({escape(result['figures_error'])}); the "
                "model and result.json are kept[/yellow]")
    write_json(run.dir / "result.json", result)


def train_one_fold(recipe: Recipe, store, fold: Fold, fold_dir: Path, device: torch.device, console,
                   resuming: bool, hooks: Hooks, progress: RunProgress, stop, strategy: Solo) -> dict[str, Any]:
    """One fold from its parts to its result (the run driver calls this for each of its folds)."""
    run = build_fold(recipe, store, fold, fold_dir, device, console, strategy)
    state = (resume_fold(run) if resuming else None) or TrainState(stage=first_stage(recipe))
    steps_done = state.epoch * len(run.data.train) + run.data.train.position
    run.tb = FoldLog(fold_dir, recipe, strategy.writes_fold, purge_step=FoldLog.purge_after(steps_done))
    try:
        fit(run, state, hooks, progress, stop)
        return strategy.finish_fold(lambda: finish_fold(run, state), fold.index)
    finally:
        run.tb.close()
