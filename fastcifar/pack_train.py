"""The packed fold loop (train.pack): several folds (of one run, or of several runs of a sweep) trained in
lock-step by one stacked model, each fold exactly as its solo run has it.

    members = [build the fold as its solo run does (fastcifar.fold_run.build_fold, codec.restore_fold)]
    while a member has steps left:
        group = the members at the earliest (epoch, batch)        # all of them, but for a resume's laggards
        one forward and backward of the group's PackedNet on the group's own batches (fastcifar.pack)
        each member's own StepRunner.after_backward: clip, non-finite check, optimizer, Lookahead, EMA, schedule
        a member whose epoch ended: validation, best.pt, metrics.csv, last.pt (fastcifar.train.close_epoch)
        a member that is done (its epochs, or early stopping): best.pt evaluated, result.json, figures

Each member keeps its solo run's loader (its data order and augmentation draws), init (seeded alike), BatchNorm
statistics, optimizer, schedule, Lookahead, EMA and early stopping; a member that stops early leaves the group
and the others go on. A member the group left behind (a kill -9 between the members' checkpoint writes: some
saved the epoch, others not) trains alone until it is level again, then rejoins.
"""

from __future__ import annotations

import copy
import signal
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from fastcifar.artifacts import finish_fold
from fastcifar.codec import read_last, restore_fold, save_last
from fastcifar.context import RunContext
from fastcifar.device import autocast
from fastcifar.engine import EnginePlan, StepClock, compile_model, input_layout, mark_compiler_step, plan_engine, sync
from fastcifar.fold_run import FoldRun, build_fold, first_stage
from fastcifar.lifecycle import Interrupted
from fastcifar.pack import PackedNet, split_logits, stack_inputs
from fastcifar.progress import RunProgress
from fastcifar.recipe import Recipe
from fastcifar.runfiles import checkpoint_path
from fastcifar.splits import Fold
from fastcifar.state import EarlyStopping, TrainState
from fastcifar.step import EpochTotals, NonFiniteStep, StepRunner
from fastcifar.train import book_time, close_epoch, non_finite_error, open_epoch


# What the members of one pack must share: one architecture, one batch and image shape, one device, precision and
# layout, one compiled graph. Everything else (optimizer and its values, schedule, augmentation, label smoothing,
# seed, split, epochs, early stopping, evaluation) is each member's own.
# (model.activation, bn_momentum, bias_lr_scale: the packed layers take them from the first member; each member
# fits its own whitening filters, so model.whiten_init may differ.)
SHARED = ("data.store", "model.name", "model.width", "model.activation", "model.bn_momentum", "model.bias_lr_scale",
          "augment.resize", "train.batch_size", "train.device", "train.amp", "train.amp_cpu", "train.channels_last",
          "train.compile", "train.compile_mode", "train.threads", "train.deterministic")


def pack_key(recipe: Recipe) -> tuple:
    """Runs whose recipes give the same key can train their folds in one pack."""
    d = recipe.to_dict()
    return tuple(d[section][key] for section, key in (k.split(".") for k in SHARED))


@dataclass
class Member:
    """One fold of the pack: its solo parts (run), its state, and its epoch in progress."""

    run: FoldRun
    state: TrainState
    early: EarlyStopping
    totals: EpochTotals | None = None  # the epoch in progress (None between epochs)
    batches: Iterator | None = None
    clock: StepClock | None = None
    # this epoch's steps and their summed 1 / (folds trained in the step): the fold's share of the clock's time
    steps: int = 0
    share: float = 0.0
    result: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        tr = self.run.recipe.train
        return self.state.epoch >= tr.epochs or self.state.stopped_early

    @property
    def point(self) -> tuple[int, int]:
        """(epoch, batches of it done): members at the same point train together."""
        return self.state.epoch, self.run.data.train.position


def build_member(ctx: RunContext, fold: Fold) -> Member:
    """A fold as its solo run builds it (fastcifar.train.train_one_fold), at its last.pt when it resumes."""
    saved = read_last(checkpoint_path(ctx.fold_dir(fold), "last")) if ctx.resuming else None
    run = build_fold(ctx, fold, saved)
    if saved is not None:
        restore_fold(run, saved)
    state = saved or TrainState(stage=first_stage(ctx.recipe))
    return Member(run, state, EarlyStopping(ctx.recipe.eval.metric, ctx.recipe.train.early_stopping_patience))


