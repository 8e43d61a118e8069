"""The parts `fastcifar lr-find` sweeps with, built from the same builders a run uses (the store and its checks,
the fold's loaders, build_model + its data init, build_step's optimizer and loss), and what it leaves behind:
OUT/lr_find.png and OUT/lr_find.json in a folder of its own (marker `.fastcifar-lrfind`)."""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fastcifar.atomic import write_json
from fastcifar.bench.timing import cycle
from fastcifar.device import recipe_amp_dtype, resolve_device
from fastcifar.figures import new_figure, save_png
from fastcifar.fold_data import make_loaders
from fastcifar.errors import RecipeError
from fastcifar.lrfind import Sweep, groups, lr_find_recipe, peak_factor, range_test, set_lines
from fastcifar.models import build_model, init_from_data
from fastcifar.ownership import check_own_dir, write_marker
from fastcifar.preflight import check_inputs
from fastcifar.recipe import Recipe, load_recipe
from fastcifar.run import configure_runtime
from fastcifar.step import EpochTotals, NonFiniteStep, StepRunner, build_step, make_scaler


@dataclass
class Parts:
    recipe: Recipe
    device: torch.device
    model: torch.nn.Module
    runner: StepRunner
    step: Callable[[], float]  # one optimizer step on the next batch; its loss (nan when not finite)
    out: Path
    batch_size: int


def prepare(args, console) -> Parts:
    """Every check first (recipe, store, model, the output folder), then the model, optimizer and batches."""
    recipe = lr_find_recipe(load_recipe(args.recipe, args.overrides))
    device = resolve_device(recipe.train.device)
    out = Path(args.out or Path("runs") / f"{recipe.name}-lr-find")
    plan = check_inputs(recipe, out, device=device, check_dir=False)  # no run folder: lr-find writes its own
    recipe, store = plan.recipe, plan.store
    check_own_dir(out, "lrfind")
    configure_runtime(recipe)
    fold = plan.folds[0]  # split.fold's fold of k, or the one train/validation split
    torch.manual_seed(recipe.train.seed * 1000 + fold.index)  # the weights training would start from
    data = make_loaders(plan, fold, log=console.print)
    model = build_model(recipe, len(store.classes), int(store.train_images.shape[1]), device)
    init_from_data(recipe.model.name, model, data.train.images, recipe.data.mean, recipe.data.std)
    dtype = recipe_amp_dtype(recipe.train, device)
    runner = build_step(model, model, recipe, device, dtype, steps_per_epoch=len(data.train),
                        scaler=make_scaler(dtype, device), log=console.print)
    batches, done = cycle(data.train), [0]

    def step() -> float:
        x, y = next(batches)
        totals = EpochTotals.zeros(device, 0.0)
        try:
            runner.step(x, y, totals, done[0])
            runner.check_pending()  # read now, not every 32 steps: the sweep stops at the first bad one
        except NonFiniteStep:
            return float("nan")
        finally:
            done[0] += 1
        if totals.skipped or not totals.seen:  # train.on_nonfinite = "skip" skipped it
            return float("nan")
        return float(totals.loss_sum) / totals.seen

    console.print(f"lr-find {recipe.name} on {device}: {recipe.model.name}, {recipe.optim.name}, batch "
                  f"{recipe.train.batch_size}, {len(data.train)} batches an epoch")
    return Parts(recipe, device, model, runner, step, out, recipe.train.batch_size)


def plot(sweeps: list[Sweep], rule: str, title: str, path: Path) -> Path:
    fig = new_figure(5.2 * len(sweeps) + 0.6, 3.8)
    axes = fig.subplots(1, len(sweeps), squeeze=False)[0]
    for ax, s in zip(axes, sweeps):
        if s.lrs:
            ax.plot(s.lrs, s.losses, color="#9ecae1", lw=0.8, label="loss")
            ax.plot(s.lrs, s.smoothed, color="#1f77b4", lw=1.6, label="smoothed")
            shown = s.smoothed[:max(len(s.smoothed) - 5, 1)]  # the divergence's last points would flatten the rest
            ax.set_ylim(min(s.smoothed) * 0.95, max(shown) * 1.1)
        for name, value, colour in (("valley", s.valley, "#1a7f37"), ("steepest", s.steepest, "#e6550d")):
            if value is not None:
                ax.axvline(value, color=colour, ls="--" if name != rule else "-",
                           label=f"{name} {value:.3g}" + (" (suggested)" if name == rule else ""))
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        ax.set_title(f"{s.group}: {s.key}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_png(fig, path)


def write_outputs(args, parts: Parts, sweeps: list[Sweep], console) -> dict[str, Any]:
    out = parts.out
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "lrfind")
    lines = set_lines(parts.recipe, sweeps, args.rule)
    title = f"lr-find {parts.recipe.name}: batch {parts.batch_size}, {parts.device}"
    png = plot(sweeps, args.rule, title, out / "lr_find.png")
    result = {"kind": "fastcifar-lr-find", "version": 1, "recipe": parts.recipe.name, "device": str(parts.device),
              "batch_size": parts.batch_size, "steps": args.steps, "start": args.start, "end": args.end,
              "rule": args.rule, "sweeps": [asdict(s) for s in sweeps], "suggested": lines}
    write_json(out / "lr_find.json", result)
    console.print(f"plot: {png}")
    if lines:
        given = " ".join(f"--set {shlex.quote(o)}" for o in args.overrides)
        sets = " ".join(f"--set {line}" for line in lines)
        console.print(f"suggested: fastcifar train {shlex.quote(args.recipe)} {given + ' ' if given else ''}{sets}")
    else:
        console.print("[yellow]no suggestion: every sweep diverged within its first steps; lower --start[/yellow]")
    return result


def run_lr_find(args, console) -> dict[str, Any]:
    """Check everything, sweep each group, write lr_find.png / lr_find.json, print the --set line."""
    if args.steps < 10:
        raise RecipeError(f"--steps: must be >= 10, got {args.steps}")
    if not 0 < args.start < args.end or not math.isfinite(args.end):
        raise RecipeError(f"--start / --end: need 0 < start < end, got {args.start:g} and {args.end:g}")
    parts = prepare(args, console)
    optimizer, factor = parts.runner.optimizer, peak_factor(parts.recipe)
    peaks = [g["lr"] * factor for g in optimizer.param_groups]
    frozen = [0.0] * len(peaks)  # the other groups do not move: the loss answers to the swept group alone
    sweeps = []
    for index, name, key in groups(parts.recipe, optimizer):
        console.print(f"lr-find: {name} ({key}; its peak lr in the recipe {peaks[index]:.3g}): {args.steps} "
                      f"steps, lr {args.start:g} -> {args.end:g}" + (", the other groups frozen"
                                                                    if len(peaks) > 1 else ""))
        sweep = range_test(parts.model, optimizer, parts.step, index, Sweep(name, key), start=args.start,
                           end=args.end, steps=args.steps, held=frozen)
        console.print(f"  stopped: {sweep.stopped}")
        console.print(f"  valley {_g(sweep.valley)}, steepest {_g(sweep.steepest)}")
        sweeps.append(sweep)
    return write_outputs(args, parts, sweeps, console)


def _g(v: float | None) -> str:
    return "none (diverged too early: lower --start)" if v is None else f"{v:.3g}"
