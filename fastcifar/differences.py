"""`fastcifar report A B`: how the runs' recipes differ, from the recipe.toml each run saved (torch-free)."""

from __future__ import annotations

import sys
from typing import Any

from fastcifar.typed_toml import toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DASH = "–"


def _recipe_keys(text: str | None) -> dict[str, Any] | None:
    """A saved recipe.toml as dotted key -> value; None when it is missing or not TOML (run files are untrusted:
    a damaged one is reported, not raised)."""
    if text is None:
        return None
    try:
        table = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError):
        return None
    flat: dict[str, Any] = {}
    for key, value in table.items():
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return flat


def _value(v: Any) -> str:
    try:
        return f"`{toml_value(v)}`"
    except TypeError:  # an inline table: not a key fastcifar writes, shown as it came
        return f"`{v!r}`"


def differing_keys(recipe_texts: list[str | None]) -> tuple[list[int], list[tuple[str, list[str]]]]:
    """(indices of the recipes missing or unreadable, [(key, its value in each readable recipe)]) for every key
    whose value is not the same in all of them (absent counts as a value), in the first recipe's key order."""
    tables = [_recipe_keys(t) for t in recipe_texts]
    broken = [i for i, t in enumerate(tables) if t is None]
    kept = [t for t in tables if t is not None]
    keys = list(dict.fromkeys(k for t in kept for k in t))
    values = [(k, [_value(t[k]) if k in t else DASH for t in kept]) for k in keys]
    return broken, [(k, v) for k, v in values if len(set(v)) > 1]
