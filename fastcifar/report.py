"""`fastcifar report`: a run directory's report.md, or several runs compared side by side.

Reads only what a run directory holds (JSON, CSV, TOML, PNG names) and never imports torch, so a report can be
built anywhere. Keys newer than the oldest run format are optional: a missing value is shown as "–".
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Callable

from fastcifar.atomic import write_text
from fastcifar.differences import differing_keys
from fastcifar.ownership import MARKERS, MD_MARKER, has_marker, legacy_run, md_ours, output_guard
from fastcifar.runfiles import FIGURE_FILES, FIGURES_DIR, FoldFiles, ReportError, RunFiles, dig, load_run, num

DASH = "–"
# (key, label, path inside result["metrics"], format): "pct" for accuracies, "num" (4 decimals) otherwise.
HEADLINE = [
    ("accuracy", "accuracy", ("accuracy",), "pct"),
    ("top5", "top-5 accuracy", ("top5_accuracy",), "pct"),
    ("precision", "precision (macro)", ("precision", "macro"), "num"),
    ("recall", "recall (macro)", ("recall", "macro"), "num"),
    ("f1", "F1 (macro)", ("f1", "macro"), "num"),
    ("specificity", "specificity (mean)", ("specificity", "mean"), "num"),
    ("kappa", "Cohen's kappa", ("cohen_kappa",), "num"),
    ("balanced_accuracy", "balanced accuracy", ("balanced_accuracy",), "pct"),
    ("auroc", "AUROC (macro)", ("auroc_macro",), "num"),
    ("log_loss", "log-loss", ("log_loss",), "num"),
    ("ece", "ECE", ("ece",), "num"),
]
FORMAT = {key: kind for key, _, _, kind in HEADLINE}
LABEL = {key: label for key, label, _, _ in HEADLINE}
FOLD_TABLE = ["accuracy", "precision", "recall", "specificity", "f1", "kappa", "balanced_accuracy", "auroc"]
COMPARISON = "run comparison"
PER_CLASS_ROWS = 20  # per-class rows at most: beyond, the best and worst halves
ENV_KEYS = ["python", "platform", "torch", "torchvision", "numpy", "cpu_count", "torch_threads", "device", "gpu",
            "cuda", "git_commit"]


def split_of(result: dict[str, Any]) -> str:
    split = dig(result, "metrics", "split")
    return split if isinstance(split, str) else ("test" if "test_acc" in result else "val")


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The final metrics of one fold; older runs (no "metrics") fall back to test, else validation, acc/loss."""
    out = {key: num(dig(result, "metrics", *path)) for key, _, path, _ in HEADLINE}
    prefix = "test" if "test_acc" in result else "val"
    if out["accuracy"] is None:
        out["accuracy"] = num(result.get(f"{prefix}_acc"))
    if out["log_loss"] is None:
        out["log_loss"] = num(result.get(f"{prefix}_loss"))
    return out


def fold_timing(fold: FoldFiles) -> dict[str, float | None]:
    r, rows = fold.result, fold.rows
    times = [t for t in (row.get("epoch_time_s") for row in rows) if t is not None]
    rates = [t for t in (row.get("img_per_s") for row in rows) if t is not None]
    train_time = num(r.get("train_time_s"))
    return {"epochs_run": num(r.get("epochs_run")) if "epochs_run" in r else (float(len(rows)) if rows else None),
            "best_epoch": num(r.get("best_epoch")),
            "train_time_s": train_time if train_time is not None else (sum(times) if times else None),
            "img_per_s": statistics.fmean(rates) if rates else None,
            "inference_ms": num(r.get("inference_ms_per_image")), "params": num(r.get("params")),
            "peak_memory_mb": num(r.get("peak_memory_mb")), "compile_s": num(r.get("compile_time_s"))}


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (statistics.stdev) of the values present; std needs two."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    try:
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)
    except OverflowError:  # damaged files: 1e308 twice has no float mean; unknown rather than a traceback
        return None, None


def fmt(v: float | None, kind: str = "num") -> str:
    if v is None or not math.isfinite(v * (100 if kind == "pct" else 1)):  # 1e308 as a percentage: inf
        return DASH
    return {"pct": f"{v:.2%}", "num": f"{v:.4f}", "int": f"{v:,.0f}", "s": f"{v:,.1f}",
            "ms": f"{v:.3f}", "mb": f"{v:,.1f}", "ratio": f"{v:.2f}×"}[kind]


