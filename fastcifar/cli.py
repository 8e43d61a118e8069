"""The command line: parse arguments, call one function, turn user errors into one line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fastcifar import __version__
from fastcifar.errors import CheckpointError, FastCifarError
from fastcifar.recipe import DEFAULT_STORE

if TYPE_CHECKING:
    from rich.console import Console


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcifar", description="A high-throughput PyTorch trainer for CIFAR-10 "
                                "and CIFAR-shaped data: prepare a store, train a recipe, evaluate, report.")
    p.add_argument("--version", action="version", version=f"fastcifar {__version__}")
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
    _recipes_parser(sub)


def _recipes_parser(sub) -> None:
    rc = sub.add_parser("recipes", aliases=["recipe"], help="list the built-in recipes (usable by name: fastcifar "
                        "train quickstart); `recipes show NAME` prints one resolved, `recipes keys` every key")
    what = rc.add_subparsers(dest="recipes_command")
    what.add_parser("list", help="the built-in recipes with their descriptions (the default)")
    show = what.add_parser("show", help="a recipe as fastcifar train would run it: every key explicit, --set applied")
    show.add_argument("recipe", help="a TOML recipe file, or a built-in recipe's name")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a recipe value (type-checked); repeatable")
    what.add_parser("keys", help="every recipe key with its type, default and meaning")


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
    ev = sub.add_parser("eval", help="test accuracy and per-class table of a checkpoint (the whole test set)")
    ev.add_argument("checkpoint", help="a checkpoint written by fastcifar train, e.g. runs/quickstart/checkpoints/"
                                       "best.pt (an export from fastcifar export runs under fastcifar predict)")
    ev.add_argument("--data", metavar="STORE", help="store directory (default: the store the run recorded in its "
                                                    "data.json, else the recipe's data.store, here or under "
                                                    "$FASTCIFAR_DATA)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                    help="where to evaluate (default auto: cuda, else mps, else cpu)")
    ev.add_argument("--json", nargs="?", const="-", metavar="FILE", help="also write the results as JSON to FILE "
                                                                        "(alone or -: to stdout, instead of the table)")

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
    pd.add_argument("--json", nargs="?", const="-", metavar="FILE", help="also write the predictions as JSON to FILE "
                                                                        "(alone or -: to stdout, instead of the table)")


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
    if args.source is None and not os.environ.get("FASTCIFAR_SOURCE") and args.format == "store":
        if (meta := _prepared_already(Path(os.path.expanduser(args.out)), options)) is not None:
            origin = meta.get("source", {}).get("path") if isinstance(meta.get("source"), dict) else None
            console.print(f"{args.out}: already prepared and verified ({meta['counts']['train']} train + "
                          f"{meta['counts']['test']} test images, {len(meta['classes'])} classes"
                          + (f", from {origin}" if origin else "") + "); nothing to do, no source needed",
                          markup=False, highlight=False)
            return
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


DATASET_KIND = {"cifar10": "cifar-python", "cifar100": "cifar100-python", "svhn": "svhn-mat", "folder": "image-folder"}


def _prepared_already(out: Path, options) -> dict | None:
    """The meta of a complete store at `out` whose hashes verify and that these options would prepare again; a
    rerun without a source (`make train` twice) then reuses it instead of trying a download. None otherwise:
    prepare proceeds as without it (and refuses to replace what it did not write)."""
    from fastcifar.data import ReadOptions, verify_store
    from fastcifar.data.store import is_store_dir

    try:
        if not (out.is_dir() and is_store_dir(out)):
            return None
        meta = verify_store(out)  # every array re-hashed: ~1 s for CIFAR-10's 184 MB
    except (FastCifarError, OSError):
        return None
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    stored = {**ReadOptions().as_dict(), **(source.get("options") if isinstance(source.get("options"), dict) else {})}
    want = options.as_dict()
    same = all(stored[k] == want[k] for k in ("labels", "size", "extra"))
    dataset = want["dataset"] in ("auto", stored["dataset"]) or source.get("kind") == DATASET_KIND.get(want["dataset"])
    return meta if same and dataset else None


def _write_beton(store_dir: Path, out: Path, console: Console) -> None:
    """The store's .beton under prepare's signal handler: a stop is one line, the temp file removed."""
    from fastcifar.backends.ffcv import write_beton
    from fastcifar.lifecycle import stop_raises

    with stop_raises(f"writing {out}"):
        write_beton(store_dir, out, log_fn=console.print)


def _train(args, console: Console) -> None:
    from fastcifar.recipe import load_recipe

    overrides = list(args.overrides) + ([f'train.device="{args.device}"'] if args.device else [])
    # The recipe first, torch after: a misspelt --set key is one line in a fraction of a second instead of after
    # the ~20 s it takes to import torch on a loaded 2-core machine (the run modules below import it).
    recipe = load_recipe(args.recipe, overrides)
    from fastcifar.distributed import run_distributed, torchrun_env
    from fastcifar.report import closing_lines, selection_note
    from fastcifar.run import run_training

    run_dir = Path(args.out or Path("runs") / recipe.name)
    if args.folds_parallel or torchrun_env() is not None:
        summary = run_distributed(recipe, run_dir, console, resume=args.resume, folds_parallel=args.folds_parallel)
        if summary is None:  # a rank other than 0: rank 0 reports
            return
    else:
        summary = run_training(recipe, run_dir, console, resume=args.resume)
    for line in closing_lines(run_dir, summary):
        console.print(line, markup=False, highlight=False)
    if note := selection_note(summary["folds"]):
        console.print(f"{run_dir}: {note}", style="yellow", markup=False, highlight=False)


def _sweep(args, console: Console) -> None:
    from fastcifar.recipe import load_recipe

    out = Path(args.out or Path("runs") / f"{load_recipe(args.recipe, args.overrides).name}-sweep")  # before torch
    from fastcifar.sweep import pack_arg, run_sweep

    run_sweep(args.recipe, args.overrides, args.vary, out, console, pack=pack_arg(args.pack))


def _tune(args, console: Console) -> None:
    from fastcifar.tune_study import plan_tune

    cfg = plan_tune(args)  # every refusal before the study folder or a trial exists; needs Optuna
    from fastcifar.tune import run_tune

    run_tune(cfg, console)


def _lr_find(args, console: Console) -> None:
    from fastcifar.lrfind_run import run_lr_find

    run_lr_find(args, console)


def _not_an_export(path: str) -> None:
    """eval reads checkpoints; an exported file (which predict does read) gets a line saying what to do with it."""
    from fastcifar.export import export_meta, looks_exported

    if not (Path(path).is_file() and looks_exported(Path(path))):
        return
    meta = export_meta(Path(path)) or {}
    origin = f" (exported from {meta['checkpoint']})" if isinstance(meta.get("checkpoint"), str) else ""
    raise CheckpointError(f"{path}: is an exported model{origin}; eval takes a checkpoint written by fastcifar train "
                          "(RUN/checkpoints/best.pt), and fastcifar predict runs an export on images: fastcifar "
                          f"predict {path} IMAGE ...")


def _device_flag(name: str) -> None:
    """A --device that is not there, named as the flag the user typed (not the recipe's train.device)."""
    from fastcifar.device import resolve_device

    resolve_device(name, key="--device")


def _eval(args, console) -> None:
    from fastcifar.evaluate import eval_checkpoint, print_eval
    from fastcifar.outputs import JsonOut

    _not_an_export(args.checkpoint)
    _device_flag(args.device)
    out = JsonOut(args.json, "eval")
    result = eval_checkpoint(args.checkpoint, args.data, args.device)
    if not out.to_stdout:
        print_eval(result, console)
    out.write(result, console)


def _report(args, console: Console) -> None:
    from fastcifar.report import combine_reports

    path = combine_reports([Path(d) for d in args.runs], Path(args.out))
    console.print(f"wrote {path}")


def _predict(args, console: Console) -> None:
    from fastcifar.data.images import IMAGE_EXTS
    from fastcifar.outputs import JsonOut
    from fastcifar.predict import predict, print_predictions

    if args.json and Path(args.json).suffix.lower() in IMAGE_EXTS:  # `--json a.png b.png` took a.png as its FILE
        raise FastCifarError(f"--json {args.json}: is an image, not a JSON file to write; put --json after the "
                             "images, or give it a file name: --json predictions.json")
    _device_flag(args.device)
    out = JsonOut(args.json, "predict")
    results = predict(Path(args.checkpoint), [Path(p) for p in args.images], args.top_k, args.device)
    if not out.to_stdout:
        print_predictions(results, console)
    out.write({"model": args.checkpoint, "top_k": args.top_k, "predictions": [
        {"image": r["image"], "top": [{"class": c, "probability": p} for c, p in r["top"]]} for r in results]},
        console)


def _export(args, console: Console) -> None:
    from fastcifar.export import export

    export(args.checkpoint, args.format, args.out, args.opset, log=console.print)


def _recipes(args, console: Console) -> None:
    from fastcifar.recipe_commands import recipes_command

    recipes_command(args, console)


def _bench(args, console: Console) -> None:
    from fastcifar.bench.command import run_bench

    run_bench(args, console)


STOP_AT_ONCE = ("eval", "report", "predict", "export", "recipes", "lr-find")
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
    from fastcifar.console import make_console

    from fastcifar.lifecycle import stop_raises

    if hasattr(sys.stdout, "reconfigure"):  # epoch lines reach a log file as they happen, not at exit
        sys.stdout.reconfigure(line_buffering=True)

    console = make_console()  # a log file or pipe gets whole lines, never wrapped or cut (fastcifar.console)
    try:
        # A stop (SIGINT / SIGTERM) is one line and exit 128 + n, temp files removed: train, sweep and tune
        # checkpoint first (GracefulStop), prepare handles its own, these stop at once (lifecycle.stop_raises); bench
        # is left to the default (its DataLoader workers and forked loaders inherit handlers).
        with stop_raises(args.command) if args.command in STOP_AT_ONCE else contextlib.nullcontext():
            {"prepare": _prepare, "train": _train, "sweep": _sweep, "tune": _tune, "lr-find": _lr_find,
             "eval": _eval, "report": _report, "predict": _predict, "export": _export, "recipes": _recipes,
             "recipe": _recipes, "bench": _bench}[args.command](args, console)
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
