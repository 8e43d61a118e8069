"""`fastcifar bench`: training and inference throughput, latency, memory, energy and FLOPs per model x precision x
batch x compile x channels-last, with the seed projects' way (fp32, eager, NCHW, DataLoader workers) timed beside it.

A cell trains through the same pieces `fastcifar train` uses (DeviceLoader + build_train_transform, the engine's
compile / CUDA graphs / EMA, StepRunner, the recipe's optimizer), so its img/s is what a run would see; only the
schedule is constant (OneCycle refuses to step past its length). Compile time is the wall time of the compiled
phases' warm-ups (compiling, graph recording and those few steps), reported apart and never timed.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import torch

from fastcifar.artifacts import peak_memory_mb
from fastcifar.augment import build_mixer, build_train_transform
from fastcifar.bench.env import bench_environment, peak_tflops
from fastcifar.bench.flops import flops_per_image, param_count
from fastcifar.bench.nvml import NvmlProbe, empty
from fastcifar.bench.seed_projects import seed_project_loader
from fastcifar.bench.timing import cycle, measure_latency, measure_rate, quiet_workers
from fastcifar.device import autocast
from fastcifar.engine import build_engine
from fastcifar.errors import first_line
from fastcifar.loader import DeviceLoader
from fastcifar.models import create_model, model_options
from fastcifar.preflight import resolve_stats
from fastcifar.recipe import Recipe, ScheduleCfg
from fastcifar.step import EpochTotals, NonFiniteStep, build_step, make_scaler

if TYPE_CHECKING:
    from fastcifar.data.store import Store

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Cell:
    model: str
    precision: str
    batch: int
    compile: bool
    channels_last: bool


@dataclass(frozen=True)
class Plan:
    """What to measure. `recipe` supplies the augment section, optimizer, label smoothing and compile mode."""

    recipe: Recipe
    models: list[str]
    batches: list[int]
    precisions: list[str]
    compiles: list[bool] = field(default_factory=lambda: [False])
    channels_last: list[bool] = field(default_factory=lambda: [True])
    augment_name: str = "recipe"
    seconds: float = 2.0  # per timed phase, split over `repeats`
    repeats: int = 3
    warmup: int = 3
    serve_batch: int = 32
    workers: int = 4  # the seed projects' DataLoader workers
    budget_s: float | None = None  # global wall budget: cells that would not fit are skipped with a note

    def cells(self) -> list[Cell]:
        return [Cell(m, p, b, c, cl) for m in self.models for b in self.batches for p in self.precisions
                for c in self.compiles for cl in self.channels_last]


@dataclass
class _Ctx:
    store: Any
    device: torch.device
    plan: Plan
    log: Callable[[str], Any]
    num_classes: int = 0
    # (model, batch, augment, px) -> the seed projects' fields, measured once
    seed_projects: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.plan.recipe.augment.resize or int(self.store.train_images.shape[1])


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _model(ctx: _Ctx, name: str, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    m = ctx.plan.recipe.model
    same = name == m.name  # the recipe's width / dropout belong to its own model, not to others benched beside it
    options = model_options(m) if same else {}
    model = create_model(name, num_classes=ctx.num_classes, image_size=ctx.image_size,
                         width=m.width if same else 0, dropout=m.dropout if same else 0.0, **options)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(ctx.device, memory_format=fmt)


def _loader(ctx: _Ctx, batch: int, in_dtype: torch.dtype, seed: int = 0):
    r, s = ctx.plan.recipe, ctx.store
    tf = build_train_transform(r.augment, r.data.mean, r.data.std, in_dtype)
    return DeviceLoader(s.train_images, s.train_labels, batch, tf, ctx.device, shuffle=True, seed=seed,
                        mixer=build_mixer(r.augment, ctx.num_classes))


def _cell_recipe(recipe: Recipe, cell: Cell) -> Recipe:
    return replace(recipe, train=replace(recipe.train, batch_size=cell.batch, amp=cell.precision != "fp32",
                                         compile=cell.compile, channels_last=cell.channels_last))


def _train(ctx: _Ctx, cell: Cell, eager: torch.nn.Module, dtype,
           model_only: bool = True) -> tuple[dict[str, Any], torch.Tensor, Any]:
    """End to end (loader + step) and model-only (a resident batch; skipped when not `model_only`) training img/s,
    through the engine training uses (compile, CUDA graphs and weight EMA as the recipe asks). Returns the row
    fields, a sample batch and the engine (its eval_net is what inference is timed on)."""
    plan, dev = ctx.plan, ctx.device
    recipe = _cell_recipe(plan.recipe, cell)
    engine = build_engine(eager, recipe, dev, dtype, lambda text: ctx.log(f"warning: {text}"))
    # The training step itself, with the schedule held constant (a bench has no end of training to reach).
    constant = replace(recipe, schedule=ScheduleCfg(name="constant"))
    runner = build_step(engine.net, eager, constant, dev, dtype, steps_per_epoch=1, scaler=make_scaler(dtype, dev),
                        ema=engine.ema, prepare=engine.prepare, log=ctx.log)
    # On CUDA the loader casts to the autocast dtype while normalising, as training does (make_loaders).
    loader = _loader(ctx, cell.batch, dtype if (dtype is not None and dev.type == "cuda") else torch.float32)
    totals = _totals(dev, runner)
    batches = cycle(loader)
    fmt = (lambda x: x) if cell.channels_last else (lambda x: x.contiguous())
    steps, diverged = [0], []

    def step(x=None, y=None) -> int:
        if x is None:
            x, y = next(batches)
        try:
            runner.step(fmt(x), y, totals, steps[0])
        except NonFiniteStep as e:  # training on one resident batch can diverge; the timing is still valid
            diverged.append(e.step)
        steps[0] += 1
        return len(y)

    # Warm-up covers the engine's own (compile in step 1; the compiler's CUDA graphs record in step 2).
    kw = dict(seconds=plan.seconds, repeats=plan.repeats, warmup=max(plan.warmup, engine.plan.warmup_steps + 1))
    e2e = measure_rate(step, dev, probe=NvmlProbe(dev), **kw)
    x0, y0 = next(batches)
    batches.close()
    x0, y0 = fmt(x0).clone(), y0.clone()
    only = measure_rate(lambda: step(x0, y0), dev, **kw) if model_only else None
    try:
        runner.check_pending()
    except NonFiniteStep as e:
        diverged.append(e.step)
    notes = list(engine.plan.notes) + ([f"loss went non-finite at step {diverged[0]} (timing kept)"] if diverged
                                       else [])
    out = {**e2e.fields("train_img_s"), **(only.fields("model_only_img_s") if only else {}),
           **(e2e.probe or empty("NVML not sampled")), "engine": engine.summary(runner.optimizer),
           "_compile_s": e2e.warmup_s if cell.compile else 0.0, "_note": "; ".join(notes)}
    return out, x0, engine


def _totals(device: torch.device, runner):
    return EpochTotals.zeros(device, runner.optimizer.param_groups[0]["lr"])


def _infer(ctx: _Ctx, cell: Cell, model, dtype, sample: torch.Tensor) -> dict[str, Any]:
    """Inference img/s on a resident batch, then per-call latency at batch 1 and at the serving batch."""
    plan, dev = ctx.plan, ctx.device
    serve = min(plan.serve_batch, len(sample))
    model.eval()

    def forward(x: torch.Tensor) -> int:
        with torch.inference_mode(), autocast(dev, dtype):
            model(x)
        return len(x)

    kw = dict(seconds=plan.seconds, repeats=plan.repeats, warmup=plan.warmup)
    rate = measure_rate(lambda: forward(sample), dev, **kw)
    lat1 = measure_latency(lambda: forward(sample[:1]), dev, seconds=plan.seconds / 2, warmup=plan.warmup)
    lats = measure_latency(lambda: forward(sample[:serve]), dev, seconds=plan.seconds / 2, warmup=plan.warmup)
    model.train()
    compile_s = rate.warmup_s + lat1.warmup_s + lats.warmup_s if cell.compile else 0.0
    return {**rate.fields("infer_img_s"), **lat1.fields("lat_b1"), "serve_batch": serve, **lats.fields("lat_serve"),
            "_compile_s": compile_s}


def _cost(ctx: _Ctx, cell: Cell, sample: torch.Tensor, row: dict[str, Any]) -> dict:
    """Params, FLOPs per image, achieved TFLOP/s and MFU, peak memory. FLOPs are counted on a fresh eager copy:
    the timed model may be compiled or CUDA-graphed, and a graph replay shows the counter no ops."""
    mem, source = peak_memory_mb(ctx.device)  # read before the copy below adds to it
    if ctx.device.type != "cuda":
        source += " of the whole process since start, not per cell (includes the resident store)"
    fresh = _model(ctx, cell.model, cell.channels_last)
    fwd, both = flops_per_image(fresh, sample[:min(4, len(sample))].float())
    peak = peak_tflops(torch.cuda.get_device_name(ctx.device), cell.precision) if ctx.device.type == "cuda" else None
    tf = {k: both * row[f"{k}_img_s"] / 1e12 for k in ("train", "model_only")}
    return {"params": param_count(fresh), "flops_fwd_per_img": fwd, "flops_fwdbwd_per_img": both,
            "train_tflops": tf["train"], "model_only_tflops": tf["model_only"], "peak_tflops": peak,
            "mfu": tf["train"] / peak if peak else None, "model_only_mfu": tf["model_only"] / peak if peak else None,
            "peak_mem_mb": mem, "peak_mem_source": source}


def _seed_projects_rate(ctx: _Ctx, cell: Cell):
    """The seed projects' way for this model and batch: fp32, eager, NCHW weights, fed by the per-image DataLoader."""
    r, s, dev = ctx.plan.recipe, ctx.store, ctx.device
    model = _model(ctx, cell.model, channels_last=False)
    theirs = replace(r.train, batch_size=cell.batch, amp=False, compile=False, channels_last=False, cuda_graphs=False,
                     ema_decay=0.0)
    runner = build_step(model, model, replace(r, train=theirs, schedule=ScheduleCfg(name="constant")), dev, None,
                        steps_per_epoch=1, log=ctx.log)
    loader, impl = seed_project_loader(s.train_images, s.train_labels, cell.batch, r.augment, r.data.mean,
                                       r.data.std, workers=ctx.plan.workers, seed=0, device=dev)
    batches, totals, n = cycle(loader), _totals(dev, runner), [0]

    def step() -> int:
        x, y = next(batches)
        try:
            runner.step(x.contiguous(), y, totals, n[0])
        except NonFiniteStep:  # a diverging loss does not change the timing
            pass
        n[0] += 1
        return len(y)

    # Warm-up starts the workers and drains their first prefetch (2 batches each), capped at `seconds`.
    rate = measure_rate(step, dev, seconds=ctx.plan.seconds, repeats=ctx.plan.repeats,
                        warmup=max(ctx.plan.warmup, 2 * ctx.plan.workers + 1), warmup_cap_s=ctx.plan.seconds)
    batches.close()
    return rate, impl


