"""The prepared store: four .npy arrays plus meta.json, written all-or-nothing and memory-mapped for training.

Building happens in a temp dir beside `out` that is renamed into place only when complete, so a crash or a bad
source never leaves a half-written store that a later run could mistake for a good one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fastcifar.atomic import current_umask, fsync_dir, write_json, write_with
from fastcifar.data.archive import one_line, read_tree
from fastcifar.data.readers import Dataset, read_dataset
from fastcifar.data.sources import file_digest, source_sha256
from fastcifar.errors import DataError

FORMAT_VERSION = 1
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
META = "meta.json"


@dataclass(frozen=True)
class Store:
    path: Path
    classes: tuple[str, ...]
    train_images: np.ndarray  # uint8 (N, H, W, 3), read-only memory map
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    meta: dict


def prepare_store(source: Path, out: Path, *, force: bool = False, log: Callable[[str], Any] = print) -> dict:
    """Build the store at `out` from `source`; a no-op if `out` already holds a valid store of the same source."""
    source, out = Path(source).expanduser().resolve(), Path(out).expanduser()
    if not source.exists():
        raise DataError(f"{source}: source does not exist")
    src_hash = source_sha256(source)
    existing = _existing_store(out, src_hash, force)
    if existing is not None:
        log(f"{out}: up to date (prepared from {source})")
        return existing
    log(f"reading {source}")
    data = read_dataset(read_tree(source))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = _write_store(tmp, data, {"path": str(source), "kind": data.kind, "sha256": src_hash})
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n, m = meta["counts"]["train"], meta["counts"]["test"]
    log(f"wrote {out}: {n} train + {m} test images, {len(meta['classes'])} classes, {data.kind}")
    return meta


def _existing_store(out: Path, src_hash: str, force: bool) -> dict | None:
    """Meta of a valid store of this same source at `out`; None if `out` is free or may be replaced."""
    if not out.exists() and not out.is_symlink():
        return None
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return None  # an empty directory holds nothing worth protecting; _swap_in replaces it
    try:
        meta = verify_store(out)
    except DataError:
        meta = None
    if meta is not None and meta.get("source", {}).get("sha256") == src_hash:
        return meta
    if not force:
        raise DataError(f"{out}: exists and holds something else; pass --force to replace it")
    return None


def _write_store(tmp: Path, data: Dataset, source_meta: dict) -> dict:
    arrays = {
        "train_images": data.train_images,
        "train_labels": data.train_labels.astype(np.int64, copy=False),
        "test_images": data.test_images,
        "test_labels": data.test_labels.astype(np.int64, copy=False),
    }
    sha = {}
    for name, arr in arrays.items():
        path = tmp / f"{name}.npy"
        write_with(path, lambda f, a=arr: np.save(f, a, allow_pickle=False))
        sha[path.name] = file_digest(path)
    k = len(data.classes)
    meta = {
        "format_version": FORMAT_VERSION,
        "classes": list(data.classes),
        "counts": {"train": len(data.train_labels), "test": len(data.test_labels)},
        "class_counts": {
            "train": np.bincount(data.train_labels, minlength=k).tolist(),
            "test": np.bincount(data.test_labels, minlength=k).tolist(),
        },
        "shapes": {n: list(a.shape) for n, a in arrays.items()},
        "dtypes": {n: a.dtype.str for n, a in arrays.items()},
        "sha256": sha,
        "source": source_meta,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(tmp / META, meta)
    _apply_umask(tmp)
    return meta


def _apply_umask(tmp: Path) -> None:
    """mkdtemp creates 0700; give the finished store the permissions a plain mkdir would (files written by
    atomic_open already have a plain open()'s mode)."""
    os.chmod(tmp, 0o777 & ~current_umask())


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir onto `out`; an old store is moved aside first and deleted only afterwards."""
    old: Path | None = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()  # mkdtemp only reserved a unique name; rename needs it absent
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)  # put the previous store back: never leave `out` empty-handed
        raise
    fsync_dir(out.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


# --- reading ------------------------------------------------------------------------------------------------------


def _no_store(store_dir: Path) -> DataError:
    return DataError(f"{store_dir}: no prepared store here (run `fastcifar prepare --out {store_dir}`)")


def _load_meta(store_dir: Path) -> dict:
    meta_path = store_dir / META
    if not store_dir.is_dir() or not meta_path.exists():
        raise _no_store(store_dir)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: unreadable store metadata ({one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataError(f"{meta_path}: unsupported store format_version {version!r} (expected {FORMAT_VERSION})")
    try:
        ok = (
            isinstance(meta["classes"], list)
            and all(isinstance(c, str) for c in meta["classes"])
            and all(isinstance(meta["sha256"][f"{n}.npy"], str) for n in ARRAYS)
            and all(isinstance(meta["shapes"][n], list) and isinstance(meta["dtypes"][n], str) for n in ARRAYS)
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{meta_path}: bad store metadata (missing or malformed classes/shapes/dtypes/sha256)")
    return meta


def verify_store(store_dir: Path) -> dict:
    """Re-hash every array against meta.json; DataError naming the first bad file. Returns the meta."""
    store_dir = Path(store_dir)
    meta = _load_meta(store_dir)
    for name in ARRAYS:
        path = store_dir / f"{name}.npy"
        if not path.is_file():
            raise DataError(f"{path}: missing from the store (re-run `fastcifar prepare --force`)")
        got, expected = file_digest(path), meta["sha256"][path.name]
        if got != expected:
            raise DataError(
                f"{path}: sha256 mismatch (got {got}, expected {expected}); the store is corrupt, "
                "re-run `fastcifar prepare --force`"
            )
    _open_arrays(store_dir, meta)  # hashes match what was written, but also hold meta to its shapes
    return meta


def _open_arrays(store_dir: Path, meta: dict) -> dict[str, np.ndarray]:
    """Open the arrays (images as read-only mmaps) and check them against meta without hashing."""
    arrays: dict[str, np.ndarray] = {}
    for name in ARRAYS:
        path = store_dir / f"{name}.npy"
        if not path.is_file():
            raise DataError(f"{path}: missing from the store (re-run `fastcifar prepare --force`)")
        try:
            # Labels are tiny: load them into (writable) memory; images stay on disk behind a memory map.
            arr = np.load(path, mmap_mode="r" if name.endswith("images") else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: truncated or corrupt array ({one_line(e)})") from None
        want_shape, want_dtype = tuple(meta["shapes"][name]), meta["dtypes"][name]
        if arr.shape != want_shape or arr.dtype.str != want_dtype:
            raise DataError(
                f"{path}: is {arr.dtype.str} {list(arr.shape)} but meta.json says {want_dtype} {list(want_shape)}"
            )
        arrays[name] = arr
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        path = store_dir / f"{split}_labels.npy"
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or labels.dtype != np.int64:
            raise DataError(f"{store_dir / f'{split}_images.npy'}: expected uint8 (N, H, W, 3) images")
        if labels.shape != (len(images),):
            raise DataError(f"{path}: {len(labels)} labels for {len(images)} images")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(meta["classes"])):
            raise DataError(f"{path}: label out of range [0, {len(meta['classes'])})")
    return arrays


def open_store(store_dir: Path, verify: bool = False) -> Store:
    """Open a prepared store; `verify=True` also re-hashes every array (slower, catches silent corruption)."""
    store_dir = Path(store_dir)
    meta = verify_store(store_dir) if verify else _load_meta(store_dir)
    arrays = _open_arrays(store_dir, meta)
    return Store(path=store_dir, classes=tuple(meta["classes"]), meta=meta, **arrays)
