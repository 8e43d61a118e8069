#!/usr/bin/env python
"""Pool several bench/peer_airbench.py results of the same comparison (same recipe but for train.seed, same data,
same device, same airbench settings, disjoint seeds) into one: each side's accuracy mean ± std over every run, the
difference with its standard error, and each file's epoch-time ratio (a ratio is only meaningful inside the run
that measured both sides, so they are listed, never averaged across machines' moods).

    python bench/peer_pool.py bench/results/2026-12-03-cpu-2core-speedrun-vs-airbench*.json \\
        --out bench/results/2026-12-03-cpu-2core-speedrun-vs-airbench-pooled.json

Files that do not describe the same comparison are refused with one line naming the file and the difference.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:
    import fastcifar  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use the repository this file lives in
    sys.path.insert(0, str(ROOT))

from fastcifar.atomic import write_json  # noqa: E402
from fastcifar.errors import FastCifarError  # noqa: E402
from fastcifar.recipe import recipe_from_dict  # noqa: E402

KIND = "peer-airbench-pooled"
SIDES = ("ours", "airbench")
# What must agree between files: everything that shapes either side's runs but the seed.
SAME_AIRBENCH = ("version", "variant", "epochs", "batch_size", "train_images", "tta_level", "mode")


class PoolError(Exception):
    pass


def _load(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PoolError(f"{path}: not a readable JSON file ({e.__class__.__name__})") from None
    if not isinstance(d, dict) or not isinstance(d.get("ours"), dict) or not isinstance(d.get("airbench"), dict):
        raise PoolError(f"{path}: not a bench/peer_airbench.py result (no 'ours' and 'airbench' sections)")
    if d.get("tiny"):
        raise PoolError(f"{path}: a --tiny smoke run; its accuracies describe a few hundred images, not CIFAR-10")
    for side in SIDES:
        runs = d[side].get("runs")
        if d[side].get("status") != "ok" or not isinstance(runs, list) or not runs:
            raise PoolError(f"{path}: {side}: no completed runs (status {d[side].get('status')!r})")
        for r in runs:
            if not all(isinstance(r.get(k), (int, float)) for k in ("acc", "acc_no_tta", "train_s")):
                raise PoolError(f"{path}: {side}: a run without numeric acc, acc_no_tta and train_s")
    if not isinstance((d.get("recipe") or {}).get("resolved"), dict):
        raise PoolError(f"{path}: no resolved recipe: cannot tell which seeds it ran")
    return d


def _seeds(d: dict[str, Any]) -> list[int]:
    """Run i of a file used seed train.seed + i on both sides (peer_airbench.compare)."""
    first = int(d["recipe"]["resolved"]["train"]["seed"])
    return [first + i for i in range(len(d["ours"]["runs"]))]


def _without_seed(path: Path, d: dict[str, Any]) -> dict[str, Any]:
    """The resolved recipe as today's code reads it (a key added since the file was written takes its default,
    which keeps the old behaviour), without train.seed."""
    try:
        resolved = json.loads(json.dumps(recipe_from_dict(d["recipe"]["resolved"]).to_dict()))
    except FastCifarError as e:
        raise PoolError(f"{path}: its resolved recipe does not load: {e}") from None
    resolved["train"].pop("seed", None)
    return resolved


def check_same(paths: list[Path], docs: list[dict[str, Any]]) -> None:
    ref, ref_path = docs[0], paths[0]
    ref_recipe = _without_seed(ref_path, ref)
    seen: dict[int, Path] = {}
    for path, d in zip(paths, docs):
        for what, a, b in (("device", d.get("device"), ref.get("device")),
                           ("store (sha256 of its arrays)", (d.get("store") or {}).get("sha256"),
                            (ref.get("store") or {}).get("sha256")),
                           ("recipe (apart from train.seed)", _without_seed(path, d), ref_recipe)):
            if a != b:
                raise PoolError(f"{path}: its {what} differs from {ref_path}'s; pool only runs of one comparison")
        for k in SAME_AIRBENCH:
            if d["airbench"].get(k) != ref["airbench"].get(k):
                raise PoolError(f"{path}: airbench {k} {d['airbench'].get(k)!r} differs from {ref_path}'s "
                                f"{ref['airbench'].get(k)!r}")
        for s in _seeds(d):
            if s in seen:
                raise PoolError(f"{path}: seed {s} was already run in {seen[s]}; pooling it twice would count "
                                f"one run as two")
            seen[s] = path


def _side(docs: list[dict[str, Any]], side: str) -> dict[str, Any]:
    runs = [{"seed": s, "acc": r["acc"], "acc_no_tta": r["acc_no_tta"]}
            for d in docs for s, r in zip(_seeds(d), d[side]["runs"])]
    out: dict[str, Any] = {"n": len(runs), "runs": runs}
    for k in ("acc", "acc_no_tta"):
        vals = [r[k] for r in runs]
        out[f"{k}_mean"] = statistics.fmean(vals)
        out[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def _delta(ours: dict[str, Any], peer: dict[str, Any], k: str) -> dict[str, float]:
    """Difference of means and its (Welch) standard error: the two sides' seeds do not pair their randomness."""
    se = math.sqrt(ours[f"{k}_std"] ** 2 / ours["n"] + peer[f"{k}_std"] ** 2 / peer["n"])
    return {"delta": ours[f"{k}_mean"] - peer[f"{k}_mean"], "se": se}


