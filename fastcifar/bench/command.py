"""The `fastcifar bench` subcommand: its arguments, and the one function the CLI calls with them."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastcifar.recipe import DEFAULT_STORE

if TYPE_CHECKING:
    from rich.console import Console


def add_bench_parser(sub) -> None:
    from fastcifar.bench.presets import PRESETS  # light: the recipe dataclasses, no torch

    b = sub.add_parser(
        "bench", help="throughput, latency, memory, energy and FLOPs of models (or, with `loader`, of the input "
                      "pipelines; with `pack`, of packed k-fold training), the seed projects' way measured beside "
                      "ours in the same run",
        description="fastcifar bench [--model ...]: train/infer img/s, latency, memory, energy, FLOPs, MFU per "
                    "model x precision x batch x compile x channels-last. fastcifar bench loader: img/s of each "
                    "input pipeline x augmentation preset. fastcifar bench pack [--k 1 2 5]: img/s and peak memory "
                    "of k folds trained packed (train.pack) against the same k one after another.")
    b.add_argument("what", nargs="?", default="model", choices=["model", "loader", "pack"])
    b.add_argument("--data", help=f"store directory (default {DEFAULT_STORE}, or the recipe's data.store)")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    b.add_argument("--model", nargs="+", metavar="NAME", help="models (default: cnn_bn on CPU/MPS, resnet18 on CUDA)")
    b.add_argument("--recipe", help="take model, batch, augment, amp, compile and optimizer from a recipe")
    b.add_argument("--batch", nargs="+", type=int, metavar="N", help="batch sizes (loader default 512; model "
                                                                      "default 64 on CPU/MPS, 512 on CUDA)")
    b.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16", "auto"],
                   help="(default: fp32 on CPU/MPS, bf16 fp32 on CUDA; the recipe's train.amp). auto: what "
                        'train.amp = "auto" picks (on a CPU the faster of fp32 / bf16, measured once and cached)')
    b.add_argument("--compile", nargs="+", choices=["on", "off"], help="torch.compile the model (default off)")
    b.add_argument("--channels-last", nargs="+", choices=["on", "off"], help="NHWC memory format (default on)")
    b.add_argument("--augment", choices=list(PRESETS), help="augmentation preset for the model bench "
                                                            "(default: the recipe's, else crop+flip)")
    b.add_argument("--preset", nargs="+", choices=list(PRESETS), help="loader presets to time (default all)")
    b.add_argument("--seconds", type=float, help="timed seconds per phase, split over the repeats "
                                                 "(default 2 on CPU/MPS, 3 on CUDA)")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats per phase (default 3)")
    b.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per phase (default 3)")
    b.add_argument("--workers", type=int, default=4, help="the seed projects' and torchvision's DataLoader workers, "
                                                          "DALI's and FFCV's threads (fitted to the cores; default 4)")
    b.add_argument("--k", nargs="+", type=int, metavar="K", help="bench pack: folds per pack (default 1 2 5)")
    b.add_argument("--serve-batch", type=int, help="serving batch for latency (default 32 on CPU/MPS, 256 on CUDA)")
    b.add_argument("--budget", type=float, metavar="S", help="global wall-clock budget; cells that would not fit "
                                                             "are skipped with a note")
    b.add_argument("--json", metavar="OUT", help="write the result as JSON")
    b.add_argument("--md", metavar="OUT", help="write the tables as Markdown")
    b.add_argument("--compare", nargs="+", metavar="JSON", help="OTHER.json: this run beside it, with ratios; "
                                                                 "THIS.json OTHER.json: two saved results, no run")
    b.add_argument("--find-batch", action="store_true",
                   help="find the training batch size with the best img/s that fits with --margin to spare (--batch: "
                        "the candidates, default powers of two from 32); prints --set train.batch_size=N")
    b.add_argument("--margin", type=float, default=0.1, help="--find-batch: fraction of the memory left free "
                                                             "(default 0.1)")


def _check(args) -> dict[str, Any]:
    from fastcifar.errors import RecipeError
    from fastcifar.models import known_model, model_entry, model_names

    for name in args.model or []:
        if not known_model(name):
            raise RecipeError(f"--model: unknown model {name!r} (choose from {', '.join(model_names())}, or "
                              "timm:<name>)")
        if args.what == "pack" and not model_entry(name).stackable:
            raise RecipeError(f"--model: {name} cannot be packed (choose from "
                              f"{', '.join(n for n in model_names() if model_entry(n).stackable)})")
    if args.k is not None and args.what != "pack":
        raise RecipeError("--k: the pack sizes of `fastcifar bench pack`; not with `bench " + args.what + "`")
    minimum = {"--batch": (args.batch or [], 1), "--repeats": ([args.repeats], 1), "--workers": ([args.workers], 0),
               "--k": (args.k or [], 1),
               "--warmup": ([args.warmup], 0),
               "--serve-batch": ([args.serve_batch] if args.serve_batch is not None else [], 1)}
    for flag, (values, lo) in minimum.items():
        for v in values:
            if v < lo:
                raise RecipeError(f"{flag}: must be >= {lo}, got {v}")
    if args.seconds is not None and not args.seconds > 0:
        raise RecipeError(f"--seconds: must be > 0, got {args.seconds}")
    if args.what == "loader" and args.batch and len(args.batch) > 1:
        raise RecipeError(f"--batch: bench loader takes one batch size, got {len(args.batch)}")
    if args.compare and len(args.compare) > 2:
        raise RecipeError("--compare: give OTHER.json (compare this run with it) or THIS.json OTHER.json")
    if args.find_batch:
        _check_find_batch(args)
    return check_outputs(args)


def _check_find_batch(args) -> None:
    from fastcifar.errors import RecipeError

    if args.what != "model":
        raise RecipeError("--find-batch: finds a training batch size; not with `bench loader`")
    if not 0 <= args.margin < 1:
        raise RecipeError(f"--margin: must be in [0, 1), got {args.margin}")
    for flag, values in (("--model", args.model), ("--precision", args.precision), ("--compile", args.compile),
                         ("--channels-last", args.channels_last)):
        if values and len(values) > 1:
            raise RecipeError(f"{flag}: --find-batch searches one setting, got {len(values)}")
    for flag in ("md", "compare"):
        if getattr(args, flag):
            raise RecipeError(f"--{flag}: not with --find-batch (its result is printed; --json saves it)")


def _bench_md(path: Path) -> bool:
    """A bench Markdown file: fastcifar's marker line, or the title bench files had before it."""
    from fastcifar.bench.table import BENCH_MD
    from fastcifar.ownership import md_ours

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError:
        return False
    return md_ours(BENCH_MD)(path) or first.startswith(("# fastcifar bench", "# fastcifar device suite:"))


