"""`fastcifar bench pack`: k folds trained as one pack (train.pack: one stacked model) against the same k folds
trained one after another, per model x precision x batch x compile x channels-last and pack size k.

A member is what a packed fold is in training: its own model, its own DeviceLoader over the store's training images
(its own data order and augmentation draws, and its own copy of the images on the device, as each fold's loader
holds its fold's), its own optimizer, Lookahead and EMA (build_step, as fastcifar.fold_run builds a fold's; the
schedule held constant, as in the model bench). The step is the trainer's: fastcifar.pack_train.forward_backward,
then each member's StepRunner.after_backward; a pack of one is the solo step (StepRunner.step), as in training.

k folds one after another train at the solo rate and hold one fold's memory at a time, so the k = 1 measurement is
the sequential side of every row: ratio = packed img/s / sequential img/s, and k folds packed take k / ratio times
the time of one fold. Peak memory is the cell's own: its peak above what the process held when the cell started
(the CUDA allocator's, or on Linux the resident set's peak in a window reset per cell).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from fastcifar.artifacts import peak_rss_mb, reset_peak_rss
from fastcifar.bench.env import bench_environment
from fastcifar.bench.model_bench import PRECISIONS, Cell, Plan, _cell_recipe, _Ctx, _free, _key, _label, _loader, \
    _model, plan_settings
from fastcifar.bench.timing import Rate, cycle, measure_rate
from fastcifar.engine import build_engine, plan_engine
from fastcifar.errors import first_line
from fastcifar.pack_train import forward_backward, pack_net
from fastcifar.preflight import resolve_stats
from fastcifar.recipe import Recipe, ScheduleCfg
from fastcifar.step import EpochTotals, NonFiniteStep, StepRunner, build_step, make_scaler

if TYPE_CHECKING:
    from fastcifar.data.store import Store

KS = [1, 2, 5]  # the default pack sizes


@dataclass
class _Member:
    model: torch.nn.Module
    runner: StepRunner
    batches: Iterator
    totals: EpochTotals


class CellMemory:
    """The peak memory of one measurement above what the process held when it started: the CUDA allocator's
    peak, or on the CPU the resident set's (Linux; None elsewhere, with the reason as the source)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        _free(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.base = reset_peak_rss()

    def stop(self) -> tuple[float | None, str]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return peak - self.base, "cuda allocator, above the cell's start"
        peak = peak_rss_mb() if self.base is not None else None
        if peak is None:
            return None, "not measured: the resident-set peak window needs Linux's /proc/self/clear_refs"
        return peak - self.base, "peak RSS above the cell's start (Linux VmHWM, reset per cell)"


def _pack_recipe(recipe: Recipe, cell: Cell) -> Recipe:
    """The cell's recipe as a packed run may have it: CUDA graphs and the out-of-memory retry are refused with
    packing (preflight.check_pack), so neither side uses them; the schedule is constant (no end to reach)."""
    recipe = _cell_recipe(recipe, cell)
    return replace(recipe, train=replace(recipe.train, cuda_graphs=False, oom_retry=False),
                   schedule=ScheduleCfg(name="constant"))


def _members(ctx: _Ctx, cell: Cell, recipe: Recipe, k: int, dtype) -> tuple[list[_Member], Any]:
    """k members as packed folds are built (fastcifar.fold_run.build_fold): each its model, engine (EMA, and the
    compiled net its solo step calls), step runner and loader (seeded apart: member j draws with seed j)."""
    dev = ctx.device
    in_dtype = dtype if (dtype is not None and dev.type == "cuda") else torch.float32  # as make_loaders casts
    members, engine = [], None
    for j in range(k):
        model = _model(ctx, cell.model, cell.channels_last)
        engine = build_engine(model, recipe, dev, dtype, lambda text: ctx.log(f"warning: {text}"))
        runner = build_step(engine.net, model, recipe, dev, dtype, steps_per_epoch=1, scaler=make_scaler(dtype, dev),
                            ema=engine.ema, prepare=engine.prepare, log=ctx.log)
        loader = _loader(ctx, cell.batch, in_dtype, seed=j)
        members.append(_Member(model, runner, cycle(loader),
                               EpochTotals.zeros(dev, runner.optimizer.param_groups[0]["lr"])))
    return members, engine.plan