def pool(paths: list[Path], command: str) -> dict[str, Any]:
    if len(paths) < 2:
        raise PoolError("give two or more result files to pool")
    docs = [_load(p) for p in paths]
    check_same(paths, docs)
    ours, peer = _side(docs, "ours"), _side(docs, "airbench")
    sources = [{"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "commit": d.get("commit"),
                "seeds": _seeds(d), "epoch_time_ratio": d.get("epoch_time_ratio"),
                "load_avg": (d.get("environment") or {}).get("load_avg")} for p, d in zip(paths, docs)]
    ratios = [s["epoch_time_ratio"] for s in sources if isinstance(s["epoch_time_ratio"], (int, float))]
    env = docs[0].get("environment") or {}
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return {"kind": KIND, "date": now, "device": docs[0].get("device"), "sources": sources,
            "epochs": docs[0]["recipe"]["resolved"]["train"]["epochs"],
            "airbench_epochs": docs[0]["airbench"]["epochs"], "ours": ours, "airbench": peer,
            "acc": _delta(ours, peer, "acc"), "acc_no_tta": _delta(ours, peer, "acc_no_tta"),
            "epoch_time_ratio": {"per_source": ratios, "max": max(ratios) if ratios else None},
            "environment": {"date": now, "device_name": env.get("device_name"), "command": command}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="bench/peer_airbench.py result JSON files")
    p.add_argument("--out", type=Path, help="write the pooled result here (JSON)")
    args = p.parse_args(argv)
    command = "python bench/peer_pool.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    try:
        if args.out and args.out.exists():  # a committed result is never replaced
            raise PoolError(f"{args.out}: exists; not overwriting it, choose another --out")
        result = pool(args.files, command)
    except PoolError as e:
        print(f"peer_pool: error: {e}", file=sys.stderr)
        return 2
    o, a = result["ours"], result["airbench"]
    for k, label in (("acc", "with TTA"), ("acc_no_tta", "without TTA")):
        print(f"{label:>11}: ours {o[f'{k}_mean']:.2%} ± {o[f'{k}_std']:.2%}, airbench {a[f'{k}_mean']:.2%} ± "
              f"{a[f'{k}_std']:.2%} (n = {o['n']} / {a['n']}); ours - airbench {result[k]['delta'] * 100:+.3f} pp "
              f"± {result[k]['se'] * 100:.3f} pp (standard error)")
    ratios = result["epoch_time_ratio"]["per_source"]
    print("epoch-time ratio ours / airbench per file: " + ", ".join(f"{r:.2f}" for r in ratios))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
