"""A run directory as `fastcifar report` reads it: result.json, metrics.csv, summary.json, env.json and
recipe.toml of the run and its folds, each optional, each checked (damaged JSON, a FIFO or device, a file over
64 MiB is one ReportError line; values of the wrong type read as missing). No torch: a report can be built
anywhere."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastcifar.errors import DataError, FastCifarError, first_line
from fastcifar.textfiles import RUN_FILE_BYTES, read_text
from fastcifar.typed_toml import short

FIGURES_DIR = "figures"  # a fold's figures, beside its result.json
CHECKPOINTS_DIR = "checkpoints"  # a fold's last.pt (resume) and best.pt (eval, export, predict, figures)
# The figures a finished fold writes into FIGURES_DIR (fastcifar.artifacts), in the order report.md shows them;
# gradcam.png only for a model with a conv layer.
FIGURE_FILES = {"curves": "curves.png", "confusion": "confusion.png", "samples": "samples.png",
                "predictions": "predictions.png", "mistakes": "mistakes.png", "gradcam": "gradcam.png"}


def checkpoint_path(fold_dir: Path, which: Literal["last", "best"]) -> Path:
    """FOLD_DIR/checkpoints/{last,best}.pt: where train writes them and resume and the figures read them."""
    return Path(fold_dir) / CHECKPOINTS_DIR / f"{which}.pt"


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


def read_run_text(path: Path, error: type[FastCifarError] = ReportError, errors: str = "strict") -> str | None:
    """A run file's text, None when it does not exist; a FIFO, device, folder, a file over 64 MiB or one that
    is not UTF-8 is one `error` line (fastcifar.textfiles)."""
    try:
        return read_text(path, "run file", RUN_FILE_BYTES, error, errors)
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_json(path: Path, error: type[FastCifarError] = ReportError) -> dict[str, Any] | None:
    """A run's JSON object file, None when it does not exist; anything but a JSON object is one `error` line."""
    text = read_run_text(path, error)
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise error(f"{path}: corrupt JSON ({first_line(e)[:120]})") from None
    except RecursionError:
        raise error(f"{path}: corrupt JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: corrupt JSON (expected an object, got {type(obj).__name__})")
    return obj


# What the run's summary, its fold table and a sweep compute with: numbers where present (val_acc and val_loss
# always are); the last five may also be null (no test set, no peak memory on this device).
RESULT_NUMBERS = ("val_acc", "val_loss", "best_epoch", "train_time_s")
OPTIONAL_NUMBERS = ("test_acc", "test_loss", "peak_memory_mb", "inference_ms_per_image", "params")


def read_result(path: Path, fold: int) -> dict[str, Any]:
    """A finished fold's result.json as `train --resume` keeps it: the fold's own, with numbers where the run's
    summary, fold table and a sweep compute with them (a damaged value raised TypeError / ValueError there)."""
    result = read_json(path) or {}

    def check(ok: bool, key: str, expected: str) -> None:
        if not ok:
            got = short(result.get(key)) if key in result else "missing"
            raise ReportError(f"{path}: {key} is {got}, expected {expected}; delete the file and resume to "
                              f"evaluate fold {fold} again")

    check(result.get("fold") == fold and type(result.get("fold")) is int, "fold", str(fold))
    for key in RESULT_NUMBERS + OPTIONAL_NUMBERS:
        value = num(result.get(key))
        absent = key not in result and key not in ("val_acc", "val_loss")
        check(value is not None or absent or (key in OPTIONAL_NUMBERS and result[key] is None), key, "a number")
        check(value is None or not key.endswith("_acc") or 0.0 <= value <= 1.0, key, "an accuracy in [0, 1]")
    return result


def trained_on(run_dir: Path) -> dict[str, Any]:
    """What a run was trained on (data.json; for a run from before it, the store hashes env.json recorded), for
    the resume check; {} when neither file exists. A damaged one is a DataError line: a resume must not go on
    unchecked, nor compare values of the wrong type."""
    data = read_json(run_dir / "data.json", DataError)
    if data is None:
        env = read_json(run_dir / "env.json", DataError)
        if env is None or dig(env, "store", "sha256") is None:
            return {}
        path, data = run_dir / "env.json", {"sha256": dig(env, "store", "sha256")}
    else:
        path = run_dir / "data.json"
    kinds = {"store": (str, None), "classes": (list, str), "image_shape": (list, int), "sha256": (dict, str)}
    for key, (outer, inner) in kinds.items():
        value = data.get(key)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        if key in data and not (isinstance(value, outer) and all(type(v) is inner for v in items)):
            raise DataError(f"{path}: {key} is {short(value)}, expected a {outer.__name__}"
                            + (f" of {inner.__name__}" if inner else ""))
    return data


def _read_csv(path: Path) -> list[dict[str, float | None]]:
    text = read_run_text(path)
    if text is None:
        return []
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
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
    summary = read_json(run_dir / "summary.json") or {}
    listed = summary.get("folds") if isinstance(summary.get("folds"), list) else []
    from_summary = {num(r.get("fold")): r for r in listed if isinstance(r, dict)}
    dirs = _fold_dirs(run_dir)
    kfold = bool(dirs)
    if not dirs and ((run_dir / "result.json").is_file() or (run_dir / "metrics.csv").is_file()):
        dirs = [(0, run_dir)]
    folds = []
    for index, d in dirs:
        result = read_json(d / "result.json") or from_summary.get(index, {})
        folds.append(FoldFiles(int(num(result.get("fold")) or index), d, result, _read_csv(d / "metrics.csv")))
    if not folds:  # a summary without its fold files still tells the headline numbers
        folds = [FoldFiles(i, run_dir, r, []) for i, r in enumerate(from_summary.values())]
        kfold = len(folds) > 1
    if not folds:
        raise not_run
    recipe_path = run_dir / "recipe.toml"
    recipe_text = read_run_text(recipe_path, errors="replace")
    name = summary.get("recipe")
    if not isinstance(name, str) and recipe_text:
        m = re.search(r'^name\s*=\s*"([^"]*)"', recipe_text, re.M)
        name = m.group(1) if m else None
    return RunFiles(run_dir, name if isinstance(name, str) else run_dir.resolve().name,
                    read_json(run_dir / "env.json") or {}, summary, recipe_text, folds, kfold)
