"""A run directory as `fastcifar report` reads it: result.json, metrics.csv, summary.json, env.json and
recipe.toml of the run and its folds, each optional, each checked (damaged JSON is one ReportError line; values
of the wrong type read as missing). No torch: a report can be built anywhere."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastcifar.errors import FastCifarError, first_line

FIGURES_DIR = "figures"  # a fold's figures, beside its result.json
# The figures a finished fold writes into FIGURES_DIR (fastcifar.artifacts), in the order report.md shows them;
# gradcam.png only for a model with a conv layer.
FIGURE_FILES = {"curves": "curves.png", "confusion": "confusion.png", "samples": "samples.png",
                "predictions": "predictions.png", "mistakes": "mistakes.png", "gradcam": "gradcam.png"}


class ReportError(FastCifarError):
    """A run directory that is missing or empty, or a file in it that cannot be parsed."""


@dataclass
class FoldFiles:
    index: int
    dir: Path
    result: dict[str, Any]
    rows: list[dict[str, float | None]]  # metrics.csv, one dict per epoch


@dataclass
class RunFiles:
    dir: Path
    name: str  # the recipe's name
    env: dict[str, Any]
    summary: dict[str, Any]
    recipe_text: str | None
    folds: list[FoldFiles]
    kfold: bool


def num(v: Any) -> float | None:
    """A finite number, else None: JSON from older or damaged runs may hold null, strings or NaN."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def dig(d: Any, *path: Any) -> Any:
    """d[path[0]][path[1]]..., or None where any step is missing or of the wrong type."""
    for key in path:
        if isinstance(d, dict) and isinstance(key, str):
            d = d.get(key)
        elif isinstance(d, list) and isinstance(key, int) and 0 <= key < len(d):
            d = d[key]
        else:
            return None
    return d


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
        raise ReportError(f"{path}: corrupt JSON ({first_line(e)[:120]})") from None
    except RecursionError:
        raise ReportError(f"{path}: corrupt JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: corrupt JSON (expected an object, got {type(obj).__name__})")
    return obj


def _read_csv(path: Path) -> list[dict[str, float | None]]:
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (csv.Error, ValueError) as e:
        raise ReportError(f"{path}: corrupt CSV ({e})") from None

    def number(text: Any) -> float | None:
        try:
            return num(float(text))
        except (TypeError, ValueError):
            return None

    return [{k: number(v) for k, v in row.items() if k is not None} for row in rows]


def _fold_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """k-fold runs keep each fold in foldN/; other splits keep their single fold in the run directory."""
    found = []
    for d in run_dir.glob("fold*"):
        m = re.fullmatch(r"fold(\d+)", d.name)
        if m and d.is_dir() and ((d / "result.json").is_file() or (d / "metrics.csv").is_file()):
            found.append((int(m.group(1)), d))
    return sorted(found)


def load_run(run_dir: Path) -> RunFiles:
    run_dir = Path(run_dir)
    not_run = ReportError(f"{run_dir}: not a run directory (no metrics.csv or result.json)")
    if not run_dir.is_dir():
        raise not_run
    summary = _read_json(run_dir / "summary.json") or {}
    listed = summary.get("folds") if isinstance(summary.get("folds"), list) else []
    from_summary = {num(r.get("fold")): r for r in listed if isinstance(r, dict)}
    dirs = _fold_dirs(run_dir)
    kfold = bool(dirs)
    if not dirs and ((run_dir / "result.json").is_file() or (run_dir / "metrics.csv").is_file()):
        dirs = [(0, run_dir)]
    folds = []
    for index, d in dirs:
        result = _read_json(d / "result.json") or from_summary.get(index, {})
        folds.append(FoldFiles(int(num(result.get("fold")) or index), d, result, _read_csv(d / "metrics.csv")))
    if not folds:  # a summary without its fold files still tells the headline numbers
        folds = [FoldFiles(i, run_dir, r, []) for i, r in enumerate(from_summary.values())]
        kfold = len(folds) > 1
    if not folds:
        raise not_run
    recipe_path = run_dir / "recipe.toml"
    recipe_text = recipe_path.read_text(encoding="utf-8", errors="replace") if recipe_path.is_file() else None
    name = summary.get("recipe")
    if not isinstance(name, str) and recipe_text:
        m = re.search(r'^name\s*=\s*"([^"]*)"', recipe_text, re.M)
        name = m.group(1) if m else None
    return RunFiles(run_dir, name if isinstance(name, str) else run_dir.resolve().name,
               _read_json(run_dir / "env.json") or {}, summary, recipe_text, folds, kfold)
