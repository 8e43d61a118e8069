#!/usr/bin/env python
"""Peer harness for the current records: airbench94_muon.py and Hiverge's cifar10_speedrun.py, run unchanged from
their own files, next to our recipe at equal optimizer steps, same data, same device, alternating in one process.

    python bench/peer_records.py --n 5                         # on a GPU: bench/results/<date>-<gpu>-records.json
    python bench/peer_records.py --device cpu --n 5 --peers ../shared/peers --store data/cifar10
    python bench/peer_records.py --tiny --device cpu           # a few dozen images: the CPU smoke test

Peers: loaded from --peers, else $FASTCIFAR_PEERS, else carry/peers (bench/stage_device.sh stages them), else
../shared/peers beside the checkout; how they run unchanged (and, on a CPU, in fp32 or bf16 for their fp16:
--peer-precision) is fastcifar.bench.peers. Both read our store through train.pt / test.pt.

Sides, per round i (seed train.seed + i on every side; the peers draw from torch's global generator, seeded):
  <peer>          the peer's own main() with its own hyper-parameters, epochs and batch
  ours@<peer>     our recipe at the peer's optimizer steps and batch: train.batch_size = its batch, train.steps =
                  ceil(its epochs * (N // batch)), train.epochs = the epochs that reaches (Hiverge's 7.59 epochs of
                  32 steps: 8 epochs, 243 steps), everything else the recipe's own
  ours            (--ours-own) our recipe at its own epochs and batch
Timing: each side's own region. Peers: their time_seconds (whitening init + training + final TTA evaluation,
their CUDA events on a GPU, perf_counter through the shim on a CPU); eval_s is their final evaluate(tta_level=2),
train_s = time_s - eval_s. Ours: fastcifar.bench.ours.run_ours (train_s: the training steps; eval_s: the final
evaluation with eval.tta). On a GPU every side is warmed up once first (the peers by their own warm-up run).
The result file is rewritten after every round (a run of hours cut short keeps its finished rounds).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import fastcifar  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use the repository this file lives in
    sys.path.insert(0, str(ROOT))

from fastcifar.atomic import write_json  # noqa: E402
from fastcifar.bench.airbench import write_airbench_data  # noqa: E402
from fastcifar.bench.env import bench_environment, free_stem, slug  # noqa: E402
from fastcifar.bench.ours import run_ours, stats  # noqa: E402
from fastcifar.bench.peers import PEERS, PeerError, PeerRunner, find_peers, peer_steps  # noqa: E402
from fastcifar.errors import FastCifarError  # noqa: E402
from fastcifar.recipe import Recipe, load_recipe  # noqa: E402

PEER_CANDIDATES = [ROOT / "carry" / "peers", ROOT.parent / "shared" / "peers"]
TINY_PER_CLASS = 4  # 40 training images: one peer step an epoch at a training batch of 40
# Our side of --tiny: width 16, eager fp32 (inductor's C++ builds take minutes on a CPU: 7 min for the
# width-4 compiled step on the loaded 2-core box).
TINY_SETS = ["model.width=16", "train.compile=false", "train.compile_step=false", "train.amp=false",
             "eval.batch_size=500"]
KEYS = ("acc", "acc_no_tta", "train_s", "eval_s")


def equal_steps(recipe: Recipe, steps: int, batch: int, n_train: int) -> Recipe:
    """Our recipe at `steps` optimizer steps of `batch` images on n_train images (train.steps when the steps end
    inside an epoch)."""
    per_epoch = n_train // batch
    epochs = math.ceil(steps / per_epoch)
    train = dataclasses.replace(recipe.train, batch_size=batch, epochs=epochs,
                                steps=0 if steps == epochs * per_epoch else steps)
    return dataclasses.replace(recipe, train=train)


def _train_rows(store, per_class: int) -> int:
    from fastcifar.splits import take_per_class
    import numpy as np

    rows = np.arange(len(store.train_labels))
    return len(take_per_class(rows, store.train_labels, per_class)) if per_class else len(rows)


class OwnedResult:
    """The result file, rewritten after every round: written only where nothing was, then only over what this
    run last wrote there (checked at each rename)."""

    def __init__(self, path: Path):
        self.path, self.digest = path, None

    def _guard(self) -> None:
        now = hashlib.sha256(self.path.read_bytes()).hexdigest() if self.path.exists() else None
        if now != self.digest:
            raise FastCifarError(f"{self.path}: changed by someone else since this run wrote it; not overwriting")

    def write(self, obj: dict[str, Any]) -> None:
        write_json(self.path, obj, guard=self._guard)
        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()


def _side_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"runs": runs, **(stats(runs, KEYS) if runs else {})}


def comparisons(sides: dict[str, dict[str, Any]], n_train: int) -> dict[str, Any]:
    """ours@<peer> against <peer> (key <peer>: equal steps), and with --ours-own our recipe at its own settings
    against each peer at its own (key <peer>/own): accuracy differences with their (Welch) standard errors, time
    ratios."""
    out = {}
    for name, mine, key in [(n, f"ours@{n}", n) for n in PEERS] + [(n, "ours", f"{n}/own") for n in PEERS]:
        peer, ours = sides.get(name, {}), sides.get(mine, {})
        if not peer.get("runs") or not ours.get("runs"):
            continue
        entry: dict[str, Any] = {"ours": mine, "steps": [ours["steps"], peer["steps"]],
                                 "n": [len(ours["runs"]), len(peer["runs"])]}
        for k in ("acc", "acc_no_tta"):
            se = math.sqrt(ours[f"{k}_std"] ** 2 / len(ours["runs"]) + peer[f"{k}_std"] ** 2 / len(peer["runs"]))
            entry[k] = {"delta": ours[f"{k}_mean"] - peer[f"{k}_mean"], "se": se}
        # seconds per epoch of training (n_train images), each side's own region; equal steps and batch make it
        # the ratio of training times
        per_epoch = lambda s: s["train_s_mean"] * n_train / (s["steps"] * s["batch_size"])  # noqa: E731
        entry["epoch_time_ratio"] = per_epoch(ours) / per_epoch(peer)
        entry["time_ratio"] = ((ours["train_s_mean"] + ours["eval_s_mean"]) / (peer["train_s_mean"]
                                                                               + peer["eval_s_mean"]))
        out[key] = entry
    return out


def _log(console, label: str, run: dict[str, Any]) -> None:
    console.print(f"{label}: " + ", ".join(f"{k} {v:.4g}" for k, v in run.items() if isinstance(v, (int, float))))


def build_sides(args, recipe: Recipe, store, device: torch.device, work: Path, console):
    """{side: (facts, run(seed) -> dict)}; a peer that cannot run here is a side with a status and no runner."""
    per_class = recipe.data.train_subset
    data_dir = write_airbench_data(store, work / "cifar10", per_class)  # the peers' train.pt / test.pt
    n_train = _train_rows(store, per_class)
    folder = find_peers(args.peers, PEER_CANDIDATES)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.peer_precision]
    sides: dict[str, tuple[dict[str, Any], Any]] = {}
    for name in args.peer:
        spec = PEERS[name]
        batch = min(spec.batch_size, n_train) if args.tiny else None  # tiny: one step an epoch
        if folder is None:
            sides[name] = ({"status": "not run: no peers folder (--peers, $FASTCIFAR_PEERS, carry/peers, "
                                      "../shared/peers)"}, None)
        else:
            runner = PeerRunner(spec, folder, data_dir, device, dtype, batch)
            sides[name] = ({"status": "ok", "folder": str(folder), **runner.facts()}, runner.run)
            if device.type == "cuda":
                runner.warm_up()
        steps, bsz = peer_steps(spec, n_train, batch), batch or spec.batch_size
        mine = equal_steps(recipe, steps, bsz, n_train)
        if device.type == "cuda":  # our warm-up at this batch: compile, autotuning, allocator growth
            run_ours(_one_epoch(mine), store, device, console)
        sides[f"ours@{name}"] = (
            {"status": "ok", "steps": steps, "batch_size": bsz, "epochs": mine.train.epochs,
             "train_steps": mine.train.steps},
            lambda seed, r=mine: run_ours(_seeded(r, seed), store, device, console))
    if args.ours_own:
        from fastcifar.preflight import check_steps

        per_epoch = n_train // recipe.train.batch_size
        check_steps(recipe, per_epoch)  # train.steps fits these images (--train-per-class changes the epochs)
        steps = recipe.train.steps or recipe.train.epochs * per_epoch
        sides["ours"] = ({"status": "ok", "steps": steps, "batch_size": recipe.train.batch_size,
                          "epochs": recipe.train.epochs, "train_steps": recipe.train.steps},
                         lambda seed: run_ours(_seeded(recipe, seed), store, device, console))
        if device.type == "cuda":
            run_ours(_one_epoch(recipe), store, device, console)
    return sides, n_train


def _one_epoch(recipe: Recipe) -> Recipe:
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, epochs=1, steps=0))


def _seeded(recipe: Recipe, seed: int) -> Recipe:
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, seed=seed))


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5, help="timed runs per side (default 5)")
    p.add_argument("--peer", action="append", choices=list(PEERS), help="peers to run (default: all)")
    p.add_argument("--peers", help="folder holding the peer scripts (default: $FASTCIFAR_PEERS, carry/peers, "
                                   "../shared/peers)")
    p.add_argument("--peer-precision", choices=["fp32", "bf16"], default="fp32",
                   help="on a CPU, what their fp16 becomes (default fp32; a GPU runs their fp16)")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "speedrun94_record.toml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--store", help="prepared store (default: the recipe's data.store)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--train-per-class", type=int, default=0,
                   help="train every side on the first K images of each class (fewer steps; 0 = all 50k)")
    p.add_argument("--ours-own", action="store_true", help="also run our recipe at its own epochs and batch")
    p.add_argument("--tiny", action="store_true",
                   help=f"{TINY_PER_CLASS} images per class, peer batch = all of them, n = 1: a CPU smoke run")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds for the whole harness: no new round starts that would overrun it (0 = none)")
    args = p.parse_args(argv)
    args.peer = args.peer or list(PEERS)
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
        args.n, args.train_per_class = 1, args.train_per_class or TINY_PER_CLASS
        overrides = [*TINY_SETS, *overrides]
    if args.train_per_class:
        overrides.append(f"data.train_subset={args.train_per_class}")
    if args.store:
        overrides.append(f'data.store="{args.store}"')
    overrides.append(f'train.device="{args.device}"')
    recipe = load_recipe(args.recipe, overrides)
    if recipe.split.kind != "official":
        raise FastCifarError("split.kind: the peer comparison needs 'official' (the peers train on the 50k)")
    device = resolve_device(recipe.train.device)
    store = open_store(Path(recipe.data.store), verify=True)
    recipe = resolve_stats(recipe, store)
    env = bench_environment(device)  # as the runs start: the code that ran, not the tree hours later
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    name = slug(torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)
    out_dir = Path(args.out_dir)
    out = OwnedResult(out_dir / f"{free_stem(out_dir, f'{date[:10]}-{name}-records' + ('-tiny' if args.tiny else ''))}.json")
    result: dict[str, Any] = {
        "kind": "peer-records", "date": date, "device": name, "environment": env, "commit": env["git_commit"],
        "tiny": bool(args.tiny), "n_asked": args.n, "timer": "cuda_events" if device.type == "cuda" else
        "perf_counter", "store": {"path": str(store.path), "sha256": store.meta["sha256"]},
        "recipe": {"path": str(args.recipe), "overrides": overrides, "resolved": recipe.to_dict()},
        "peer_precision": args.peer_precision if device.type != "cuda" else "fp16 (their own)"}
    with tempfile.TemporaryDirectory(prefix="peer-records-") as work:
        sides, n_train = build_sides(args, recipe, store, device, Path(work), console)
        result["train_images"] = n_train
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
        t0 = time.perf_counter()
        for i in range(args.n):
            for side, (_, run) in sides.items():  # peer, ours@peer, next peer, ...: drift hits both alike
                if run is not None:
                    runs[side].append({"seed": recipe.train.seed + i, **run(recipe.train.seed + i)})
                    _log(console, f"round {i + 1}/{args.n} {side}", runs[side][-1])
            result["n"] = i + 1
            result["sides"] = {k: {**facts, **_side_summary(runs[k])} for k, (facts, _) in sides.items()}
            result["comparisons"] = comparisons(result["sides"], n_train)
            result["environment"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
            out.write(result)
            per_round = (time.perf_counter() - t0) / (i + 1)
            if args.budget and time.perf_counter() - args.started + per_round > args.budget and i + 1 < args.n:
                console.print(f"budget: stopping after {i + 1} of {args.n} rounds ({args.budget:.0f} s)")
                break
    for peer, c in result["comparisons"].items():
        console.print(f"{c['ours']} - {peer.split('/')[0]} at {c['steps'][0]} / {c['steps'][1]} steps: TTA "
                      f"{c['acc']['delta'] * 100:+.2f} ± "
                      f"{c['acc']['se'] * 100:.2f} pp, no TTA {c['acc_no_tta']['delta'] * 100:+.2f} ± "
                      f"{c['acc_no_tta']['se'] * 100:.2f} pp; epoch-time ratio {c['epoch_time_ratio']:.2f}")
    console.print(f"wrote {out.path}")
    return out.path


if __name__ == "__main__":
    try:
        main()
    except (FastCifarError, PeerError) as e:
        print(f"peer_records: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
