"""Checkpoints: written atomically, read back only through weights-only unpickling and range-checked
(fastcifar.fields)."""

from __future__ import annotations

import copy
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from fastcifar.atomic import write_with
from fastcifar.errors import CheckpointError, first_line
from fastcifar.fields import check_fields

FORMAT = "fastcifar-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "version": VERSION, **_compact(payload)}
    write_with(path, lambda f: torch.save(payload, f))


def _compact(obj: Any) -> Any:
    """torch.save writes a tensor's whole storage: a tensor that views part of a larger one (a packed fold's
    BatchNorm statistics, fastcifar.pack) is saved as its own copy, so the file holds what the fold has."""
    if isinstance(obj, torch.Tensor):
        own = obj.untyped_storage().nbytes() == obj.numel() * obj.element_size()
        return obj if own or obj.numel() == 0 else obj.detach().clone()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps a state_dict's _metadata (module versions: load_state_dict reads them)
        for k, v in obj.items():
            out[k] = _compact(v)
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_compact(v) for v in obj)
    return obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with weights_only=True, so a checkpoint that pickles code is refused instead of run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # a corrupt file also makes torch warn; the one-line error says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text is a page of advice, including to turn weights-only loading off: keep only what it found.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f": global {found.group(1)}" if found else ""
        raise CheckpointError(f"{path}: refused by weights-only loading (it holds objects other than tensors and "
                              f"plain containers{what})") from None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes make torch.load raise almost anything (fuzz-tested)
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first_line(e)})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastcifar checkpoint (expected a dict with format={FORMAT!r})")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {obj.get('version')!r}, this fastcifar reads {VERSION}")
    check_fields(obj, path)  # every field it holds, range-checked before anyone builds or allocates from it
    return obj
