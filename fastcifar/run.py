"""A training run: the run directory, its saved recipe and environment, the folds, and the summary table."""

from __future__ import annotations

import contextlib
import os
import re
import statistics
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fastcifar.atomic import write_json, write_text
from fastcifar.context import Hooks, RunContext, RunPlan
from fastcifar.device import resolve_device
from fastcifar.errors import first_line
from fastcifar.lifecycle import GracefulStop, RunLock
from fastcifar.ownership import remove_atomic_temps, write_marker
from fastcifar.pack_train import pack_key, train_pack
from fastcifar.preflight import check_inputs, data_identity, recheck_run_dir
from fastcifar.progress import RunProgress
from fastcifar.provenance import run_environment
from fastcifar.recipe import Recipe, recipe_to_toml
from fastcifar.report import write_report
from fastcifar.runfiles import CHECKPOINTS_DIR, FIGURES_DIR, read_result
from fastcifar.splits import Fold
from fastcifar.strategy import Solo, Strategy
from fastcifar.train import train_one_fold

SUMMARY_KEYS = ["val_acc", "val_loss", "test_acc", "test_loss", "best_epoch", "train_time_s"]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and (sample) standard deviation across folds of every numeric summary key."""
    out: dict[str, Any] = {"folds": results}
    for key in SUMMARY_KEYS:
        vals = [float(r[key]) for r in results if key in r]
        if vals:
            out[f"{key}_mean"] = statistics.fmean(vals)
            out[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def _folds_table(summary: dict[str, Any], console: Console) -> str:
    """Print the fold table (rich) and return it as CSV with mean and std rows."""
    keys = [k for k in SUMMARY_KEYS if f"{k}_mean" in summary]
    table = Table(title="folds")
    for name in ["fold", *keys]:
        table.add_column(name, justify="right")
    lines = [",".join(["fold", *keys])]
    fmt = {"best_epoch": "{:.0f}", "train_time_s": "{:.1f}"}
    for r in summary["folds"]:
        cells = [fmt.get(k, "{:.4f}").format(r[k]) for k in keys]
        table.add_row(str(r["fold"]), *cells)
        lines.append(",".join([str(r["fold"]), *cells]))
    for stat in ("mean", "std"):
        cells = [fmt.get(k, "{:.4f}").format(summary[f"{k}_{stat}"]) for k in keys]
        table.add_row(stat, *cells)
        lines.append(",".join([stat, *cells]))
    console.print(table)
    return "\n".join(lines) + "\n"


def configure_runtime(recipe: Recipe) -> None:
    """Process-wide switches a recipe asks for; set here, at run start, never at import."""
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    if recipe.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _remove_orphans(run_dir: Path) -> None:
    """Temp files of writes that a SIGKILL cut short (the targets themselves are intact), only in the folders a
    run writes: the run directory, its fold directories, and their checkpoints/ and figures/."""
    roots = [run_dir, *(d for d in run_dir.iterdir() if re.fullmatch(r"fold\d+", d.name) and not d.is_symlink())]
    remove_atomic_temps([d / sub for d in roots for sub in ("", CHECKPOINTS_DIR, FIGURES_DIR)])


def train_folds(ctx: RunContext) -> list[dict]:
    """This process's share of the plan's folds (strategy.folds), in order; folds that finished are kept. With
    train.pack, the folds left train train.pack at a time, each pack as one stacked model (fastcifar.pack_train)."""
    return train_runs([ctx], ctx.recipe.train.pack)[0]


def train_runs(ctxs: list[RunContext], pack: int | str = 1) -> list[list[dict]]:
    """The folds of one run, or of several (a packed sweep), each run's results in fold order. Folds that
    finished are kept; the others train `pack` at a time (1: one after another), folds of runs that cannot share
    a stacked model (fastcifar.pack_train.pack_key) in separate packs."""
    results: list[list[dict]] = [[] for _ in ctxs]
    todo: dict[tuple, list[tuple[int, Fold]]] = {}
    for i, ctx in enumerate(ctxs):
        for fold in ctx.strategy.folds(list(ctx.plan.folds)):
            done = ctx.fold_dir(fold) / "result.json"
            if ctx.resuming and done.exists():
                results[i].append(read_result(done, fold.index))  # untrusted: checked in the summary
                ctx.say(f"fold {fold.index}: finished earlier, kept ({done})")
            else:
                todo.setdefault(pack_key(ctx.recipe), []).append((i, fold))
    packs = [chunk for group in todo.values() for chunk in chunks(group, pack)]
    console = ctxs[0].console
    with RunProgress(console, len(packs)) as progress:
        for chunk in packs:
            if len(chunk) == 1:
                (i, fold), = chunk
                results[i].append(train_one_fold(ctxs[i], fold, progress))
                continue
            console.print(escape("packed: " + ", ".join(f"{_run_name(ctxs, i)}fold {f.index}" for i, f in chunk)),
                          soft_wrap=True, highlight=False)
            for (i, _), result in zip(chunk, train_pack([(ctxs[i], f) for i, f in chunk], progress)):
                results[i].append(result)
    return [sorted(r, key=lambda r: r["fold"]) for r in results]


def _run_name(ctxs: list[RunContext], i: int) -> str:
    return f"{ctxs[i].run_dir.name} " if len(ctxs) > 1 else ""


def chunks(items: list, size: int | str) -> list[list]:
    """`items` in consecutive groups of `size` (train.pack: an int, or "all" for one group)."""
    size = max(len(items), 1) if size == "all" else int(size)
    return [items[i:i + size] for i in range(0, len(items), size)]


def drive_packed(plans: list[RunPlan], console: Console, pack: int | str, hooks: Hooks | None = None) -> list[dict]:
    """Several runs trained as one (`fastcifar sweep --pack`): each run locked and started as drive starts it,
    their folds packed `pack` at a time across the runs, each run finished as drive finishes it. Returns the
    summaries, in the order of `plans`."""
    summaries, reports = [], []
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(GracefulStop())
        ctxs = []
        for plan in plans:
            stack.enter_context(RunLock(plan.run_dir))
            ctxs.append(RunContext(plan, console, Solo(), hooks or Hooks(), stop, start_run(plan)))
        configure_runtime(plans[0].recipe)
        for plan, results in zip(plans, train_runs(ctxs, pack)):
            summary, report = finish_run(plan.recipe, plan.run_dir, results, console)
            summaries.append(summary)
            reports.append(report)
    for report in reports:
        if report is not None:
            console.print(f"report: {report}")
    return summaries


def run_training(recipe: Recipe, run_dir: Path, console: Console, *, resume: bool = False,
                 hooks: Hooks | None = None) -> dict[str, Any]:
    """`fastcifar train` in one process: the pre-run checks, then the run."""
    plan = check_inputs(recipe, run_dir, resume, resolve_device(recipe.train.device))
    return drive(plan, console, Solo(), hooks)


def drive(plan: RunPlan, console: Console, strategy: Strategy, hooks: Hooks | None = None) -> dict[str, Any] | None:
    """The one run driver of every mode: lock -> stop handler -> start_run -> the run's context -> folds ->
    finish_run. Returns the summary on the process that writes the run, None on the others."""
    with contextlib.ExitStack() as stack:
        stop = strategy.stop(stack.enter_context(GracefulStop()))

        def start() -> bool:
            stack.enter_context(RunLock(plan.run_dir))
            return start_run(plan, strategy.env)

        resuming = strategy.open_run(start)
        ctx = RunContext(plan, console, strategy, hooks or Hooks(), stop, resuming)
        configure_runtime(plan.recipe)
        results = strategy.gather(train_folds(ctx))
        if results is None:
            return None
        summary, report = finish_run(plan.recipe, plan.run_dir, results, console)
    if report is not None:
        console.print(f"report: {report}")
    return summary


def start_run(plan: RunPlan, extra_env: dict[str, Any] | None = None) -> bool:
    """Under the run lock: accept or refuse the run folder once more (preflight.recheck_run_dir), clear orphans,
    write recipe.toml, data.json and env.json; True when resuming. A distributed run calls it on rank 0 only
    (extra_env: its world size and mode)."""
    recipe, run_dir, store = plan.recipe, plan.run_dir, plan.store
    resuming = recheck_run_dir(plan)
    write_marker(run_dir, "run")  # before anything else: from here on the folder is recognisably a run
    _remove_orphans(run_dir)
    if not resuming:
        write_text(run_dir / "recipe.toml", recipe_to_toml(recipe))
    if not resuming or not (run_dir / "data.json").exists():  # a resumed run's data was checked above
        write_json(run_dir / "data.json", data_identity(store))
    write_json(run_dir / "env.json", {**run_environment(plan.device), **(extra_env or {}), "store": {
        "path": str(store.path), "sha256": store.meta["sha256"], "source": store.meta["source"]}})
    return resuming


def finish_run(recipe: Recipe, run_dir: Path, results: list[dict[str, Any]],
               console: Console) -> tuple[dict[str, Any], Path | None]:
    """summary.json, folds.csv (k-fold) and report.md from the folds' results, in fold order."""
    summary = {**summarize(results), "recipe": recipe.name}
    if len(results) > 1:
        write_text(run_dir / "folds.csv", _folds_table(summary, console))
    write_json(run_dir / "summary.json", summary)
    try:
        return summary, write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the run is finished and summary.json written; a report can be redone
        console.print(f"[yellow]report.md not written ({first_line(e)[:200]}); rebuild it with: fastcifar report "
                      f"{run_dir}[/yellow]")
        return summary, None