def _seed_projects(ctx: _Ctx, cell: Cell) -> dict[str, Any]:
    """The seed projects' figures for this cell's (model, batch, augment, size), measured once and cached."""
    key = (cell.model, cell.batch, ctx.plan.augment_name, ctx.image_size)
    if key in ctx.seed_projects:
        return ctx.seed_projects[key]
    out: dict[str, Any] = {"seeds_train_img_s": None, "seeds_train_img_s_spread": None, "seeds_impl": None}
    try:
        with quiet_workers():
            rate, out["seeds_impl"] = _seed_projects_rate(ctx, cell)
        out.update(seeds_train_img_s=rate.mean, seeds_train_img_s_spread=rate.spread)
    except Exception as e:  # the baseline failing must not hide our own figures
        out["seeds_note"] = f"error: {first_line(e)}"
    _free(ctx.device)
    ctx.seed_projects[key] = out
    return out


def _auto(ctx: _Ctx, cell: Cell, model: torch.nn.Module) -> tuple[torch.dtype | None, dict[str, Any]]:
    """--precision auto: what train.amp = "auto" trains this cell in (a CPU measures, or reads its cache)."""
    from fastcifar.device import amp_dtype
    from fastcifar.precision import choose_cpu_precision, model_desc, precision_name

    if ctx.device.type != "cpu":
        dtype = amp_dtype(ctx.device, True)
        return dtype, {"precision": precision_name(dtype), "chosen_by": f"{ctx.device.type} autocast"}
    choice = choose_cpu_precision(model, model_desc(ctx.plan.recipe.model, cell.model), cell.batch, ctx.image_size,
                                  ctx.num_classes, cell.channels_last, log=ctx.log)
    return choice.dtype, choice.as_dict()


