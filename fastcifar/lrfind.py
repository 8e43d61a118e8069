"""`fastcifar lr-find RECIPE`: the learning-rate range test (Smith, arXiv:1506.01186; fastai's lr_find).

The sweep: `steps` optimizer steps (default 100) on the recipe's own training batches, augmentation, loss and
optimizer (its momentum and weight decay), the lr rising exponentially from --start to --end,
lr_i = start * (end / start) ** (i / (steps - 1)); the schedule is held (this *is* the schedule) and Lookahead,
EMA and compilation are off (Lookahead would pull the weights back every few steps). The loss is smoothed by a
debiased exponential moving average (beta = 0.98, fastai's), and the sweep stops when the smoothed loss passes
4 x its minimum or a loss is not finite: the lr has diverged.

The suggestion, on the smoothed curve with its first tenth and last 5 points dropped (warm-up noise, the
divergence), never on raw loss against raw lr:
- "valley" (default; fastai 2.7's rule): the longest run of decreasing loss (longest decreasing subsequence);
  the suggestion lies halfway into its second third, an lr where the loss still falls steadily, well before the
  minimum (whose lr is already too high to train at).
- "steepest": the lr where the smoothed loss falls fastest per unit of log(lr). Less robust: on a noisy loss
  the largest drop can be a wiggle in the flat start (least squares stable for lr < 2, as in
  tests/test_lrfind.py, 24 sweeps with label noise 0.1-2: steepest picked 5e-5 to 1e-4 in 8 of them; the valley
  stayed within 0.021-0.091, conservative but always where the loss falls and SGD is stable).

A recipe with several parameter groups (optim.name = "muon": Muon on the conv filters, SGD on the rest) gets one
sweep per group, the other group frozen (lr 0: held at its recipe lr it trains the network too, and the loss
then falls at any lr of the swept group), each sweep from the same starting weights. range_test restores
the model's weights and buffers, the optimizer's state and the RNG afterwards: the model is as it was.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch


BETA = 0.98  # loss smoothing (fastai's)
DIVERGE = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum (fastai's)


@dataclass
class Sweep:
    """One group's sweep: every lr tried, its raw and smoothed loss, why it stopped, the suggestions."""

    group: str
    key: str  # the recipe key the suggestion sets
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped: str = ""
    valley: float | None = None
    steepest: float | None = None

    def suggestion(self, rule: str) -> float | None:
        return self.valley if rule == "valley" else self.steepest


def exp_lrs(start: float, end: float, steps: int) -> np.ndarray:
    return start * (end / start) ** (np.arange(steps) / max(steps - 1, 1))


def _snapshot(model: torch.nn.Module, optimizer) -> dict[str, Any]:
    cuda = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())] \
        if torch.cuda.is_initialized() else None
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()), "rng": torch.get_rng_state(), "cuda_rng": cuda,
            "training": {m: m.training for m in model.modules()}}


def _restore(model: torch.nn.Module, optimizer, snap: dict[str, Any]) -> None:
    model.load_state_dict(snap["model"])  # copies into the same tensors: the optimizer keeps its references
    optimizer.load_state_dict(snap["optimizer"])
    torch.set_rng_state(snap["rng"])
    for d, state in enumerate(snap["cuda_rng"] or []):
        torch.cuda.set_rng_state(state, d)
    for m, training in snap["training"].items():
        m.training = training


