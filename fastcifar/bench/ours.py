"""Our side of the peer harnesses (bench/peer_airbench.py, bench/peer_records.py): one timed run of a recipe through
the trainer's own fold and a final test evaluation, and the mean / std of a side's runs."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastcifar.bench.timing import Clock
from fastcifar.recipe import Recipe

if TYPE_CHECKING:
    from rich.console import Console

    from fastcifar.data.store import Store


def run_ours(recipe: Recipe, store: Store, device: torch.device, console: Console) -> dict[str, float]:
    """One timed run of `recipe` through the trainer's own fold (official split) and a final test evaluation.

    train_s: the training steps of fastcifar.train.fit (per-epoch validation, without TTA, and checkpoint writes
    are excluded and reported as fit_overhead_s); eval_s: the final model's test evaluation with eval.tta."""
    from fastcifar.context import Hooks, RunContext, RunPlan
    from fastcifar.evaluate import evaluate
    from fastcifar.fold_run import build_fold, first_stage
    from fastcifar.progress import RunProgress
    from fastcifar.splits import make_folds
    from fastcifar.state import TrainState
    from fastcifar.strategy import Solo
    from fastcifar.train import fit

    fold = make_folds(len(store.train_labels), store.labels, recipe.split)[0]
    clock = Clock(device)
    # The per-epoch validation only picks best.pt, which this harness never reads: it runs without TTA (on 2
    # CPU cores 6-view TTA costs ~70 s per epoch, 1 view ~12 s). It is outside train_s either way, and eval
    # touches no random generator, so the training run is the same.
    validating = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, tta="none", tta_fraction=1.0))
    marks: list[tuple[str, Any]] = []
    per_epoch = total = 0

    def on_step(epoch: int, step: int) -> None:  # an epoch's last step (train.steps: the run's last one)
        if step == per_epoch - 1 or epoch * per_epoch + step + 1 == total:
            marks.append(("steps_done", clock.mark()))

    hooks = Hooks(on_step=on_step, on_epoch_end=lambda e: marks.append(("epoch_end", clock.mark())))
    with tempfile.TemporaryDirectory(prefix="peer-ours-") as tmp:
        plan = RunPlan(validating, store, device, Path(tmp), resume=False, folds=(fold,), beton=None)
        ctx = RunContext(plan, console, Solo(), hooks, stop=None, resuming=False)
        run = build_fold(ctx, fold)  # data prep: not timed
        state = TrainState(stage=first_stage(recipe))
        per_epoch = len(run.data.train)
        total = recipe.train.steps or recipe.train.epochs * per_epoch
        marks.append(("start", clock.mark()))
        with RunProgress(console, 1) as progress:
            fit(run, state, progress)
        t_eval = clock.mark()
        # The final model (not the best-on-test checkpoint), as the peers report, evaluated the way the trainer
        # validates: its eval net (the EMA copy when train.ema_decay is on) with eval.tta.
        tta = {"tta": recipe.eval.tta, "tta_fraction": recipe.eval.tta_fraction}
        test = evaluate(run.engine.eval_net, run.data.test, device, run.dtype, len(store.classes),
                        **{**run.eval_kwargs, **tta})
        t_done = clock.mark()
        plain = evaluate(run.engine.eval_net, run.data.test, device, run.dtype, len(store.classes),
                         **{**run.eval_kwargs, "tta": "none"})  # untimed: the accuracy without TTA
    train_s = overhead_s = 0.0
    for (_, a), (kind, b) in zip(marks, marks[1:]):  # start, (steps_done, epoch_end) per epoch
        if kind == "steps_done":
            train_s += clock.seconds(a, b)
        else:
            overhead_s += clock.seconds(a, b)
    return {"acc": float(test["acc"]), "acc_no_tta": float(plain["acc"]), "train_s": train_s,
            "fit_overhead_s": overhead_s, "eval_s": clock.seconds(t_eval, t_done),
            "params": sum(p.numel() for p in run.model.parameters()), "steps": total,
            "images": total * run.data.train.batch_size,
            # the trainer's own warm-up clock: ~one step's time when the warm-up run left nothing to compile
            "compile_time_s": float(state.compile_time_s), "precision": str(run.dtype or torch.float32)}


def stats(runs: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in keys:
        vals = [r[k] for r in runs]
        out[f"{k}_mean"] = statistics.fmean(vals)
        out[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out