def measure_pack(ctx: _Ctx, cell: Cell, k: int) -> dict[str, Any]:
    """Training img/s (all k members' images) and peak memory of a pack of k, through the trainer's step."""
    dev, dtype = ctx.device, PRECISIONS[cell.precision]
    memory = CellMemory(dev)
    memory.start()
    if cell.compile:
        torch._dynamo.reset()  # guards accumulate per code object across cells; past the cache limit it runs eager
    recipe = _pack_recipe(ctx.plan.recipe, cell)
    members, plan = _members(ctx, cell, recipe, k, dtype)
    packed = net = None
    if k > 1:
        packed, net = pack_net([m.model for m in members], plan)
        packed.bind()
        packed.train()
    runners = [m.runner for m in members]
    smoothing = [recipe.train.label_smoothing] * k
    steps, diverged = [0], []

    def step() -> int:
        batches = [next(m.batches) for m in members]
        try:
            if k == 1:  # a pack of one trains as its solo run (fastcifar.pack_train._step)
                members[0].runner.step(*batches[0], members[0].totals, steps[0])
            else:
                outs = forward_backward(net, runners, batches, k, smoothing, cell.channels_last, dev, dtype,
                                        plan.graphs == "compiler")
                for m, (loss, correct), (_, y) in zip(members, outs, batches):
                    m.runner.after_backward(loss, correct, len(y), m.totals, steps[0])
        except NonFiniteStep as e:  # random init on a constant lr may diverge; the timing is still valid
            diverged.append(e.step)
        steps[0] += 1
        return sum(len(y) for _, y in batches)

    p = ctx.plan
    t0 = time.perf_counter()
    rate = measure_rate(step, dev, seconds=p.seconds, repeats=p.repeats, warmup=max(p.warmup, plan.warmup_steps + 1))
    for m in members:
        m.batches.close()
        try:
            m.runner.check_pending()
        except NonFiniteStep as e:
            diverged.append(e.step)
    mem, source = memory.stop()
    if packed is not None:
        packed.unbind()
    notes = list(plan.notes) + ([f"loss went non-finite at step {min(diverged)} (timing kept)"] if diverged else [])
    return {"rate": rate, "peak_mb": mem, "source": source, "note": "; ".join(notes),
            "compile_s": rate.warmup_s if cell.compile else None, "wall_s": time.perf_counter() - t0}


def _row(ctx: _Ctx, cell: Cell, k: int, packed: dict[str, Any], solo: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {**_key(ctx, cell), "k": k, "note": packed["note"]}
    rate: Rate = packed["rate"]
    row.update(rate.fields("packed_img_s"))
    row.update(packed_peak_mb=packed["peak_mb"], peak_mem_source=packed["source"], packed_compile_s=packed["compile_s"])
    seq = solo["rate"] if solo and solo.get("rate") else None
    row.update(seq_img_s=seq.mean if seq else None, seq_img_s_spread=seq.spread if seq else None,
               seq_peak_mb=solo["peak_mb"] if seq else None)
    row["ratio"] = rate.mean / seq.mean if seq else None
    row["time_ratio"] = k / row["ratio"] if row["ratio"] else None  # k folds packed / one fold alone
    row["mem_ratio"] = (row["packed_peak_mb"] / row["seq_peak_mb"]
                        if row["packed_peak_mb"] is not None and row["seq_peak_mb"] else None)
    return row


def _measure(ctx: _Ctx, cell: Cell, k: int) -> dict[str, Any]:
    try:
        return measure_pack(ctx, cell, k)
    except Exception as e:  # one failing measurement (OOM, a layer that cannot pack) is a row that says so
        return {"rate": None, "note": f"error: {first_line(e)}", "wall_s": 0.0}
    finally:
        _free(ctx.device)


def _need(plan: Plan, cell: Cell, k: int, solo: dict[str, Any] | None) -> float:
    """Seconds a measurement of a pack of k should take: its warm-up and repeats (each at least one step) at no
    gain over the solo rate (one step of k members = k solo steps), else the timed seconds; plus building."""
    compile_s = 60.0 if cell.compile else 0.0  # a compile of the packed graph: a minute is not unusual on a GPU
    if not solo or not solo.get("rate"):
        return 2 * plan.seconds + 5 + compile_s
    step_s = k * cell.batch / solo["rate"].mean
    return max(plan.seconds, plan.repeats * step_s) + max(plan.warmup, 1) * step_s + 5 + compile_s


def run_pack_bench(store: Store, device: torch.device, plan: Plan, ks: list[int] | None = None,
                   log: Callable[[str], Any] = print,
                   on_row: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Every cell of the plan at each pack size of `ks` (the solo run, k = 1, measured first: the sequential side),
    skipping with a note what would overrun plan.budget_s; `on_row` sees each row as it is finished."""
    ks = sorted(set(ks or KS))
    plan = replace(plan, recipe=resolve_stats(plan.recipe, store))
    ctx = _Ctx(store, device, plan, log, num_classes=len(store.classes))
    images = store.train_images  # a memory map: fault its pages in once, so no cell's peak counts them
    np.asarray(images).reshape(-1)[::4096].sum()
    deadline = time.perf_counter() + plan.budget_s if plan.budget_s else None
    rows: list[dict[str, Any]] = []
    for cell in plan.cells():
        solo = None
        for k in sorted(set([1, *ks])):
            need = _need(plan, cell, k, solo)
            if deadline is not None and deadline - time.perf_counter() < need:
                got = {"rate": None, "note": f"skipped: global time budget (a measurement takes ~{need:.0f} s)"}
                log(f"skip  {_label(cell)} k={k}: time budget")
            else:
                got = _measure(ctx, cell, k)
                shown = f"{got['rate'].mean:,.0f} img/s" if got["rate"] else got["note"]
                log(f"pack  {_label(cell)} k={k}: {shown} ({got['wall_s']:.1f} s)")
            if k == 1:
                solo = got
            if k in ks:
                row = _row(ctx, cell, k, got, solo) if got["rate"] else {**_key(ctx, cell), "k": k,
                                                                         "note": got["note"]}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    settings = {**plan_settings(plan, store), "ks": ks}
    return {"kind": "fastcifar-bench", "what": "pack", "version": 1, "environment": bench_environment(device),
            "settings": settings, "rows": rows}
