"""Range checks for every field fastcifar reads back from its own binary files: checkpoints (best.pt, last.pt)
and the metadata of an export. Weights-only loading keeps code out, but a file that loads can still hold
absurd values (image_size 100000 made export allocate 240 GB; -5 made predict report "out of memory"); here
each field is checked once, in one place, and a bad one is one line naming the file and the field.

Fields a file does not hold are not checked here: the reader that needs one says it is missing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from fastcifar.data.images import MAX_SIDE, MIN_SIDE, PREPROCESS
from fastcifar.errors import CheckpointError

MAX_CLASSES = 100_000  # a classifier head's rows: ImageNet-21k has 21,841 classes
MAX_NAME = 200  # characters of one class name
MAX_EPOCHS = 10**6  # no run here trains a million epochs; recipe_sections.py bounds train.epochs far below
MAX_FOLDS = 1000


def _int(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"must be an integer in [{lo}, {hi}]"
    return check


def _number(lo: float = 0.0) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= lo
        return None if ok else f"must be a finite number >= {lo:g}"
    return check


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda v: None if v is None else check(v)


def _dict(v: Any) -> str | None:
    return None if isinstance(v, dict) else "must be a table (dict)"


def _optional_dict(v: Any) -> str | None:
    return None if v is None else _dict(v)


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _classes(v: Any) -> str | None:
    if not isinstance(v, (list, tuple)) or not 2 <= len(v) <= MAX_CLASSES:
        return f"must be a list of 2 to {MAX_CLASSES:,} class names"
    if not all(isinstance(c, str) and 0 < len(c) <= MAX_NAME for c in v):
        return f"must hold class names as strings of 1 to {MAX_NAME} characters"
    if len(set(v)) != len(v):
        return "holds a class name twice"
    return None


def _preprocess(v: Any) -> str | None:
    return None if v == PREPROCESS else f"must be {PREPROCESS!r} (the only image preprocessing this fastcifar has)"


def _weights(v: Any) -> str | None:
    return None if isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                               for k, t in v.items()) else "must map parameter names to tensors"


def _byte_tensor(v: Any) -> str | None:
    ok = isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1
    return None if ok else "must be a 1-D uint8 tensor (a generator state)"


def _index_tensor(v: Any) -> str | None:
    ok = v is None or (isinstance(v, torch.Tensor) and v.dtype == torch.int64 and v.dim() == 1)
    return None if ok else "must be a 1-D int64 tensor of image indices"


def _scalar_tensor(v: Any) -> str | None:
    return None if isinstance(v, torch.Tensor) and v.numel() == 1 else "must be a one-element tensor"


def _history(v: Any) -> str | None:
    return None if isinstance(v, list) and all(isinstance(r, dict) for r in v) else "must be a list of tables"


# What a fastcifar file may hold at its top level (checkpoints and export metadata share the first four).
TOP: dict[str, Callable[[Any], str | None]] = {
    "classes": _classes, "image_size": _int(MIN_SIDE, MAX_SIDE), "preprocess": _preprocess, "recipe": _dict,
    "fold": _int(0, MAX_FOLDS), "model": _weights, "epoch": _int(0, MAX_EPOCHS), "metrics": _dict,
    "weights": lambda v: None if v in ("ema", "model") else "must be 'ema' or 'model'",
    "stage": _int(1, 2), "skipped_total": _int(0, 2**62), "optimizer": _optional_dict,
    "scheduler": _optional_dict, "scaler": _optional_dict, "ema": _optional_dict, "lookahead": _optional_dict,
    "loader": _optional_dict, "partial": _optional_dict, "state": _dict, "torch_rng": _byte_tensor,
    "cuda_rng": _optional(_byte_tensor),
}
# last.pt's "state" (fastcifar.state.PROGRESS), its loader's position and a mid-epoch checkpoint's totals.
NESTED: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "state": {"epoch": _int(0, MAX_EPOCHS), "history": _history, "best_metric": _optional(_number(-math.inf)),
              "best_epoch": _int(0, MAX_EPOCHS), "bad_epochs": _int(0, MAX_EPOCHS), "stopped_early": _bool,
              "accum_steps": _int(1, 2**20), "compile_time_s": _number()},
    "loader": {"generator": _byte_tensor, "order": _index_tensor, "pos": _int(0, 2**62),
               "epoch": _int(0, MAX_EPOCHS)},
    "partial": {"seen": _int(0, 2**62), "skipped": _int(0, 2**62), "lr": _number(), "seconds": _number(),
                "warmup_seen": _int(0, 2**62), "warmup_s": _number(),
                "loss_sum": _scalar_tensor, "correct": _scalar_tensor},
}


def shown(v: Any) -> str:
    """A value for an error line: short, whatever it is."""
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    text = repr(v)
    return text if len(text) <= 60 else text[:59] + "…"


def check_fields(obj: dict[str, Any], path: str | Path, only: tuple[str, ...] | None = None) -> None:
    """CheckpointError '<path>: <field>: <what it must be>, got <value>' for the first field out of range;
    `only`: the fields to look at (an export's metadata holds just a few of them)."""
    for key, check in TOP.items():
        if key not in obj or (only is not None and key not in only):
            continue
        _refuse(path, key, obj[key], check(obj[key]))
        if key in NESTED and obj[key] is not None:
            for sub, sub_check in NESTED[key].items():
                if sub in obj[key]:
                    _refuse(path, f"{key}.{sub}", obj[key][sub], sub_check(obj[key][sub]))


def _refuse(path: str | Path, key: str, value: Any, why: str | None) -> None:
    if why is not None:
        raise CheckpointError(f"{path}: {key}: {why}, got {shown(value)}")
