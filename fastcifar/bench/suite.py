"""The device suite (bench/device_suite.sh): the loader bench and a model matrix under one global time budget,
written to bench/results/<date>-<device>.json and .md after every stage, so a run cut short keeps what it measured.

Order is priority: the seed's own workload (tv_resnet34, ImageNet stem, 224 px, RandAugment(2, 9) + erasing 0.25)
and its projected full-run hours, then the loader bench (the fused path's share of HBM bandwidth), then the
CIFAR-stem ResNets at 32 px (bf16 vs fp32, channels-last on/off), then torch.compile cells, which cost a minute or
more of compiling each. Cells that would overrun the budget are skipped with a note. `--quick` is a tiny CPU dry run of the same code (tests).

    python -m fastcifar.bench.suite --data data/cifar10-suite --out bench/results --budget 480 [--quick]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

SEED_HOURS = 178.0  # seed 000's reported wall time for its full run (8 V100s)
SEED_IMAGES = 2000 * 5 * 48_000  # 2000 epochs x 5 folds x 48k training images = 480M images
LOADER_RESERVE_S = 100.0
SEED_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "seed000_resnet34.toml"


def _groups(quick: bool, cuda: bool) -> list[dict[str, Any]]:
    """(name, plan fields) in priority order. Quick: cnn_bn stands in for every model (a CPU dry run)."""
    from fastcifar.models import model_names

    if quick:
        return [
            dict(name="seed workload (quick: cnn_bn stands in for tv_resnet34, no resize)", seed=True,
                 augment="randaugment+erasing", models=["cnn_bn"], batches=[16], precisions=["fp32"]),
            dict(name="CIFAR stem, 32 px", augment="crop+flip", models=["cnn_bn"], batches=[16],
                 precisions=["fp32"], channels_last=[False]),
        ]
    low = ["bf16", "fp32"] if cuda else ["fp32"]
    groups = [
        dict(name="seed workload: tv_resnet34, 224 px, RandAugment(2, 9) + erasing 0.25", seed=True,
             augment="randaugment+erasing+resize224", models=["tv_resnet34"], batches=[64, 256], precisions=low),
        dict(name="resnet18, CIFAR stem, 32 px", augment="crop+flip", models=["resnet18"], batches=[512],
             precisions=low, channels_last=[True, False]),
        dict(name="resnet34 and resnet9, 32 px", augment="crop+flip", models=["resnet34", "resnet9"], batches=[512],
             precisions=low),
    ]
    if "speedrun_net" in model_names():
        groups.append(dict(name="speedrun_net, 32 px", augment="crop+flip", models=["speedrun_net"], batches=[1024],
                           precisions=low[:1]))
    groups.append(dict(name="torch.compile", augment="crop+flip", models=["resnet9", "resnet18"], batches=[512],
                       precisions=low[:1], compiles=[True]))
    return groups


def _plan(group: dict[str, Any], seconds: float, workers: int, budget_s: float, quick: bool):
    from fastcifar.bench.model_bench import Plan
    from fastcifar.bench.presets import PRESETS
    from fastcifar.recipe import ModelCfg, Recipe, load_recipe

    # The seed workload trains with the seed's own recipe (AdamW, label smoothing 0.1, grad clip 1.0).
    recipe = load_recipe(SEED_RECIPE) if group.get("seed") and SEED_RECIPE.exists() else Recipe(name="suite")
    recipe = replace(recipe, augment=PRESETS[group["augment"]])
    if quick:  # a narrow cnn_bn: the dry run checks the plumbing, not a model
        recipe = replace(recipe, model=ModelCfg(name="cnn_bn", width=8))
    return Plan(recipe=recipe, models=group["models"], batches=group["batches"], precisions=group["precisions"],
                compiles=group.get("compiles", [False]), channels_last=group.get("channels_last", [True]),
                augment_name=group["augment"], seconds=seconds, repeats=3, warmup=1 if quick else 3,
                serve_batch=8 if quick else 256, workers=workers, budget_s=budget_s)


def seed_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Best training img/s of the seed workload, ours and the seed projects' way, and the full run projected in
    hours."""
    from fastcifar.bench.model_bench import seed_projection

    ours = [r for r in rows if r.get("train_img_s")]
    best = max(ours, key=lambda r: r["train_img_s"], default=None)
    theirs = [r for r in rows if r.get("seeds_train_img_s")]
    base = min(theirs, key=lambda r: r["batch"], default=None)  # the seed trained at batch 64: the smallest here
    out = {"images": SEED_IMAGES, "seed_reported_hours": SEED_HOURS,
           "ours_img_s": best["train_img_s"] if best else None,
           "ours_config": {k: best[k] for k in ("model", "precision", "batch", "compile", "channels_last")}
           if best else None,
           "seeds_way_img_s": base["seeds_train_img_s"] if base else None,
           "seeds_way_batch": base["batch"] if base else None}
    out["ours_hours"] = seed_projection(out["ours_img_s"], SEED_IMAGES)
    out["seeds_way_hours"] = seed_projection(out["seeds_way_img_s"], SEED_IMAGES)
    return out