class Packs:
    """The PackedNet of each group of members met so far (built and compiled once), and which one is bound.

    A member's numbers depend on the size of its pack (the grouped convolution's weight gradient is summed in
    another order for another number of groups), not on the other members' values or places (measured: bitwise
    equal). So a group smaller than the pack the uninterrupted run had at that point (a kill -9 left some
    members' checkpoints a step behind the others') is padded with throwaway copies of a member (`spare`):
    its members then compute bit for bit what they would have."""

    def __init__(self, members: list[Member]):
        r = members[0].run
        self.plan = plan_engine(r.recipe, r.device)
        self.nets: dict[tuple, torch.nn.Module] = {}  # by (the members' indices, spares)
        self.packed: dict[tuple, PackedNet] = {}
        self.bound: tuple | None = None
        self.index = {id(m): i for i, m in enumerate(members)}

    def net(self, group: list[Member], size: int) -> torch.nn.Module:
        """The net of `group` padded with spares to `size` members (the group first)."""
        key = (tuple(self.index[id(m)] for m in group), size - len(group))
        if key != self.bound:
            self.release()
            if key not in self.packed:
                spares = [copy.deepcopy(group[0].run.model).requires_grad_(False) for _ in range(size - len(group))]
                self.packed[key], self.nets[key] = pack_net([*(m.run.model for m in group), *spares], self.plan)
            self.packed[key].bind()
            self.bound = key
        self.packed[key].train()
        return self.nets[key]

    def release(self) -> None:
        if self.bound is not None:
            self.packed[self.bound].unbind()
            self.bound = None


def pack_net(models: list[torch.nn.Module], plan: EnginePlan) -> tuple[PackedNet, torch.nn.Module]:
    """The PackedNet of `models` (unbound) and what the step calls: it, compiled when the engine plan compiles."""
    packed = PackedNet(models)
    return packed, compile_model(packed, plan.compile_mode) if plan.compile else packed


def pack_size(members: list[Member], at: tuple[int, int]) -> int:
    """How many members the uninterrupted run trained together at point `at`: those whose epochs have a batch
    `at[1]` and that had not finished by then (a finished member ended at its point; one still training is at or
    past `at`)."""
    return sum(1 for m in members if at[1] < len(m.run.data.train) and (m.point > at if m.done else m.point >= at))


def train_pack(pairs: list[tuple[RunContext, Fold]], progress: RunProgress) -> list[dict[str, Any]]:
    """Train the folds of `pairs` packed; their results (result.json's content), in the order given."""
    members = [build_member(ctx, fold) for ctx, fold in pairs]
    packs = Packs(members)
    try:
        _loop(members, packs, progress)
    finally:
        packs.release()
        for m in members:
            m.run.tb.close()
    return [m.result for m in members]


def _label(members: list[Member]) -> str:
    return ", ".join(str(m.run.fold.index) for m in members)


def _loop(members: list[Member], packs: Packs, progress: RunProgress) -> None:
    first = members[0].run
    tr, ctx = first.recipe.train, first.ctx
    steps = len(first.data.train)
    progress.start_fold(_label(members), tr.epochs, min(m.state.epoch for m in members), steps,
                        min(m.run.data.train.position for m in members))
    shown = None
    for m in members:
        if m.done:  # a finished fold without result.json: killed in its final evaluation
            _finish(m, packs)
    while live := [m for m in members if not m.done]:
        at = min(m.point for m in live)
        group = [m for m in live if m.point == at]
        for m in group:
            if m.batches is None:
                _open(m)
        if shown != at[0]:
            progress.end_epoch()
            run = group[0].run
            progress.start_epoch(at[0], tr.epochs, run.data.train.num_images * len(group),
                                 at[1] * run.data.train.batch_size * len(group))
            shown = at[0]
        ended = [m for m in group if m.run.data.train.position >= len(m.run.data.train)]
        if not ended:
            _step(group, packs, at[1], pack_size(members, at))
            progress.step(at[1] + 1, group[0].run.data.train.batch_size * len(group))
            if ctx.hooks.on_step:
                ctx.hooks.on_step(at[0], at[1])
            ended = [m for m in group if m.run.data.train.position >= len(m.run.data.train)]
        books = [_end_training(m) for m in ended]  # every clock stops before any fold validates
        for m, (epoch, totals) in zip(ended, books):
            close_epoch(m.run, m.state, m.early, epoch, totals)
            if m.done:
                _finish(m, packs)
        stop = ctx.stop
        if stop is not None and stop.requested:
            raise _stopped([m for m in members if not m.done], stop.signum)
    progress.end_epoch()


def _open(m: Member) -> None:
    """Epoch state.epoch begins for m (or goes on, resumed mid-epoch): as fastcifar.train.train_epoch starts."""
    run = m.run
    open_epoch(run, m.state)
    m.totals = run.partial or EpochTotals.zeros(run.device, run.step.optimizer.param_groups[0]["lr"])
    run.partial = None
    run.model.train()
    m.clock = StepClock(run.warmup_left, lambda: sync(run.device))
    m.clock.start()
    m.steps, m.share = 0, 0.0
    m.batches = iter(run.data.train)