def check_outputs(args) -> dict[str, Any]:
    """--json / --md may replace only an earlier bench result: checked before any timing starts, and again (the
    guards returned, for atomic_path) when the files are written."""
    from fastcifar.ownership import json_ours, output_guard

    guards = {}
    if args.json:
        guards["json"] = output_guard(Path(args.json), "bench result",
                                      json_ours(lambda d: str(d.get("kind", "")).startswith("fastcifar-bench")))
    if args.md:
        guards["md"] = output_guard(Path(args.md), "bench Markdown table", _bench_md)
    return guards


def _flags(values: list[str] | None, default: list[bool]) -> list[bool]:
    return [v == "on" for v in values] if values else default


def _plan(args, device):
    from fastcifar.bench.model_bench import Plan
    from fastcifar.bench.presets import PRESETS
    from fastcifar.recipe import Recipe, load_recipe

    cuda = device.type == "cuda"
    recipe = load_recipe(args.recipe) if args.recipe else Recipe(name="bench")
    augment_name = f"recipe:{recipe.name}" if args.recipe else "crop+flip"
    if args.augment:
        recipe, augment_name = replace(recipe, augment=PRESETS[args.augment]), args.augment
    t = recipe.train
    from_recipe = args.recipe is not None
    return Plan(
        recipe=recipe,
        models=args.model or ([recipe.model.name] if from_recipe else ["resnet18" if cuda else "cnn_bn"]),
        batches=args.batch or ([t.batch_size] if from_recipe else [512 if cuda else 64]),
        precisions=args.precision or (([str(t.amp)] if t.amp == "auto" else ["bf16"] if t.amp else ["fp32"])
                                      if from_recipe else
                                      (["bf16", "fp32"] if cuda else ["fp32"])),
        compiles=_flags(args.compile, [t.compile] if from_recipe else [False]),
        channels_last=_flags(args.channels_last, [t.channels_last] if from_recipe else [True]),
        augment_name=augment_name, seconds=args.seconds or (3.0 if cuda else 2.0), repeats=args.repeats,
        warmup=args.warmup, serve_batch=args.serve_batch or (256 if cuda else 32), workers=args.workers,
        budget_s=args.budget)