def measure_cell(ctx: _Ctx, cell: Cell) -> dict[str, Any]:
    dev, dtype = ctx.device, PRECISIONS.get(cell.precision)
    row: dict[str, Any] = {**_key(ctx, cell), "note": ""}
    t0 = time.perf_counter()
    theirs = _seed_projects(ctx, cell)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if cell.compile:
        torch._dynamo.reset()  # guards accumulate per code object across cells; past the cache limit it runs eager
    eager = _model(ctx, cell.model, cell.channels_last)
    if cell.precision == "auto":
        dtype, row["auto"] = _auto(ctx, cell, eager)
    train, sample, engine = _train(ctx, cell, eager, dtype)
    infer = _infer(ctx, cell, engine.eval_net, dtype, sample)
    compile_s = train.pop("_compile_s") + infer.pop("_compile_s")
    row["note"] = train.pop("_note")
    row.update(train)
    row.update(infer)
    row["compile_s"] = compile_s if cell.compile else None
    row.update(_cost(ctx, cell, sample, row))
    row.update(theirs)
    base = theirs["seeds_train_img_s"]
    row["ratio_vs_seeds"] = row["train_img_s"] / base if base else None
    row["cell_s"] = time.perf_counter() - t0
    return row


def training_rate(store: Store, device: torch.device, plan: Plan, cell: Cell,
                  log: Callable[[str], Any] = print) -> dict:
    """One cell's end-to-end training img/s alone (no model-only, inference, cost or seeds' columns): the batch
    finder's probe, through the same engine, loader and step as a bench row."""
    plan = replace(plan, recipe=resolve_stats(plan.recipe, store))
    ctx = _Ctx(store, device, plan, log, num_classes=len(store.classes))
    out, _, _ = _train(ctx, cell, _model(ctx, cell.model, cell.channels_last), PRECISIONS[cell.precision],
                       model_only=False)
    return out