def _step(group: list[Member], packs: Packs, step: int, size: int) -> None:
    """One training step of every member of the group: one forward and backward of a pack of `size`
    (forward_backward), then each member's own after_backward. A member alone (size 1) trains through its own
    StepRunner, as its solo run."""
    batches = [next(m.batches) for m in group]
    for m in group:  # the step's wall time is the group's: each fold books 1 / len(group) of it
        m.steps, m.share = m.steps + 1, m.share + 1 / len(group)
    if size == 1:
        (m,), ((x, y),) = group, batches
        seen = m.totals.seen
        _guarded(m, step, lambda: m.run.step.step(x, y, m.totals, step))
        m.clock.step_done(m.totals.seen - seen)
        _log(m, step)
        return
    first = group[0].run
    outs = forward_backward(packs.net(group, size), [m.run.step for m in group], batches, size,
                            [m.run.recipe.train.label_smoothing for m in group], first.recipe.train.channels_last,
                            first.device, first.dtype, packs.plan.graphs == "compiler")
    for m, (loss, correct), (_, y) in zip(group, outs, batches):
        seen = m.totals.seen
        _guarded(m, step, lambda: m.run.step.after_backward(loss, correct, len(y), m.totals, step))
        m.clock.step_done(m.totals.seen - seen)
        _log(m, step)


def forward_backward(net: torch.nn.Module, steps: list[StepRunner], batches: list[tuple[torch.Tensor, torch.Tensor]],
                     size: int, smoothing: list[float], channels_last: bool, device: torch.device,
                     dtype: torch.dtype | None, compiler_graphs: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The shared half of a packed step: the members' gradients zeroed (`steps`: their runners), one forward and
    backward of the pack of `size` (`net`, bound) on the members' batches (spares, filling what the members lack,
    train on the first member's batch: nothing of theirs is kept). Returns each member's (mean loss, hits),
    detached, for its runner's after_backward. The trainer (_step) and `fastcifar bench pack` call it."""
    xs = [input_layout(x, channels_last) for x, _ in batches]
    x = stack_inputs(xs + xs[:1] * (size - len(batches)))
    if compiler_graphs:
        mark_compiler_step(x)
    for s in steps:
        s.optimizer.zero_grad(set_to_none=True)
    with autocast(device, dtype):
        logits = net(x)
    logits = split_logits(logits.float(), size)[:len(batches)]
    losses = [F.cross_entropy(out, y, label_smoothing=ls) for out, (_, y), ls in zip(logits, batches, smoothing)]
    torch.stack(losses).sum().backward()  # member j's gradient is its own loss's: the members share nothing
    outs = []
    for out, (_, y), loss in zip(logits, batches, losses):
        hard = y.argmax(1) if y.is_floating_point() else y
        outs.append((loss.detach(), (out.detach().argmax(1) == hard).sum()))
    return outs


def _guarded(m: Member, step: int, call) -> None:
    try:
        call()
    except NonFiniteStep as e:
        raise non_finite_error(m.run, m.state, e, m.state.epoch) from None


def _log(m: Member, step: int) -> None:
    loader = m.run.data.train
    m.run.tb.step(m.state.epoch * len(loader) + step, m.totals, m.run.step.optimizer.param_groups[0]["lr"])


def _end_training(m: Member) -> tuple[int, EpochTotals]:
    """m's epoch has trained its last batch: the loader closes its epoch as a for loop closes it (its epoch count,
    its state), the pending non-finite check runs and the epoch's time is booked; returns (epoch, totals)."""
    run = m.run
    for _ in m.batches:
        raise AssertionError("a packed fold's loader yielded past its epoch")
    try:
        run.step.check_pending()
    except NonFiniteStep as e:
        raise non_finite_error(run, m.state, e, m.state.epoch) from None
    book_time(run, m.state, m.totals, m.clock, m.share / m.steps if m.steps else 1.0)
    out = m.state.epoch, m.totals
    m.totals = m.batches = m.clock = None
    return out


def _finish(m: Member, packs: Packs) -> None:
    packs.release()  # the fold's BatchNorm statistics back in its own tensors before best.pt is loaded into them
    run = m.run
    m.result = run.strategy.finish_fold(lambda: finish_fold(run, m.state), run.fold.index)


def _stopped(live: list[Member], signum: int) -> Interrupted:
    """A signal asked the run to stop: every fold still training checkpoints where it is (mid-epoch: its loader
    position and the epoch's totals), then one line says how to resume."""
    for m in live:
        run = m.run
        if m.totals is not None:
            run.step.check_pending()
            book_time(run, m.state, m.totals, m.clock, m.share / m.steps if m.steps else 1.0)
            run.partial = run.strategy.reduce(m.totals)
        save_last(run, m.state)
    run = live[0].run
    where = f"epoch {live[0].state.epoch + 1} after step {run.data.train.position}/{len(run.data.train)}"
    run_dirs = {m.run.ctx.run_dir for m in live}
    how = (f"{run.strategy.resume_command} {run.ctx.run_dir / 'recipe.toml'} --out {run.ctx.run_dir} --resume"
           if len(run_dirs) == 1 else "the same fastcifar sweep command")
    return Interrupted(f"stopped by {signal.Signals(signum).name} in folds {_label(live)} (packed) {where}; each "
                       f"fold's checkpoint saved to its checkpoints/last.pt; resume with: {how}", signum)