def range_test(model: torch.nn.Module, optimizer, train_step: Callable[[], float], group: int, sweep: Sweep, *,
               start: float, end: float, steps: int, held: list[float] | None = None) -> Sweep:
    """Sweep param group `group`'s lr (the others at `held`, else their current lr) with `train_step()` (one
    optimizer step, returns its loss), then put model, optimizer and RNG back as they were."""
    held = list(held) if held is not None else [g["lr"] for g in optimizer.param_groups]
    snap = _snapshot(model, optimizer)
    avg, best = 0.0, math.inf
    sweep.stopped = f"reached the last lr {end:g}"
    try:
        model.train()
        for i, lr in enumerate(exp_lrs(start, end, steps)):
            for j, g in enumerate(optimizer.param_groups):
                g["lr"] = float(lr) if j == group else held[j]
            loss = float(train_step())
            if not math.isfinite(loss):
                sweep.stopped = f"the loss went non-finite at step {i + 1}, lr {lr:.3g}"
                break
            avg = BETA * avg + (1 - BETA) * loss
            smooth = avg / (1 - BETA ** (i + 1))
            sweep.lrs.append(float(lr))
            sweep.losses.append(loss)
            sweep.smoothed.append(smooth)
            best = min(best, smooth)
            if smooth > DIVERGE * best:
                sweep.stopped = (f"diverged at step {i + 1}, lr {lr:.3g}: smoothed loss {smooth:.3g} > "
                                 f"{DIVERGE:g} x its minimum {best:.3g}")
                break
    finally:
        _restore(model, optimizer, snap)
    sweep.valley, sweep.steepest = suggest(sweep.lrs, sweep.smoothed, steps)
    return sweep


def suggest(lrs: list[float], smoothed: list[float], steps: int) -> tuple[float | None, float | None]:
    """(valley, steepest) on the smoothed curve without its first steps // 10 and last 5 points; None when
    fewer than 6 points remain (the sweep diverged almost at once: start lower)."""
    lo = steps // 10
    x, y = np.asarray(lrs[lo:len(lrs) - 5]), np.asarray(smoothed[lo:len(smoothed) - 5])
    if len(x) < 6:
        return None, None
    return float(x[valley_index(y)]), float(x[int(np.argmin(np.diff(y) / np.diff(np.log(x))))])


def valley_index(losses: np.ndarray) -> int:
    """fastai's valley: the longest decreasing subsequence of the losses, and the point halfway into its second
    third (O(n^2) for n ~ 100 points)."""
    n = len(losses)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


# ---------------------------------------------------------------------------------------------- the command


def lr_find_recipe(recipe):
    """What the sweep trains with: the recipe's optimizer, loss and data, the schedule held constant, Lookahead,
    EMA, compile and CUDA graphs off."""
    from fastcifar.recipe import ScheduleCfg

    return replace(recipe, schedule=ScheduleCfg(name="constant"),
                   optim=replace(recipe.optim, lookahead_every=0),
                   train=replace(recipe.train, compile=False, cuda_graphs=False, ema_decay=0.0))


def peak_factor(recipe) -> float:
    """How the schedule scales every group's lr at its peak: max_lr / lr for OneCycle and triangle with
    schedule.max_lr set, else 1 (the peak is the base lr)."""
    s, o = recipe.schedule, recipe.optim
    return s.max_lr / o.lr if s.name in ("onecycle", "triangle") and s.max_lr else 1.0


def groups(recipe, optimizer) -> list[tuple[int, str, str]]:
    """(param group, name, the recipe key its suggestion sets) per group that has parameters: Muon's filters
    then SGD's rest for optim.name = "muon", else the one group."""
    key = "schedule.max_lr" if peak_factor(recipe) != 1.0 else "optim.lr"
    named = [(0, "Muon (conv filters)", "optim.muon_lr"), (1, "SGD (the rest)", key)] \
        if recipe.optim.name == "muon" else [(0, "all parameters", key)]
    return [g for g in named if any(p.numel() for p in optimizer.param_groups[g[0]]["params"])]


def set_lines(recipe, sweeps: list[Sweep], rule: str) -> list[str]:
    """The --set strings of the suggestions (each the group's peak lr). The schedule multiplies Muon's lr by
    max_lr / lr like the others', so with a max_lr its key gets the peak divided by that factor."""
    values = {s.key: s.suggestion(rule) for s in sweeps if s.suggestion(rule) is not None}
    factor = values["schedule.max_lr"] / recipe.optim.lr if "schedule.max_lr" in values else peak_factor(recipe)
    return [f"{key}={(v / factor if key == 'optim.muon_lr' else v):.3g}" for key, v in values.items()]
