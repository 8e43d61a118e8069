"""`--compare OTHER.json`: rows of two bench results side by side, matched on their configuration, with ratios
this/other (a hardware or software comparison: the same cells on two machines or two commits)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastcifar.errors import DataError
from fastcifar.textfiles import RUN_FILE_BYTES, read_text

if TYPE_CHECKING:
    from rich.console import Console

KEYS = {
    "model": ("model", "image_size", "augment", "precision", "batch", "compile", "channels_last"),
    "loader": ("loader", "preset", "batch"),
}
METRICS = {
    "model": ("train_img_s", "model_only_img_s", "infer_img_s", "lat_b1_p50_ms", "lat_serve_p50_ms", "peak_mem_mb",
              "energy_j_per_1k_img", "seeds_train_img_s"),
    "loader": ("img_s",),
}


def load_result(path: str | Path, what: str = "model") -> dict[str, Any]:
    """A bench JSON file, checked enough that a wrong file is one clear line rather than a KeyError later.

    A device-suite file holds both benches; `what` picks the part ("model" or "loader")."""
    path = Path(path)
    try:
        data = json.loads(read_text(path, "bench result", RUN_FILE_BYTES, DataError))  # no FIFO, no /dev/zero
    except FileNotFoundError:
        raise DataError(f"{path}: bench result file not found") from None
    except (OSError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path}: not a bench result (not readable JSON: {e})") from None
    if isinstance(data, dict) and data.get("kind") == "fastcifar-bench-suite":
        data = data.get(what)
    ok = (isinstance(data, dict) and data.get("kind") == "fastcifar-bench" and data.get("what") in KEYS
          and isinstance(data.get("rows"), list) and isinstance(data.get("environment"), dict))
    if not ok:
        raise DataError(f"{path}: not a fastcifar bench result (expected the JSON written by `fastcifar bench "
                        f"--json`, with kind = 'fastcifar-bench')")
    return data


def _key(row: dict[str, Any], what: str) -> tuple:
    return tuple(row.get(k) for k in KEYS[what])


def compare(this: dict[str, Any], other: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (matching row, metric present in both): key, this, other, ratio this/other."""
    what = this["what"]
    if other["what"] != what:
        raise DataError(f"cannot compare a {what} bench with a {other['what']} bench")
    theirs = {_key(r, what): r for r in other["rows"]}
    out = []
    for row in this["rows"]:
        match = theirs.get(_key(row, what))
        if match is None:
            continue
        for metric in METRICS[what]:
            a, b = row.get(metric), match.get(metric)
            if a is None or b is None:
                continue
            out.append({"key": dict(zip(KEYS[what], _key(row, what))), "metric": metric, "this": a, "other": b,
                        "ratio": a / b if b else None})
    return out


def differing_settings(this: dict[str, Any], other: dict[str, Any]) -> str:
    """Which configuration keys keep two results' rows apart, e.g. "batch 64 vs 256; augment crop+flip vs
    recipe:quickstart" (values of each side, as in their rows)."""
    what = this["what"]

    def values(result: dict[str, Any], key: str) -> list[str]:
        return sorted({_text(r.get(key)) for r in result["rows"]})

    parts = [f"{k} {', '.join(values(this, k))} vs {', '.join(values(other, k))}" for k in KEYS[what]
             if values(this, k) != values(other, k)]
    return "; ".join(parts) or "no single setting (the combinations differ)"


def _text(v: Any) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def _label(key: dict[str, Any]) -> str:
    parts = []
    for k, v in key.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'on' if v else 'off'}")
        elif k in ("model", "loader", "preset", "precision"):
            parts.append(str(v))
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def print_comparison(this: dict[str, Any], other: dict[str, Any], console: Console, this_name: str = "this",
                     other_name: str = "other") -> list[dict[str, Any]]:
    from rich.table import Table

    from fastcifar.bench.table import env_line, widen

    widen(console)
    from rich.markup import escape

    pairs = compare(this, other)
    console.print(escape(f"{this_name}: {env_line(this['environment'])}"))
    console.print(escape(f"{other_name}: {env_line(other['environment'])}"))
    table = Table(title=f"{this_name} vs {other_name} (ratio = {this_name} / {other_name}; for latency, "
                        "memory and energy lower is better)", title_justify="left")
    for h in ("configuration", "metric", this_name, other_name, "ratio"):
        table.add_column(h, overflow="fold")
    for p in pairs:
        table.add_row(escape(_label(p["key"])), p["metric"], f"{p['this']:,.4g}", f"{p['other']:,.4g}",
                      "–" if p["ratio"] is None else f"{p['ratio']:.2f}x")
    if not pairs:  # say which settings differ, so the fix (e.g. --recipe, --batch) is one look away
        console.print(escape(f"no matching rows: {this_name} and {other_name} were measured with other settings: "
                             f"{differing_settings(this, other)}; rerun with the other file's settings"))
    else:
        console.print(table)
    return pairs
