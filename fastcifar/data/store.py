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
from typing import Any, Callable, Iterator

import numpy as np

from fastcifar.atomic import current_umask, fsync_dir, write_json, write_with
from fastcifar.data.archive import check_regular, one_line, read_tree
from fastcifar.data.images import PREPROCESS
from fastcifar.data.readers import Dataset, ReadOptions, read_dataset, wanted
from fastcifar.data.sources import file_digest, source_sha256
from fastcifar.errors import DataError, DiskFullError
from fastcifar.lifecycle import signals_deferred
from fastcifar.ownership import MARKERS, NotOurs, clean_stale_temp_dirs, is_empty_dir, shown, write_marker

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


STORE_FILES = frozenset({*(f"{n}.npy" for n in ARRAYS), META, MARKERS["store"]})


def prepare_store(source: Path, out: Path, *, force: bool = False, log: Callable[[str], Any] = print,
                  options: ReadOptions = ReadOptions()) -> dict:
    """Build the store at `out` from `source`; a no-op if `out` already holds a valid store of the same source.

    `out` may be new, an empty folder, or a fastcifar store (`force` replaces one of another source); anything
    else, the source itself or a folder holding it included, is refused before anything is read or written."""
    source, out = Path(source).expanduser().resolve(), Path(out).expanduser()
    real_out = out.resolve()  # a symlinked store folder is replaced where it lives; the link stays
    if not source.exists():
        raise DataError(f"{source}: source does not exist")
    check_regular(source, "source")
    _check_not_source(source, real_out, out)
    clean_stale_temp_dirs(real_out, log)
    src_hash = source_sha256(source)
    src_meta = {"path": str(source), "sha256": src_hash, "options": options.as_dict()}
    existing = _existing_store(real_out, out, src_meta, force)
    if existing is not None:
        log(f"{out}: up to date (prepared from {source})")
        return existing
    log(f"reading {source}")
    data = read_dataset(read_tree(source, wanted), options)  # refuses one class, empty classes (data.checks)
    for note in data.notes:
        log(note)
    real_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real_out.name}.tmp-{os.getpid()}-", dir=real_out.parent))
    try:
        write_marker(tmp, "store")  # first: a killed prepare's temp folder is then recognisably ours
        meta = _write_store(tmp, data, {**src_meta, "kind": data.kind})
        with signals_deferred():
            _swap_in(tmp, real_out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n, m = meta["counts"]["train"], meta["counts"]["test"]
    log(f"wrote {out}: {n} train + {m} test images, {len(meta['classes'])} classes, {data.kind}")
    return meta


def _check_not_source(source: Path, real_out: Path, out: Path) -> None:
    """Replacing the source (or a folder holding it) would delete the data; writing inside it changes it."""
    if real_out == source or real_out in source.parents:
        raise NotOurs(f"{out}: is the source or a folder holding it ({source}); choose another --out")
    if source in real_out.parents:
        raise NotOurs(f"{out}: is inside the source folder {source}; choose an --out outside it")


def is_store_dir(path: Path) -> bool:
    """fastcifar's own store: its marker (or, from before markers, its meta.json) and nothing but store files."""
    names = {p.name for p in path.iterdir()}
    return names <= STORE_FILES and bool(names & {MARKERS["store"], META}) and \
        all((path / n).is_file() and not (path / n).is_symlink() for n in names)


def _existing_store(real_out: Path, out: Path, src_meta: dict, force: bool) -> dict | None:
    """Meta of a valid store of this same source (and options) at `out`; None if `out` is free or may be
    replaced."""
    if not real_out.exists():
        return None
    if not real_out.is_dir():
        raise NotOurs(f"{out}: exists and is not a directory; choose another --out (fastcifar replaces only its "
                      "own stores)")
    if is_empty_dir(real_out):
        return None  # an empty directory holds nothing worth protecting; _swap_in replaces it
    if not is_store_dir(real_out):
        raise NotOurs(f"{out}: holds files fastcifar did not write ({shown(real_out, skip=STORE_FILES)}); not replacing it, even "
                      "with --force; choose another --out")
    try:
        meta = verify_store(real_out)
    except DataError:
        meta = None
    source = meta.get("source", {}) if meta is not None else {}
    same_options = source.get("options", ReadOptions().as_dict()) == src_meta["options"]
    if source.get("sha256") == src_meta["sha256"] and same_options:
        return meta
    if not force:
        what = "other prepare options" if source.get("sha256") == src_meta["sha256"] else "another source"
        raise DataError(f"{out}: holds a fastcifar store of {what} (or a damaged one); pass --force to replace it")
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
        with _disk_full_names(path):
            write_with(path, lambda f, a=arr: np.save(_WriteOnly(f), a, allow_pickle=False))
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
        "preprocess": PREPROCESS,  # how an image file becomes one of these (predict applies the same)
        "stats": channel_stats(data.train_images),
        "dtypes": {n: a.dtype.str for n, a in arrays.items()},
        "sha256": sha,
        "source": source_meta,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with _disk_full_names(tmp / META):
        write_json(tmp / META, meta)
    _apply_umask(tmp)
    return meta


class _WriteOnly:
    """A file seen through write() alone: np.save then writes in chunks with write(), whose OSError keeps its
    errno (ENOSPC), instead of ndarray.tofile, whose '614400 requested and 237440 written' has none."""

    def __init__(self, f) -> None:
        self.write = f.write


@contextlib.contextmanager
def _disk_full_names(path: Path) -> Iterator[None]:
    """A full disk while writing the new store: one line naming the file and what is left (prepare_store removes
    the temp folder on the way out; a store already at --out was never touched)."""
    try:
        yield
    except DiskFullError:
        raise DiskFullError(f"{path}: disk full while writing the new store; its temp folder is removed and any "
                            "store already at --out is unchanged; free some space and run prepare again") from None


def _apply_umask(tmp: Path) -> None:
    """mkdtemp creates 0700; give the finished store the permissions a plain mkdir would (files written by
    atomic_open already have a plain open()'s mode)."""
    os.chmod(tmp, 0o777 & ~current_umask())


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir onto `out`; an old store is moved aside first and deleted only afterwards."""
    old: Path | None = None
    if out.exists():
        write_marker(out, "store")  # a store from before markers: a killed swap's leftover must be recognisable
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        old.rmdir()  # mkdtemp only reserved a unique name; rename needs it absent
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)  # put the previous store back: never leave `out` empty-handed
        raise
    fsync_dir(out.parent)
    if old is not None:  # a checked fastcifar store (is_store_dir), moved aside above
        shutil.rmtree(old, ignore_errors=True)


def channel_stats(images: np.ndarray, chunk_values: int = 2**22) -> dict[str, list[float]]:
    """Per-channel mean and std of uint8 (N, H, W, C) images in [0, 1] units (what data.mean / data.std take),
    accumulated in float64 chunk by chunk of at most `chunk_values` pixel values (32 MiB as float64): a chunk
    counted in images made 80 images at --size 1024 a 1.5 GiB float array, twice."""
    total = np.zeros(images.shape[-1]) if images.ndim == 4 else np.zeros(3)
    squares, count = total.copy(), 0
    chunk = max(1, chunk_values // max(1, int(np.prod(images.shape[1:]))))
    for start in range(0, len(images), chunk):
        x = np.asarray(images[start:start + chunk], dtype=np.float64).reshape(-1, images.shape[-1]) / 255.0
        total += x.sum(0)
        squares += (x * x).sum(0)
        count += len(x)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean * mean, 0.0))
    return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}


def store_stats(store: "Store") -> dict[str, list[float]]:
    """The store's training mean / std: recorded at prepare time, or computed now for a store from before."""
    stats = store.meta.get("stats")
    ok = isinstance(stats, dict) and all(isinstance(stats.get(k), list) and len(stats[k]) == 3 and
                                         all(isinstance(v, (int, float)) for v in stats[k]) for k in ("mean", "std"))
    return stats if ok else channel_stats(store.train_images)


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
            # what `prepare` prints: _open_arrays holds the shapes to the arrays, the counts are held to the shapes
            and all(type(meta["counts"][s]) is int and meta["counts"][s] == meta["shapes"][f"{s}_labels"][0]
                    for s in ("train", "test"))
            and meta.get("preprocess", PREPROCESS) == PREPROCESS  # stores from before record none: the same rule
        )
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise DataError(f"{meta_path}: bad store metadata (missing or malformed classes/counts/shapes/dtypes/sha256, "
                        f"or a preprocess other than {PREPROCESS!r})")
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