def seed_lines(s: dict[str, Any]) -> list[str]:
    def fmt(img_s, hours):
        return "n/a" if not img_s else f"{img_s:,.0f} img/s -> {hours:,.1f} h"

    cfg = s.get("ours_config") or {}
    how = (f" ({cfg['model']} {cfg['precision']} batch {cfg['batch']}, compile {'on' if cfg['compile'] else 'off'},"
           f" channels-last {'on' if cfg['channels_last'] else 'off'})") if cfg else ""
    return [f"seed workload, full run = {s['images'] / 1e6:.0f}M images (2000 epochs x 5 folds x 48k):",
            f"  ours: {fmt(s['ours_img_s'], s['ours_hours'])}{how}",
            f"  seeds' way on this device (fp32, eager, NCHW, DataLoader, batch {s.get('seeds_way_batch')}): "
            f"{fmt(s['seeds_way_img_s'], s['seeds_way_hours'])}",
            f"  seed 000 reported: {s['seed_reported_hours']:.0f} h (8x V100)"]


def result_paths(out_dir: Path, device_name: str) -> tuple[Path, Path]:
    """bench/results/<date>-<device>.json/.md; a second run on the same day gets -2, -3, ... (never overwrites)."""
    from fastcifar.bench.env import free_stem, slug

    stem = f"{_dt.date.today().isoformat()}-{slug(device_name.replace('CPU: ', 'cpu '))}"
    name = free_stem(out_dir, stem, (".json", ".md"))
    return out_dir / f"{name}.json", out_dir / f"{name}.md"


def to_markdown(suite: dict[str, Any]) -> str:
    from fastcifar.bench.table import env_line, markdown_body

    parts = [f"# fastcifar device suite: {suite['environment']['device_name']}", "",
             env_line(suite["environment"]), "",
             f"Budget {suite['budget_s']:.0f} s, took {suite.get('elapsed_s', 0):.0f} s. "
             "Command: `bash bench/device_suite.sh`.", ""]
    if suite.get("seed_workload"):
        parts += ["```", *seed_lines(suite["seed_workload"]), "```", ""]
    if suite.get("loader"):
        parts += ["## Input pipelines", "", markdown_body(suite["loader"], "###")]
    if suite.get("model"):
        parts += ["## Models", "", markdown_body(suite["model"], "###")]
    parts += [f"- {n}" for n in suite.get("notes", [])]
    return "\n".join(parts) + "\n"


