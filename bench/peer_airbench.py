#!/usr/bin/env python
"""Peer harness: airbench 0.1.8 (airbench94) next to our recipes/speedrun94.toml, same data, same device.

    python bench/peer_airbench.py --n 5                 # on a GPU: writes bench/results/<date>-<gpu>-speedrun.json
    python bench/peer_airbench.py --n 5 --budget 150 --out-dir "$OUT"    # inside the device call
    python bench/peer_airbench.py --tiny --device cpu   # a few hundred images, 1 epoch, n = 1 (the CPU test)

Data: both sides read OUR prepared store (airbench through train.pt / test.pt written from it). airbench:
imported if installed (it is in the [dev] extra), else straight from the carried pure-Python wheel in
bench/wheels/ (bench/stage_device.sh builds it); its side, and how it runs unchanged in fp32 on a CPU, is
fastcifar.bench.airbench. `--epochs N` trains both sides N epochs:

    python bench/peer_airbench.py --device cpu --epochs 3 --n 3 --set train.amp=false --set train.compile=false

Timing (CUDA events on a GPU, perf_counter on a CPU); on a GPU each side is warmed up once first (a 1-epoch
run and a TTA eval: compile, cuDNN autotuning and allocator growth stay out; a CPU run has none of these and
starts timed); data preparation is never timed:
  train_s  airbench: train94(verbose=False) = net build + whitening init + all steps; ours: the training
           steps of fastcifar.train.fit (per-epoch validation, without TTA, and checkpoint writes are excluded
           and reported as fit_overhead_s; our whitening init happens with the data preparation, ~ms).
  eval_s   the final model's test-set evaluation with TTA (airbench: tta_level 2; ours: eval.tta).
  ratio    ours / airbench of mean(train_s + eval_s), airbench's published "time" definition.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import fastcifar  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use the repository this file lives in
    sys.path.insert(0, str(ROOT))

from fastcifar.atomic import write_json  # noqa: E402
from fastcifar.bench.airbench import AB_HYP, run_airbench, write_airbench_data  # noqa: E402
from fastcifar.bench.env import bench_environment, free_stem, slug  # noqa: E402
from fastcifar.bench.ours import run_ours, stats  # noqa: E402  (our side, shared with peer_records.py)
from fastcifar.errors import FastCifarError  # noqa: E402
from fastcifar.recipe import Recipe, load_recipe  # noqa: E402
from fastcifar.splits import take_per_class  # noqa: E402

if TYPE_CHECKING:
    from rich.console import Console

    from fastcifar.data.store import Store

AIRBENCH_VERSION = "0.1.8"
TINY_PER_CLASS = 30  # 300 training images
# compile: minutes of C++ builds on a CPU for a 1-epoch check; amp: bf16 convs run ~10x slower than fp32 on
# CPUs without AMX (measured: width-16 speedrun_net, batch 100, 1 thread: 5.0 s vs 0.54 s a step).
TINY_SETS = ["train.epochs=1", "train.batch_size=100", "eval.batch_size=500", "model.width=16",
             "train.compile=false", "train.amp=false"]


def import_airbench(wheels: Path = ROOT / "bench" / "wheels"):
    """The installed airbench, else the carried wheel (a pure-Python wheel is importable as a zip); None if
    neither exists. Importing it sets torch.backends.cudnn.benchmark = True (airbench does so at import)."""
    try:
        return importlib.import_module("airbench")
    except ImportError:
        pass
    for whl in sorted(wheels.glob(f"airbench-{AIRBENCH_VERSION}-*.whl")):
        sys.path.insert(0, str(whl))
        try:
            return importlib.import_module("airbench")
        except ImportError:
            sys.path.remove(str(whl))
    return None


def _with_epochs(recipe: Recipe, epochs: int) -> Recipe:
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, epochs=epochs))


# ---------------------------------------------------------------------------------------------- the report


def device_slug(device: torch.device) -> str:
    return slug(torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)


def _with_seed(recipe: Recipe, seed: int) -> Recipe:
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, seed=seed))


def _airbench_runner(args, store: Store, device: torch.device, per_class: int,
                     work: Path) -> tuple[dict[str, Any], Callable[[float], dict[str, float]] | None]:
    """(facts for the report, a run(epochs) function, or None where airbench cannot run here)."""
    ab = import_airbench(Path(args.wheels))
    if ab is None:
        return {"status": f"not run: airbench not installed and no airbench-{AIRBENCH_VERSION} wheel in "
                          f"{args.wheels}"}, None
    data_dir = write_airbench_data(store, work / "cifar10", per_class)
    n_train = len(take_per_class(np.arange(len(store.train_labels)), store.train_labels, per_class)) \
        if per_class else len(store.train_labels)
    batch = min(args.ab_batch_size, n_train)  # as our loader does: airbench drops a ragged last batch
    info: dict[str, Any] = {"version": AIRBENCH_VERSION, "variant": "airbench94", "epochs": args.ab_epochs,
                            "batch_size": batch, "train_images": n_train, "tta_level": AB_HYP["tta_level"]}
    if device.type != "cuda":
        info["mode"] = "fp32 on the CPU (airbench_on_cpu: .half()/.cuda() kept on the CPU, CPU timing events)"
    return {**info, "status": "ok"}, lambda epochs, seed=0: run_airbench(ab, data_dir, device, epochs, batch, seed)


def _log(console: Console, label: str, i: int, n: int, run: dict[str, float]) -> None:
    console.print(f"{label} run {i + 1}/{n}: " + ", ".join(f"{k} {v:.4g}" for k, v in run.items()
                                                          if isinstance(v, (int, float))))


def compare(args, recipe: Recipe, store: Store, device: torch.device, console: Console) -> tuple[dict, dict]:
    """Warm both sides up, then alternate airbench and ours n times (drift in clocks or temperature then
    hits both alike); our run i uses seed train.seed + i, airbench draws from torch's global generator."""
    with tempfile.TemporaryDirectory(prefix="peer-airbench-") as work:
        airbench, ab_run = _airbench_runner(args, store, device, recipe.data.train_subset, Path(work))
        if device.type == "cuda":  # a CPU has no autotuning, allocator growth or (here) compile to warm up
            if ab_run is not None:
                ab_run(1.0)  # warm-up: cuDNN autotuning (airbench turns cudnn.benchmark on), allocator growth
            run_ours(_with_epochs(recipe, 1), store, device, console)  # warm-up: the same, plus compile
        ab_runs, our_runs = [], []
        t0 = time.perf_counter()
        for i in range(args.n):
            if ab_run is not None:
                ab_runs.append(ab_run(args.ab_epochs, recipe.train.seed + i))
                _log(console, "airbench", i, args.n, ab_runs[-1])
            our_runs.append(run_ours(_with_seed(recipe, recipe.train.seed + i), store, device, console))
            _log(console, "ours", i, args.n, our_runs[-1])
            per_pair = (time.perf_counter() - t0) / (i + 1)
            if args.budget and time.perf_counter() - args.started + per_pair > args.budget and i + 1 < args.n:
                console.print(f"budget: stopping after {i + 1} of {args.n} pairs ({args.budget:.0f} s)")
                break
    if ab_runs:
        airbench.update(runs=ab_runs, **stats(ab_runs, ("acc", "acc_no_tta", "train_s", "eval_s")))
    ours = {"status": "ok", "runs": our_runs, "params": our_runs[0]["params"],
            **stats(our_runs, ("acc", "acc_no_tta", "train_s", "eval_s", "fit_overhead_s"))}
    return ours, airbench


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5, help="timed runs per side (default 5)")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "speedrun94.toml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--store", help="prepared store (default: the recipe's data.store)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tiny", action="store_true",
                   help=f"{TINY_PER_CLASS} images per class, 1 epoch, n = 1, width 16: a CPU smoke run")
    p.add_argument("--ab-epochs", type=float, default=AB_HYP["epochs"])
    p.add_argument("--epochs", type=int, default=0,
                   help="train both sides this many epochs (sets train.epochs and --ab-epochs; 0 = their defaults)")
    p.add_argument("--ab-batch-size", type=int, default=AB_HYP["batch_size"])
    p.add_argument("--wheels", default=str(ROOT / "bench" / "wheels"))
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds for the whole harness: no new pair of runs starts that would overrun it (0 = none)")
    args = p.parse_args(argv)
    args.started = time.perf_counter()
    return run_harness(args)