# ---------------------------------------------------------------------------------------------- markdown


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[str]], numeric: bool = True) -> list[str]:
    """A markdown table; the first column left-aligned (names), the rest right-aligned if numeric."""
    align = " ---: " if numeric else " --- "
    out = ["| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "|".join([" --- "] + [align] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out + [""]


def _rel(run: RunFiles, path: Path) -> str:
    return path.relative_to(run.dir).as_posix()


def _figures(fold: FoldFiles) -> list[Path]:
    """Existing figures: the known ones in a fixed order, then any other PNG the fold left."""
    d = fold.dir / FIGURES_DIR
    known = [d / n for n in FIGURE_FILES.values() if (d / n).is_file()]
    extra = sorted(p for p in d.glob("*.png") if p.name not in FIGURE_FILES.values()) if d.is_dir() else []
    return known + extra


def _env_section(run: RunFiles) -> list[str]:
    if not run.env:
        return ["## Environment", "", "env.json is missing.", ""]
    env = run.env
    rows = [[k, str(env[k]) if env.get(k) is not None else DASH] for k in ENV_KEYS if k in env or k == "gpu"]
    store = env.get("store") if isinstance(env.get("store"), dict) else {}
    rows.append(["store", str(store.get("path", DASH))])
    hashes = store.get("sha256") if isinstance(store.get("sha256"), dict) else {}
    rows += [[f"sha256 {name}", f"`{str(digest)[:16]}…`"] for name, digest in sorted(hashes.items())]
    source = store.get("source") if isinstance(store.get("source"), dict) else {}
    if source:
        rows.append(["source", f"{source.get('kind', DASH)}: {source.get('path', DASH)} "
                               f"(sha256 `{str(source.get('sha256', ''))[:16]}…`)"])
    return ["## Environment", ""] + md_table(["key", "value"], rows, numeric=False)


def _recipe_section(run: RunFiles) -> list[str]:
    if run.recipe_text is None:
        return ["## Recipe", "", "recipe.toml is missing.", ""]
    return ["## Recipe", "", "```toml", run.recipe_text.rstrip("\n"), "```", ""]


def _timing_section(run: RunFiles) -> list[str]:
    rows = []
    for fold in run.folds:
        t = fold_timing(fold)
        rows.append([str(fold.index), fmt(t["epochs_run"], "int"), fmt(t["best_epoch"], "int"),
                     fmt(t["train_time_s"], "s"), fmt(t["img_per_s"], "int"), fmt(t["inference_ms"], "ms"),
                     fmt(t["params"], "int"), fmt(t["peak_memory_mb"], "mb"), fmt(t["compile_s"], "s")])
    header = ["fold", "epochs run", "best epoch", "train time (s)", "mean img/s", "inference ms/image",
              "parameters", "peak memory (MB)", "compile warm-up (s, not in img/s)"]
    return (["## Timing and throughput", ""] + md_table(header, rows)
            + [f"Total wall (train time over all folds): {fmt(total_train_time(run), 's')} s", ""])


def _metrics_section(run: RunFiles) -> list[str]:
    per_fold = [headline(f.result) for f in run.folds]
    split = split_of(run.folds[0].result)
    n = num(dig(run.folds[0].result, "metrics", "n"))
    scope = capped(run.folds[0].result, split).removeprefix(" on ")
    title = f"## Final metrics ({split} set" + (f", {scope or f'{n:,.0f} images'}" if n is not None and
                                                 len(per_fold) == 1 else "") + ")"
    if len(per_fold) == 1:
        rows = [[label, fmt(per_fold[0][key], kind)] for key, label, _, kind in HEADLINE]
        return [title, ""] + md_table(["metric", "value"], rows)
    rows = []
    for key, label, _, kind in HEADLINE:
        mean, std = mean_std([m[key] for m in per_fold])
        rows.append([label, fmt(mean, kind), fmt(std, kind)])
    return [title, ""] + md_table(["metric", f"mean over {len(per_fold)} folds", "std"], rows)


def per_class(result: dict[str, Any]) -> dict[str, list[float | None]]:
    """Per-class accuracy, precision, recall, F1, specificity of one fold (lists aligned with its classes)."""
    classes = result.get("classes") if isinstance(result.get("classes"), list) else []
    prefix = "test" if "test_acc" in result else "val"
    out: dict[str, list[float | None]] = {}
    for key, path in [("accuracy", ("per_class_accuracy",)), ("precision", ("precision", "per_class")),
                      ("recall", ("recall", "per_class")), ("f1", ("f1", "per_class")),
                      ("specificity", ("specificity", "per_class"))]:
        out[key] = [num(dig(result, "metrics", *path, i)) for i in range(len(classes))]
    if all(v is None for v in out["accuracy"]):  # older runs: the per-class accuracy of the evaluated split
        out["accuracy"] = [num(dig(result, f"{prefix}_per_class_acc", i)) for i in range(len(classes))]
    return out


def _per_class_section(run: RunFiles) -> list[str]:
    classes = next((f.result["classes"] for f in run.folds if isinstance(f.result.get("classes"), list)), None)
    if not classes:
        return []
    tables = [per_class(f.result) for f in run.folds]
    keys = [("accuracy", "pct"), ("precision", "num"), ("recall", "num"), ("f1", "num"), ("specificity", "num")]
    means = [[mean_std([dig(t, key, i) for t in tables])[0] for key, _ in keys] for i in range(len(classes))]
    order = list(range(len(classes)))
    note = []
    if len(classes) > PER_CLASS_ROWS:  # 100 classes: the 10 best and the 10 worst by accuracy
        ranked = sorted(order, key=lambda i: -1.0 if means[i][0] is None else means[i][0], reverse=True)
        half = PER_CLASS_ROWS // 2
        order = ranked[:half] + ranked[-half:]
        note = [f"The {half} classes with the highest and the {half} with the lowest accuracy, of "
                f"{len(classes)}.", ""]
    rows = [[str(classes[i]), *(fmt(v, kind) for v, (_, kind) in zip(means[i], keys))] for i in order]
    what = f" (mean over {len(tables)} folds)" if len(tables) > 1 else ""
    return [f"## Per-class metrics{what}", "", *note] + md_table(
        ["class", "accuracy", "precision", "recall", "F1", "specificity"], rows)


def _kfold_section(run: RunFiles) -> list[str]:
    """The fold table with mean and std rows, and each fold's confusion matrix."""
    header = ["fold", "best epoch"] + [LABEL[k].replace(" (macro)", "").replace(" (mean)", "") for k in FOLD_TABLE]
    per_fold = [(f, headline(f.result)) for f in run.folds]
    rows = [[str(f.index), fmt(num(f.result.get("best_epoch")), "int")] + [fmt(m[k], FORMAT[k]) for k in FOLD_TABLE]
            for f, m in per_fold]
    for stat, pick in (("mean", 0), ("std", 1)):
        best = mean_std([num(f.result.get("best_epoch")) for f, _ in per_fold])[pick]
        rows.append([f"**{stat}**", fmt(best, "num" if stat == "std" else "s")]
                    + [fmt(mean_std([m[k] for _, m in per_fold])[pick], FORMAT[k]) for k in FOLD_TABLE])
    confusion = [(f, f.dir / FIGURES_DIR / FIGURE_FILES["confusion"]) for f in run.folds]
    links = [f"[fold {f.index}]({_rel(run, path)})" for f, path in confusion if path.is_file()]
    out = [f"## Folds ({len(run.folds)}, {split_of(run.folds[0].result)} metrics)", ""] + md_table(header, rows)
    return out + ([f"Confusion matrices: {' · '.join(links)}", ""] if links else [])


def _figures_section(run: RunFiles) -> list[str]:
    out = []
    for fold in run.folds:
        figs = _figures(fold)
        if figs and len(run.folds) > 1:
            out += [f"### Fold {fold.index}", ""]
        out += [f"![{p.stem}]({_rel(run, p)})" for p in figs] + ([""] if figs else [])
    return (["## Figures", ""] + out) if out else []


def selection_note(results: list[dict[str, Any]]) -> str | None:
    """One sentence when a fold's best.pt is an earlier epoch than its last validated one, picked by validations
    on the very set its numbers describe (the official split validates on the test set; a merged k-fold has no
    other): that pick flatters. When the last epoch won, nothing was picked on the set: no note."""
    def picked(r: dict[str, Any]) -> bool:
        last, best = num(dig(r, "selection", "last_validated_epoch")), num(r.get("best_epoch"))
        return dig(r, "selection", "on_reported_set") is True and None not in (last, best) and best != last

    chosen = [r for r in results if picked(r)]
    if not chosen:
        return None
    counts = sorted({int(num(dig(r, "selection", "validations")) or 0) for r in chosen})
    many = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    best, last = int(chosen[0]["best_epoch"]), int(chosen[0]["selection"]["last_validated_epoch"])
    which = (f"best.pt is epoch {best}, not the last validated ({last}),"
             if len(results) == 1 else f"in {len(chosen)} of {len(results)} folds best.pt is not the last validated "
                                       "epoch but one")
    return (f"{which} picked by {many} validations on this same set, so these numbers are optimistic for unseen "
            'images; a held-out test set (split.kind = "holdout", or split.pool = "train") or eval.every = 0 (the '
            "last epoch only) avoids that")


def capped(result: dict[str, Any], split: str) -> str:
    """" on N of M test images" when data.eval_subset evaluated only part of the set, else "" (a whole set, or a
    run from before the counts were recorded)."""
    n, total = num(result.get(f"{split}_images")), num(result.get(f"{split}_images_total"))
    if n is None or total is None or n >= total:
        return ""
    return f" on {n:,.0f} of {total:,.0f} {'validation' if split == 'val' else split} images"


def closing_lines(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """The train command's last lines: the test accuracy, the validation accuracy where it is another set (the
    official split validates on the test set: one line, not two equal ones); selection_note may follow."""
    folds = summary["folds"]
    val_is_test = all(dig(r, "selection", "on_reported_set") is True for r in folds)
    lines = []
    if "test_acc_mean" in summary:
        lines.append(f"{run_dir}: test accuracy {summary['test_acc_mean']:.2%}{capped(folds[0], 'test')}"
                     + (" (the official split validates on the test set)" if val_is_test else ""))
    if "test_acc_mean" not in summary or not val_is_test:
        spread = f" ± {summary['val_acc_std']:.2%}" if len(folds) > 1 else ""
        scope = capped(folds[0], "val")
        lines.append(f"{run_dir}: validation accuracy {summary['val_acc_mean']:.2%}{spread}{scope}"
                     + (" per fold" if scope and len(folds) > 1 else ""))
    return lines


def _headline_line(run: RunFiles) -> list[str]:
    """What a reader came for, first: the accuracy, mean ± std over the folds (and how far it flatters)."""
    accs = [headline(f.result)["accuracy"] for f in run.folds]
    mean, std = mean_std(accs)
    split = split_of(run.folds[0].result)
    spread = f" ± {fmt(std, 'pct')} over {len(accs)} folds" if len(accs) > 1 else ""
    note = selection_note([f.result for f in run.folds])
    scope = capped(run.folds[0].result, split)
    return [f"**{split} accuracy: {fmt(mean, 'pct')}{spread}**{scope}"
            + (" (data.eval_subset: not the whole set)" if scope else ""), ""] + \
        ([f"> Note: {note}.", ""] if note else [])


def _collapsed(section: list[str]) -> list[str]:
    """A section folded away under its title (GitHub and most viewers render <details>)."""
    title = section[0].lstrip("# ")
    return ["<details>", f"<summary>{title}</summary>", "", *section[1:], "</details>", ""]


def render_report(run: RunFiles) -> str:
    """The headline accuracy first; environment and resolved recipe folded away under it; then timing and the
    results (metric table, folds, curves and confusion matrices, per-class metrics). Everything that differs
    between two runs of the same numbers (paths, environment, times) stays above "## Final metrics"."""
    lines = [f"# {run.name}", "", *_headline_line(run), f"Run directory: `{run.dir}`", ""]
    lines += _collapsed(_env_section(run)) + _collapsed(_recipe_section(run)) + _timing_section(run)
    lines += _metrics_section(run)
    if len(run.folds) > 1:
        lines += _kfold_section(run)
    lines += _figures_section(run) + _per_class_section(run)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(run_dir: Path) -> Path:
    """Build RUN/report.md (atomically) from what the run directory holds; returns its path."""
    run = load_run(Path(run_dir))
    path = run.dir / "report.md"
    write_text(path, render_report(run))
    return path


# ---------------------------------------------------------------------------------------------- comparing


def _column_name(run: RunFiles) -> str:
    where = run.env.get("gpu") or run.env.get("device")
    name = run.dir.resolve().name
    return f"{name} ({where})" if where else name


def total_train_time(run: RunFiles) -> float | None:
    """Sum of the folds' train times; unknown if any fold's is (a partial sum would flatter that run)."""
    times = [fold_timing(f)["train_time_s"] for f in run.folds]
    return None if None in times else sum(times)  # type: ignore[arg-type]


def _compare_rows(runs: list[RunFiles]) -> list[list[str]]:
    """Rows of the comparison table: headline metrics (mean ± std over folds), timing, environment."""
    def over_folds(run: RunFiles, get: Callable[[FoldFiles], float | None]) -> tuple[float | None, float | None]:
        return mean_std([get(f) for f in run.folds])

    def metric_cell(run: RunFiles, key: str) -> str:
        mean, std = over_folds(run, lambda f: headline(f.result)[key])
        return fmt(mean, FORMAT[key]) + (f" ± {fmt(std, FORMAT[key])}" if std is not None else "")

    rows = [["folds"] + [str(len(r.folds)) for r in runs],
            ["metrics split"] + [split_of(r.folds[0].result) for r in runs]]
    rows += [[LABEL[key]] + [metric_cell(r, key) for r in runs] for key, *_ in HEADLINE]
    train = [total_train_time(r) for r in runs]
    rate = [over_folds(r, lambda f: fold_timing(f)["img_per_s"])[0] for r in runs]
    rows.append(["train time, all folds (s)"] + [fmt(t, "s") for t in train])
    rows.append(["train time vs first"] + [fmt(t / train[0] if t and train[0] else None, "ratio") for t in train])
    rows.append(["mean img/s"] + [fmt(v, "int") for v in rate])
    rows.append(["img/s vs first"] + [fmt(v / rate[0] if v and rate[0] else None, "ratio") for v in rate])
    for key, label, kind in [("epochs_run", "epochs run (mean)", "s"), ("inference_ms", "inference ms/image", "ms"),
                             ("peak_memory_mb", "peak memory (MB)", "mb"), ("params", "parameters", "int")]:
        rows.append([label] + [fmt(over_folds(r, lambda f: fold_timing(f)[key])[0], kind) for r in runs])
    for key in ["device", "gpu", "torch", "cpu_count", "torch_threads", "platform", "git_commit"]:
        rows.append([key] + [str(r.env[key]) if r.env.get(key) is not None else DASH for r in runs])
    return rows


def _differences_section(runs: list[RunFiles]) -> list[str]:
    """## How the recipes differ: the keys whose values are not the same in all runs, one column a run."""
    names = [_column_name(r) for r in runs]
    broken, rows = differing_keys([r.recipe_text for r in runs])
    lines = ["## How the recipes differ", ""]
    if broken:
        lines += [f"recipe.toml missing or unreadable: {', '.join(names[i] for i in broken)} (not compared).", ""]
    if len(runs) - len(broken) < 2:
        return lines
    if not rows:
        return lines + ["Every key is the same in all recipes.", ""]
    kept = [n for i, n in enumerate(names) if i not in broken]
    return lines + md_table(["key", *kept], [[f"`{k}`", *v] for k, v in rows], numeric=False)


def combine_reports(run_dirs: list[Path], out: Path = Path("report.md")) -> Path:
    """One run: (re)build its report.md (`out` unused). Several: write `out` comparing them side by side.
    Only a fastcifar run folder gets a report.md, and `out` is overwritten only if it is a comparison."""
    if not run_dirs:
        raise ReportError("no run directories given")
    if len(run_dirs) == 1:
        run_dir = Path(run_dirs[0])
        if run_dir.is_dir() and not (has_marker(run_dir, "run") or legacy_run(run_dir)):
            raise ReportError(f"{run_dir}: not a fastcifar run folder (no {MARKERS['run']}); refusing to write "
                              "report.md into it")
        return write_report(run_dir)
    runs = [load_run(Path(d)) for d in run_dirs]  # every directory is checked before anything is written
    guard = output_guard(Path(out), "run comparison", md_ours(COMPARISON))
    lines = [MD_MARKER.format(kind=COMPARISON), "# Run comparison", "",
             "Ratios are relative to the first run; metrics are means over folds "
             "(± sample std where a run has several folds).", ""]
    lines += [f"- **{_column_name(r)}**: recipe `{r.name}`, `{r.dir}`" for r in runs] + [""]
    lines += md_table(["", *[_column_name(r) for r in runs]], _compare_rows(runs))
    lines += _differences_section(runs)
    out = Path(out)
    write_text(out, "\n".join(lines).rstrip("\n") + "\n", guard)
    return out
