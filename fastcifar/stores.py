"""Where a store is, from any folder: a recipe's data.store (relative to the current folder, else under
$FASTCIFAR_DATA), and the store a trained run recorded (its data.json holds the absolute path since issue 24).

Recipes name their store relative to the folder they were prepared in ("data/cifar10"), which only works from
that folder; FASTCIFAR_DATA names it once (e.g. the clone: `export FASTCIFAR_DATA=~/fastcifar`) so that
`fastcifar train quickstart` works anywhere. A relative path found from the current folder always wins, so
nothing changes for someone running from the clone. Torch-free: the CLI calls it before any heavy import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastcifar.errors import DataError

DATA_ENV = "FASTCIFAR_DATA"
MAX_RUN_JSON = 2**20  # bytes: data.json / env.json of a run are a few KB; a bigger file is not one of ours


def _holds_store(path: Path) -> bool:
    """meta.json is there; open_store then checks the rest (arrays, shapes, hashes) and says what is wrong."""
    try:
        return (path / "meta.json").is_file()
    except OSError:
        return False


def _under_env(store: Path) -> Path | None:
    base = os.environ.get(DATA_ENV)
    return Path(base).expanduser() / store if base and not store.is_absolute() else None


def locate_store(store: str | Path, fix: str = "--set data.store=PATH") -> Path:
    """The absolute, resolved path of the store `store` names: as given (from the current folder), else a
    relative path under $FASTCIFAR_DATA. A DataError names both places tried and what fixes it (`fix`: the
    flag or key the user controls, then the environment variable)."""
    path = Path(store).expanduser()
    tried = [path, *filter(None, [_under_env(path)])]
    for candidate in tried:
        if _holds_store(candidate):
            return candidate.resolve()
    raise DataError(_not_found(str(store), tried, fix))


def _not_found(store: str, tried: list[Path], fix: str) -> str:
    where = f"no prepared store at {tried[0].absolute()}" + (f" or {tried[1]}" if len(tried) > 1 else "")
    env = ("" if Path(store).is_absolute() else
           f", or set {DATA_ENV} to the folder holding {store}" if DATA_ENV not in os.environ else
           f" (${DATA_ENV} = {os.environ[DATA_ENV]})")
    return (f"data.store: {where}; prepare it (fastcifar prepare --out {store}), point {fix} at a prepared "
            f"store{env}")


def _run_json(path: Path) -> dict[str, Any]:
    """A run's small JSON file, or {} when it is missing, too big or not a JSON object (run files are untrusted)."""
    try:
        if path.stat().st_size > MAX_RUN_JSON:
            return {}
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def run_of(checkpoint: Path) -> Path | None:
    """The run folder of RUN/checkpoints/X.pt or RUN/foldN/checkpoints/X.pt: the nearest one holding data.json."""
    checkpoint = checkpoint.absolute()
    for folder in checkpoint.parents[1:3]:
        if (folder / "data.json").is_file():
            return folder
    return None


def checkpoint_store(checkpoint: Path, recipe_store: str) -> Path:
    """The store a checkpoint's run was trained on, for `fastcifar eval` without --data: the path its data.json
    recorded (absolute since issue 24; older runs recorded it relative to the folder they started in, which
    env.json "cwd" names when recorded), else the recipe's data.store from here or under $FASTCIFAR_DATA."""
    run = run_of(checkpoint)
    recorded = _run_json(run / "data.json").get("store") if run else None
    cwd = _run_json(run / "env.json").get("cwd") if run else None
    tried: list[Path] = []
    for name in filter(lambda v: isinstance(v, str) and v, (recorded, recipe_store)):
        path = Path(name).expanduser()
        tried += [path] if path.is_absolute() else [*([Path(cwd) / path] if isinstance(cwd, str) else []), path]
    tried += filter(None, [_under_env(Path(recipe_store))])
    for candidate in dict.fromkeys(tried):  # in order, each once
        if _holds_store(candidate):
            return candidate.resolve()
    shown = ", ".join(str(p) for p in dict.fromkeys(tried))
    raise DataError(f"{checkpoint}: the store it was trained on is not at {shown}; pass --data STORE (a store "
                    f"prepared from the same data)" + ("" if DATA_ENV in os.environ else
                                                      f", or set {DATA_ENV} to the folder holding {recipe_store}"))