def run_bench(args: argparse.Namespace, console: Console) -> dict[str, Any] | None:
    """Run the bench the arguments ask for, print its tables, write --json / --md, print --compare."""
    from fastcifar.atomic import write_json, write_text
    from fastcifar.bench.compare import load_result, print_comparison
    from fastcifar.bench.table import print_result, to_markdown, widen

    widen(console)
    guards = _check(args)
    others = [load_result(p, args.what) for p in args.compare or []]  # a bad file fails before any timing
    if len(others) == 2:
        print_comparison(others[0], others[1], console, args.compare[0], args.compare[1])
        return None
    from fastcifar.data import open_store
    from fastcifar.device import resolve_device

    device = resolve_device(args.device, key="--device")
    from rich.markup import escape

    log = lambda msg: console.print(f"[dim]{escape(msg)}[/dim]", highlight=False)  # noqa: E731
    if args.what == "loader":
        from fastcifar.bench.loader_bench import run_loader_bench

        store = open_store(Path(args.data or DEFAULT_STORE))
        result = run_loader_bench(store, device, batch=(args.batch or [512])[0],
                                  seconds=args.seconds or (3.0 if device.type == "cuda" else 2.0),
                                  repeats=args.repeats, warmup=args.warmup, workers=args.workers,
                                  presets=args.preset, log=log)
    elif args.find_batch:
        return _find_batch(args, device, console, log)
    elif args.what == "pack":
        from fastcifar.bench.pack_bench import run_pack_bench

        plan = _plan(args, device)
        store = open_store(Path(args.data or (plan.recipe.data.store if args.recipe else DEFAULT_STORE)))
        result = run_pack_bench(store, device, plan, args.k, log=log)
    else:
        from fastcifar.bench.model_bench import run_model_bench

        plan = _plan(args, device)
        store = open_store(Path(args.data or (plan.recipe.data.store if args.recipe else DEFAULT_STORE)))
        result = run_model_bench(store, device, plan, log=log)
    print_result(result, console)
    if args.json:
        write_json(args.json, result, guards["json"])
        console.print(f"wrote {args.json}")
    if args.md:
        write_text(args.md, to_markdown(result), guards["md"])
        console.print(f"wrote {args.md}")
    if others:
        print_comparison(result, others[0], console, "this run", args.compare[0])
    return result


def _find_batch(args, device, console, log) -> dict[str, Any]:
    from fastcifar.atomic import write_json
    from fastcifar.bench.batch_finder import default_candidates, find_batch, print_batch_result
    from fastcifar.data import open_store

    plan = _plan(args, device)
    store = open_store(Path(args.data or (plan.recipe.data.store if args.recipe else DEFAULT_STORE)))
    candidates = args.batch or default_candidates(device, len(store.train_labels))
    result = find_batch(store, device, plan, candidates, args.margin, log=log, budget_s=args.budget)
    print_batch_result(result, console)
    if args.json:
        write_json(args.json, result)
        console.print(f"wrote {args.json}")
    return result