def run_harness(args: argparse.Namespace) -> Path:
    from rich.console import Console

    from fastcifar.data import open_store
    from fastcifar.device import resolve_device
    from fastcifar.preflight import resolve_stats

    console = Console(stderr=True)
    overrides = list(args.overrides)
    if args.tiny:
        args.n, args.ab_epochs, args.ab_batch_size = 1, 1.0, 100
        overrides = [f"data.train_subset={TINY_PER_CLASS}", *TINY_SETS, *overrides]
    if args.store:
        overrides.append(f'data.store="{args.store}"')
    if args.epochs:  # the same number of epochs on both sides
        overrides.append(f"train.epochs={args.epochs}")
        args.ab_epochs = float(args.epochs)
    overrides.append(f'train.device="{args.device}"')
    recipe = load_recipe(args.recipe, overrides)
    if recipe.split.kind != "official":
        raise FastCifarError("split.kind: the peer comparison needs 'official' (airbench trains on the 50k)")
    device = resolve_device(recipe.train.device)
    store = open_store(Path(recipe.data.store), verify=True)
    recipe = resolve_stats(recipe, store)  # data.mean / data.std = "auto": the store's own statistics
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # airbench sets it at import; the same for both sides
    # The environment (git commit, load) as the runs start: the code that ran, not the tree at the end of a
    # run of hours in which later commits may land.
    env = bench_environment(device)
    ours, airbench = compare(args, recipe, store, device, console)
    env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device_slug(device),
        "environment": env, "torch": torch.__version__, "commit": env["git_commit"],
        "tiny": bool(args.tiny), "n": len(ours["runs"]), "n_asked": args.n,
        "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if device.type == "cuda" else None,
        "store": {"path": str(store.path), "sha256": store.meta["sha256"]},
        "recipe": {"path": str(args.recipe), "overrides": overrides, "resolved": recipe.to_dict()},
        "ours": ours, "airbench": airbench}
    if airbench.get("status") == "ok":
        total = lambda side: side["train_s_mean"] + side["eval_s_mean"]  # noqa: E731
        result["ratio_ours_over_airbench"] = total(ours) / total(airbench)
        result["acc_delta_ours_minus_airbench"] = ours["acc_mean"] - airbench["acc_mean"]
        result["acc_no_tta_delta_ours_minus_airbench"] = ours["acc_no_tta_mean"] - airbench["acc_no_tta_mean"]
        # training time per epoch, ours / airbench (airbench's includes building its net and fitting the whitening)
        result["epoch_time_ratio"] = ((ours["train_s_mean"] / recipe.train.epochs)
                                      / (airbench["train_s_mean"] / args.ab_epochs))
    stem = f"{result['date'][:10]}-{result['device']}-speedrun" + ("-tiny" if args.tiny else "")
    out = Path(args.out_dir) / f"{free_stem(Path(args.out_dir), stem)}.json"  # never over an earlier result
    write_json(out, result)
    console.print(f"wrote {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except FastCifarError as e:
        print(f"peer_airbench: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
