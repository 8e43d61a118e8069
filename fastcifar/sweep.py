"""`fastcifar sweep`: one-factor-at-a-time ablations (seed 002's study) and their summary table."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastcifar.atomic import write_text
from fastcifar.errors import RecipeError
from fastcifar.ownership import check_own_dir, has_marker, legacy_run, write_marker
from fastcifar.device import resolve_device
from fastcifar.preflight import check_inputs, check_pack
from fastcifar.recipe import Recipe, load_recipe
from fastcifar.run import drive_packed, run_training

if TYPE_CHECKING:
    from rich.console import Console

# train_time_s: the folds' epoch times summed (training and validation), not the command's wall clock (which would
# include preflight, final evaluation and figures, and be ~0 for a variant a resumed sweep kept)
COLUMNS = ["variant", "accuracy", "delta_pp", "peak_memory_mb", "inference_ms_per_image", "params", "train_time_s"]


def split_values(text: str) -> list[str]:
    """Split `v1,v2,[a,b]` on the commas that are not inside brackets or quotes."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return [v for v in out if v]


def sweep_variants(recipe_path: str, overrides: list[str], varies: list[str]) -> list[tuple[str, Recipe]]:
    """The baseline and every variant, each a loaded (type-checked) recipe."""
    base = load_recipe(recipe_path, overrides)
    variants = [("baseline", base)]
    for item in varies:
        key, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise RecipeError(f"--vary {item!r}: expected section.key=v1,v2,...")
        for value in split_values(values):
            recipe = load_recipe(recipe_path, overrides + [f"{key.strip()}={value}"])
            if recipe != base:  # the baseline's own value is the baseline
                variants.append((f"{key.strip()}={value}", recipe))
    if len(variants) == 1:
        raise RecipeError("--vary: no variant differs from the baseline")
    _check_distinct(variants)
    return variants


def _check_distinct(variants: list[tuple[str, Recipe]]) -> None:
    """Two variants sharing a folder were found only after the first had trained (the second then met a run of
    another recipe); two equal recipes would train twice and fill two rows with one result. Both refused here,
    before anything runs. Folders are compared case-blind: macOS and Windows file systems are."""
    folders: dict[str, str] = {}
    for i, (name, recipe) in enumerate(variants):
        same = next((other for other, r in variants[:i] if r == recipe), None)
        if same is not None:
            raise RecipeError(f"--vary: {name!r} is the same recipe as {same!r}; give each value once")
        folder = _dirname(name)
        if folder.casefold() in folders:
            raise RecipeError(f"--vary: {folders[folder.casefold()]!r} and {name!r} would train into the same "
                              f"folder {folder!r} (characters other than letters, digits and . = + - become _); "
                              "vary them in two sweeps")
        folders[folder.casefold()] = name


def _legacy_sweep(path: Path) -> bool:
    """A sweep folder from before markers: nothing in it but sweep.csv / sweep.md and run folders."""
    return all(p.name in ("sweep.csv", "sweep.md") or (p.is_dir() and (has_marker(p, "run") or legacy_run(p)))
               for p in path.iterdir())


def _dirname(name: str) -> str:
    """A variant's folder: one plain path component ("optim.lr=0.1"; a value such as "../x" cannot escape)."""
    return re.sub(r"[^\w.=+-]", "_", name).lstrip(".")[:100] or "_"


def _row(name: str, summary: dict[str, Any], baseline_acc: float | None) -> dict[str, Any]:
    folds = summary["folds"]
    acc = summary.get("test_acc_mean", summary["val_acc_mean"])

    def mean(key: str) -> float | None:
        vals = [f[key] for f in folds if f.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {"variant": name, "accuracy": acc,
            "delta_pp": None if baseline_acc is None else 100 * (acc - baseline_acc),
            "peak_memory_mb": mean("peak_memory_mb"), "inference_ms_per_image": mean("inference_ms_per_image"),
            "params": folds[0].get("params"), "train_time_s": sum(f["train_time_s"] for f in folds)}


FORMATS = {"accuracy": "{:.2%}", "delta_pp": "{:+.2f}", "peak_memory_mb": "{:,.0f}", "inference_ms_per_image": "{:.3f}",
           "params": "{:,}", "train_time_s": "{:.1f}"}


def _fmt(key: str, v: Any) -> str:
    return "–" if v is None else FORMATS.get(key, "{}").format(v)


def pack_arg(text: str | None) -> int | str | None:
    """--pack: None (variants one after another), "all", or the folds per pack (an integer >= 1)."""
    if text is None or text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise RecipeError(f"--pack: expected a number of folds per pack (>= 1) or all, got {text!r}")
    return int(text)


def run_sweep(recipe_path: str, overrides: list[str], varies: list[str], out_dir: Path, console: Console,
              pack: int | str | None = None) -> list[dict]:
    """Train the baseline and each variant into out_dir/<variant>/ (resumable), then write sweep.csv / .md. With
    `pack`, the variants' folds train together, `pack` at a time (fastcifar.run.drive_packed): each variant is
    still its own run folder."""
    from rich.table import Table

    variants = sweep_variants(recipe_path, overrides, varies)
    check_own_dir(out_dir, "sweep", _legacy_sweep)
    plans = []
    for name, recipe in variants:  # every variant's refusals before the first one trains
        device = resolve_device(recipe.train.device) if pack is not None else None
        plans.append(check_inputs(recipe, out_dir / _dirname(name), resume=True, device=device))
        if pack is not None:
            check_pack(plans[-1].recipe, plans[-1].store, plans[-1].device, folds=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_marker(out_dir, "sweep")
    if pack is not None:
        summaries = drive_packed(plans, console, pack)
    else:
        summaries = []
        for name, recipe in variants:
            console.print(f"[bold]sweep: {name}[/bold]")
            summaries.append(run_training(recipe, out_dir / _dirname(name), console, resume=True))
    rows: list[dict[str, Any]] = []
    for (name, _), summary in zip(variants, summaries):
        rows.append(_row(name, summary, rows[0]["accuracy"] if rows else None))
    rows[0]["delta_pp"] = 0.0
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_dir / "sweep.csv", buf.getvalue())
    header = ["variant", "accuracy", "Δ vs baseline (pp)", "peak memory (MB)", "inference (ms/image)", "params",
              "train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(k, r[k]) for k in COLUMNS) + " |" for r in rows]
    write_text(out_dir / "sweep.md", f"# Sweep of {variants[0][1].name}\n\n" + "\n".join(lines) + "\n")
    table = Table(title=f"sweep: {out_dir}")
    for h in header:
        table.add_column(h, justify="left" if h == "variant" else "right")
    for r in rows:
        table.add_row(*(_fmt(k, r[k]) for k in COLUMNS))
    console.print(table)
    return rows
