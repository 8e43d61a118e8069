"""The command line: parse arguments, call one function, turn user errors into one line and an exit code."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fastcifar.errors import FastCifarError
from fastcifar.recipe import DEFAULT_STORE

if TYPE_CHECKING:
    from rich.console import Console


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcifar", description="A high-throughput PyTorch trainer for CIFAR-10 "
                                "and CIFAR-shaped data: prepare a store, train a recipe, evaluate, report.")
    sub = p.add_subparsers(dest="command", required=True)
    _prepare_parser(sub)
    _train_parsers(sub)
    _tune_parser(sub)
    _lr_find_parser(sub)
    _result_parsers(sub)
    from fastcifar.bench.command import add_bench_parser  # `bench` and `bench loader` (fastcifar/bench/)

    add_bench_parser(sub)
    return p


def _prepare_parser(sub) -> None:
    pr = sub.add_parser("prepare", help="convert a dataset (CIFAR-10/100, SVHN, an image folder) into a store")
    pr.add_argument("--source", help="cifar-10-python.tar.gz, cifar-100-python.tar.gz (or their folders), a folder "
                                     "with SVHN's train_32x32.mat + test_32x32.mat, or an image-folder tree/archive "
                                     "(default: $FASTCIFAR_SOURCE, else download --dataset's official files)")
    pr.add_argument("--dataset", choices=["auto", "cifar10", "cifar100", "svhn", "folder"], default="auto",
                    help="what the source holds (default: decided by its content)")
    pr.add_argument("--labels", choices=["fine", "coarse"], default="fine",
                    help="CIFAR-100: the 100 fine classes or the 20 coarse superclasses (default fine)")
    pr.add_argument("--size", type=int, default=0, metavar="N",
                    help="image folders: resize every image to N x N (shorter side, centre crop, antialiased); "
                         "without it all images must share one square size")
    pr.add_argument("--extra", action="store_true", help="SVHN: add extra_32x32.mat (531k images) to training")
    pr.add_argument("--out", default=DEFAULT_STORE, help=f"store directory (default {DEFAULT_STORE})")
    pr.add_argument("--force", action="store_true", help="replace a fastcifar store built from another source (never "
                                                          "the source, a file, or a folder holding anything else)")
    pr.add_argument("--cache", default=os.path.join("~", ".cache", "fastcifar"), help="download directory")
    pr.add_argument("--verify", metavar="DIR", help="re-check the hashes of an existing store and exit")
    pr.add_argument("--format", choices=["store", "beton"], default="store",
                    help="beton: also write the store as an FFCV .beton beside it (<out>.beton), for train.loader "
                         "= \"ffcv\"; --source may be any source prepare takes, or a prepared store (then --out, if "
                         "given, names the .beton)")


def _train_parsers(sub) -> None:
    tr = sub.add_parser("train", help="train a recipe")
    tr.add_argument("recipe", help="a TOML recipe file, or a built-in recipe's name (fastcifar recipes)")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a recipe value (type-checked); repeatable")
    tr.add_argument("--out", help="run directory: new, empty, or a fastcifar run (default runs/<recipe name>)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="shorthand for --set train.device=...")
    tr.add_argument("--folds-parallel", action="store_true",
                    help="under torchrun: rank r trains folds r, r+W, ... on its own device, rank 0 merges the "
                         "fold table (without it, torchrun runs DDP: every rank trains every fold together)")

    sw = sub.add_parser("sweep", help="one-factor-at-a-time ablation of a recipe")
    sw.add_argument("recipe")
    sw.add_argument("--vary", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                    help="values to try for one key, each against the baseline; repeatable")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="change the baseline itself; repeatable")
    sw.add_argument("--out", help="sweep directory (default runs/<recipe name>-sweep)")
    sw.add_argument("--pack", nargs="?", const="all", metavar="N",
                    help="train the variants' folds together as one stacked model, N folds at a time (default: "
                         "all that can share one: same model, batch, device and precision); each variant keeps its "
                         "own run folder")
    sub.add_parser("recipes", help="list the built-in recipes (usable by name: fastcifar train quickstart)")


def _tune_parser(sub) -> None:
    tu = sub.add_parser("tune", help="hyper-parameter search with Optuna (extra [tune]); workers on many machines "
                                     "share one study through --storage")
    tu.add_argument("recipe", help="the base recipe: a TOML file or a built-in recipe's name")
    tu.add_argument("--space", action="append", default=[], metavar="SECTION.KEY=LO:HI[:log]|A,B,C",
                    help="a searched key: a range (float or int, by the key's type; :log for a log scale, :N for a "
                         "step) or choices; repeatable")
    tu.add_argument("--space-file", metavar="TOML", help="search space file ([optim] lr = {low = 0.01, high = 1, "
                                                          "log = true}; batch_size = {choices = [128, 256]})")
    tu.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="change the base recipe; repeatable")
    tu.add_argument("--trials", type=int, default=20, help="finished trials the study needs, over all its workers "
                                                           "(default 20)")
    tu.add_argument("--timeout", type=float, metavar="S", help="this worker starts no trial after S seconds")
    tu.add_argument("--metric", choices=["val_acc", "val_loss", "test_acc", "test_loss"], default="val_acc",
                    help="the objective, from summary.json (the mean over folds for k-fold; default val_acc)")
    tu.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="default tpe")
    tu.add_argument("--seed", type=int, help="the sampler's seed (give each worker its own, or none)")
    tu.add_argument("--pruner", choices=["median", "halving", "wilcoxon", "none"], default="median",
                    help="stops trials on their per-epoch validation reports: median, successive halving, or "
                         "(k-fold) Wilcoxon on per-fold scores (default median)")
    tu.add_argument("--startup-trials", type=int, default=5, help="median pruner: finished trials before it "
                                                                    "prunes (default 5)")
    tu.add_argument("--storage", metavar="URL", help="sqlite:///PATH, postgresql://..., mysql+pymysql://..., or "
                                                     "journal:PATH (default sqlite:///OUT/study.db)")
    tu.add_argument("--study", help="study name (default <recipe name>-tune)")
    tu.add_argument("--out", help="this worker's study folder: trial folders, tune.md (default runs/<study>)")
    tu.add_argument("--heartbeat", type=int, default=30, metavar="S", help="seconds between a trial's heartbeats; "
                    "a trial silent for twice this is failed and run again (default 30)")


def _lr_find_parser(sub) -> None:
    lf = sub.add_parser("lr-find", help="the learning-rate range test: loss against an exponentially rising lr, "
                                        "a suggested --set optim.lr=...")
    lf.add_argument("recipe")
    lf.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    lf.add_argument("--steps", type=int, default=100, help="optimizer steps per sweep (default 100)")
    lf.add_argument("--start", type=float, default=1e-7, help="first lr (default 1e-7)")
    lf.add_argument("--end", type=float, default=10.0, help="last lr (default 10)")
    lf.add_argument("--rule", choices=["valley", "steepest"], default="valley",
                    help="the suggestion: fastai's valley (default) or the steepest descent against log lr")
    lf.add_argument("--out", help="folder for lr_find.png and lr_find.json (default runs/<recipe name>-lr-find)")


def _result_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="test accuracy and per-class table of a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", help="store directory (default: the one in the checkpoint's recipe)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])

    rp = sub.add_parser("report", help="write RUN/report.md, or compare several runs side by side")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<name>)")
    rp.add_argument("--out", default="report.md", help="comparison file when several runs are given "
                                                       "(default ./report.md; one run writes RUN/report.md)")

    ex = sub.add_parser("export", help="a checkpoint as ONNX or TorchScript, its evaluation built in")
    ex.add_argument("checkpoint", help="e.g. runs/quickstart/checkpoints/best.pt")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    ex.add_argument("--out", help="output file (default: beside the checkpoint, best.onnx / best.torchscript.pt)")
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")

    pd = sub.add_parser("predict", help="top-k classes of image files (PNG/JPEG, any size, or folders of "
                                                 "them) under a checkpoint or export")
    pd.add_argument("checkpoint", help="e.g. runs/quickstart/checkpoints/best.pt, or a file of fastcifar export")
    pd.add_argument("images", nargs="+", metavar="IMAGE", help="an image file, or a folder: its PNG/JPEG files, "
                                                               "recursively, in path order")
    pd.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    pd.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])


def _prepare(args, console: Console) -> None:
    from fastcifar.data import ReadOptions, prepare_store, resolve_source, verify_store
    from fastcifar.data.store import is_store_dir
    from fastcifar.lifecycle import stop_raises

    if args.verify:
        meta = verify_store(Path(args.verify))
        console.print(f"{args.verify}: ok ({meta['counts']['train']} train, {meta['counts']['test']} test images, "
                      f"{len(meta['classes'])} classes, hashes match)")
        return
    if args.format == "beton":  # before any work: the store alone would not be what was asked for
        from fastcifar.backends.ffcv import require_ffcv

        require_ffcv("prepare --format beton")
    given = Path(os.path.expanduser(args.source or DEFAULT_STORE))
    if args.format == "beton" and given.is_dir() and is_store_dir(given):  # a prepared store: its .beton only
        from fastcifar.backends.ffcv import default_beton

        out = default_beton(given) if args.out == DEFAULT_STORE else Path(os.path.expanduser(args.out))
        _write_beton(given, out, console)
        return
    if args.size and not 8 <= args.size <= 1024:
        raise FastCifarError(f"--size: must be in [8, 1024], got {args.size}")
    options = ReadOptions(dataset=args.dataset, labels=args.labels, size=args.size, extra=args.extra)
    with stop_raises("prepare"):
        source = resolve_source(args.source, Path(os.path.expanduser(args.cache)), args.dataset, args.extra)
        meta = prepare_store(source, Path(args.out), force=args.force, log=console.print, options=options)
    names = meta["classes"]
    shown = ", ".join(names) if len(names) <= 12 else ", ".join(names[:10]) + f", ... ({len(names)} classes)"
    stats = meta.get("stats", {})
    console.print(f"{args.out}: {meta['counts']['train']} train + {meta['counts']['test']} test images, "
                  f"classes {shown}" + (f"; mean {stats['mean']}, std {stats['std']}" if stats else ""))
    if args.format == "beton":  # any source: the store first (above), then its .beton beside it
        from fastcifar.backends.ffcv import default_beton

        _write_beton(Path(args.out), default_beton(Path(args.out)), console)  # a stop keeps the finished store


def _write_beton(store_dir: Path, out: Path, console: Console) -> None:
    """The store's .beton under prepare's signal handler: a stop is one line, the temp file removed."""
    from fastcifar.backends.ffcv import write_beton
    from fastcifar.lifecycle import stop_raises

    with stop_raises(f"writing {out}"):
        write_beton(store_dir, out, log_fn=console.print)


def _train(args, console: Console) -> None:
    from fastcifar.distributed import run_distributed, torchrun_env
    from fastcifar.recipe import load_recipe
    from fastcifar.run import run_training
    from fastcifar.report import selection_note

    overrides = list(args.overrides) + ([f'train.device="{args.device}"'] if args.device else [])
    recipe = load_recipe(args.recipe, overrides)
    run_dir = Path(args.out or Path("runs") / recipe.name)
    if args.folds_parallel or torchrun_env() is not None:
        summary = run_distributed(recipe, run_dir, console, resume=args.resume, folds_parallel=args.folds_parallel)
        if summary is None:  # a rank other than 0: rank 0 reports
            return
    else:
        summary = run_training(recipe, run_dir, console, resume=args.resume)
    if "test_acc_mean" in summary:
        console.print(f"{run_dir}: test accuracy {summary['test_acc_mean']:.2%}")
    console.print(f"{run_dir}: validation accuracy {summary['val_acc_mean']:.2%}"
                  + (f" ± {summary['val_acc_std']:.2%}" if len(summary["folds"]) > 1 else ""))
    if note := selection_note(summary["folds"]):
        console.print(f"[yellow]{run_dir}: {note}[/yellow]")


def _sweep(args, console: Console) -> None:
    from fastcifar.recipe import load_recipe
    from fastcifar.sweep import pack_arg, run_sweep

    pack = pack_arg(args.pack)
    out = Path(args.out or Path("runs") / f"{load_recipe(args.recipe, args.overrides).name}-sweep")
    run_sweep(args.recipe, args.overrides, args.vary, out, console, pack=pack)


def _tune(args, console: Console) -> None:
    from fastcifar.tune_study import plan_tune

    cfg = plan_tune(args)  # every refusal before the study folder or a trial exists; needs Optuna
    from fastcifar.tune import run_tune

    run_tune(cfg, console)


def _lr_find(args, console: Console) -> None:
    from fastcifar.lrfind_run import run_lr_find

    run_lr_find(args, console)


def _eval(args, console: Console) -> None:
    from fastcifar.evaluate import eval_checkpoint

    eval_checkpoint(args.checkpoint, args.data, args.device, console)


def _report(args, console: Console) -> None:
    from fastcifar.report import combine_reports

    path = combine_reports([Path(d) for d in args.runs], Path(args.out))
    console.print(f"wrote {path}")


def _predict(args, console: Console) -> None:
    from fastcifar.predict import predict, print_predictions

    results = predict(Path(args.checkpoint), [Path(p) for p in args.images], args.top_k, args.device)
    print_predictions(results, console)


def _export(args, console: Console) -> None:
    from fastcifar.export import export

    export(args.checkpoint, args.format, args.out, args.opset, log=console.print)


def _recipes(args, console: Console) -> None:
    from rich.table import Table

    from fastcifar.recipe import builtin_recipes, recipe_summary

    table = Table(title="built-in recipes: fastcifar train NAME")
    table.add_column("name")
    table.add_column("what")
    for name, text in builtin_recipes().items():
        table.add_row(name, recipe_summary(text))
    console.print(table)


def _bench(args, console: Console) -> None:
    from fastcifar.bench.command import run_bench

    run_bench(args, console)


MAX_ERROR = 400  # characters: an error is one line a person reads, not a dump of the input that caused it


def error_line(text: str) -> str:
    """One short line: whitespace collapsed, terminal escapes and memory addresses (which differ on every run
    and mean nothing to a user) removed, and cut at MAX_ERROR characters."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    if hasattr(sys.stdout, "reconfigure"):  # epoch lines reach a log file as they happen, not at exit
        sys.stdout.reconfigure(line_buffering=True)

    console = Console()
    try:
        {"prepare": _prepare, "train": _train, "sweep": _sweep, "tune": _tune, "lr-find": _lr_find, "eval": _eval,
         "report": _report, "predict": _predict, "export": _export, "recipes": _recipes,
         "bench": _bench}[args.command](args, console)
    except FastCifarError as e:
        print(f"fastcifar: error: {error_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # permissions, missing directories, read-only disks: name the file, skip the traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"fastcifar: error: {error_line(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 2
    except MemoryError:
        print("fastcifar: error: out of memory (a smaller train.batch_size, model or store may fit)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = {"train": " (continue with --resume)", "tune": " (rerun the same command to carry on)"}.get(
            args.command, "")
        print(f"fastcifar: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