def run_suite(store_dir: Path, out_dir: Path, budget_s: float, *, quick: bool = False, device: str = "auto",
              log: Callable[[str], Any] = print) -> tuple[Path, Path, dict[str, Any]]:
    from fastcifar.atomic import write_json, write_text
    from fastcifar.bench.env import bench_environment
    from fastcifar.bench.loader_bench import run_loader_bench
    from fastcifar.bench.model_bench import plan_settings, run_model_bench
    from fastcifar.data import open_store
    from fastcifar.device import resolve_device

    t0 = time.perf_counter()
    dev = resolve_device(device)
    store = open_store(store_dir)
    env = bench_environment(dev)
    json_path, md_path = result_paths(out_dir, env["device_name"])
    suite: dict[str, Any] = {"kind": "fastcifar-bench-suite", "version": 1, "environment": env, "budget_s": budget_s,
                             "quick": quick, "notes": []}
    left = lambda: budget_s - (time.perf_counter() - t0)  # noqa: E731

    def save() -> None:
        suite["elapsed_s"] = time.perf_counter() - t0
        write_json(json_path, suite)
        write_text(md_path, to_markdown(suite))

    seconds, workers = (0.1, 1) if quick else (1.5, 4)
    seed_projects_cache: dict = {}
    for i, group in enumerate(_groups(quick, dev.type == "cuda")):
        if i == 1:  # the loader table right after the seed workload: the two headline figures come first
            suite["loader"] = run_loader_bench(store, dev, batch=32 if quick else 512, seconds=seconds, repeats=3,
                                               warmup=1 if quick else 3, workers=workers,
                                               presets=["crop+flip"] if quick else None, log=log)
            save()
        if left() <= 0:
            suite["notes"].append(f"skipped {group['name']}: global time budget spent")
            continue
        log(f"== {group['name']} ({left():.0f} s of budget left)")
        # The seed workload leaves the loader table its ~100 s (5 presets x 2 loaders x 3 repeats of 1.5 s + warm-up).
        reserve = LOADER_RESERVE_S if i == 0 and not quick else 0.0
        plan = _plan(group, seconds, workers, max(left() - reserve, 1.0), quick)
        if suite.get("model") is None:  # the shape of a model bench result, filled in cell by cell
            suite["model"] = {"kind": "fastcifar-bench", "what": "model", "version": 1, "environment": env,
                              "settings": {}, "rows": []}
        suite["model"]["settings"] = plan_settings(plan, store)
        done = len(suite["model"]["rows"])

        def on_row(row: dict[str, Any], group: dict[str, Any] = group) -> None:
            row["group"] = group["name"]
            suite["model"]["rows"].append(row)
            if group.get("seed"):
                suite["seed_workload"] = seed_summary(suite["model"]["rows"][done:])
            save()

        run_model_bench(store, dev, plan, log=log, seed_projects_cache=seed_projects_cache, on_row=on_row)
    save()
    return json_path, md_path, suite


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcifar.bench.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared store directory")
    p.add_argument("--out", default="bench/results", help="results directory (default bench/results)")
    p.add_argument("--budget", type=float, default=480.0, help="global wall-clock budget in seconds (default 480)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--quick", action="store_true", help="a tiny dry run (CPU tests)")
    args = p.parse_args(argv)
    from rich.markup import escape

    from fastcifar.console import make_console
    from fastcifar.errors import FastCifarError

    console = make_console()
    log = lambda m: console.print(escape(m), highlight=False)  # noqa: E731
    try:
        json_path, md_path, suite = run_suite(Path(args.data), Path(args.out), args.budget, quick=args.quick,
                                              device=args.device, log=log)
    except FastCifarError as e:
        print(f"fastcifar: error: {e}", file=sys.stderr)
        return e.exit_code
    from fastcifar.bench.table import print_result

    if suite.get("loader"):
        print_result(suite["loader"], console)
    if suite.get("model"):
        print_result(suite["model"], console)
    for line in seed_lines(suite["seed_workload"]) if suite.get("seed_workload") else []:
        console.print(escape(line), highlight=False)
    console.print(f"wrote {json_path} and {md_path} ({suite['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