def run_model_bench(store: Store, device: torch.device, plan: Plan, log: Callable[[str], Any] = print,
                    seed_projects_cache: dict | None = None,
                    on_row: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Every cell of the plan (skipping, with a note, those that would overrun plan.budget_s). `seed_projects_cache`
    shares the seed projects' measurements between calls (the device suite runs several plans); `on_row` sees each row
    as it is finished (the suite saves after every cell, so a run cut short keeps what it measured)."""
    plan = replace(plan, recipe=resolve_stats(plan.recipe, store))  # data.mean / std = "auto": the store's
    ctx = _Ctx(store, device, plan, log, num_classes=len(store.classes),
               seed_projects=seed_projects_cache if seed_projects_cache is not None else {})
    deadline = time.perf_counter() + plan.budget_s if plan.budget_s else None
    # First guesses of a cell's wall time, replaced by measured ones. A compiled cell compiles four graphs
    # (train, eval, batch 1, serving batch): about a minute each for a ResNet on an H100 is not unusual.
    last = {False: 7 * plan.seconds + 5, True: 7 * plan.seconds + 150}
    rows = []
    for cell in plan.cells():
        t0 = time.perf_counter()
        theirs_done = (cell.model, cell.batch, plan.augment_name, ctx.image_size) in ctx.seed_projects
        need = last[cell.compile] + (0 if theirs_done else 2 * plan.seconds + 5)
        if deadline is not None and deadline - t0 < need:
            rows.append({**_key(ctx, cell), "note": f"skipped: global time budget ({max(deadline - t0, 0):.0f} s "
                                                    f"left, a cell takes ~{need:.0f} s)"})
            log(f"skip  {_label(cell)}: time budget")
            if on_row is not None:
                on_row(rows[-1])
            continue
        try:
            row = measure_cell(ctx, cell)
        except Exception as e:  # one failing cell (OOM, a compile error) is a row that says so
            row = {**_key(ctx, cell), "note": f"error: {first_line(e)}"}
        _free(device)
        last[cell.compile] = time.perf_counter() - t0
        rows.append(row)
        if on_row is not None:
            on_row(row)
        shown = f"{row['train_img_s']:,.0f} train img/s" if row.get("train_img_s") else row["note"]
        log(f"bench {_label(cell)}: {shown} ({last[cell.compile]:.1f} s)")
    return {"kind": "fastcifar-bench", "what": "model", "version": 1, "environment": bench_environment(device),
            "settings": plan_settings(plan, store), "rows": rows}


def plan_settings(plan: Plan, store: Store) -> dict[str, Any]:
    settings = {k: getattr(plan, k) for k in ("seconds", "repeats", "warmup", "serve_batch", "workers", "budget_s",
                                              "augment_name")}
    settings.update(store=str(store.path), images=int(len(store.train_labels)), recipe=plan.recipe.name)
    return settings


def _key(ctx: _Ctx, cell: Cell) -> dict[str, Any]:
    return {"model": cell.model, "image_size": ctx.image_size, "augment": ctx.plan.augment_name,
            "precision": cell.precision, "batch": cell.batch, "compile": cell.compile,
            "channels_last": cell.channels_last}


def _label(cell: Cell) -> str:
    return (f"{cell.model} {cell.precision} b{cell.batch} compile={'on' if cell.compile else 'off'} "
            f"cl={'on' if cell.channels_last else 'off'}")


def seed_projection(img_s: float | None, images: float = 2000 * 5 * 48_000) -> float | None:
    """Hours the seed's full run (2000 epochs x 5 folds x 48k images = 480M images) would take at img_s."""
    return images / img_s / 3600 if img_s else None


