"""The prepared store: four .npy arrays plus meta.json, written all-or-nothing and memory-mapped for training.

Building happens in a temp dir beside `out` that is renamed into place only when complete, so a crash or a bad
source never leaves a half-written store that a later run could mistake for a good one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fastcifar.atomic import current_umask, fsync_dir, write_json, write_with
from fastcifar.data.archive import check_regular, one_line, read_tree
from fastcifar.data.images import PREPROCESS
from fastcifar.data.readers import Dataset, ReadOptions, read_dataset, wanted
from fastcifar.data.sources import file_digest, source_sha256
from fastcifar.errors import DataError, DiskFullError
from fastcifar.lifecycle import signals_deferred, writer_lock
from fastcifar.ownership import (MARKERS, NotOurs, clean_stale_temp_dirs, has_marker, is_empty_dir, marker, shown,
                                 write_marker)

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

    @cached_property
    def labels(self) -> np.ndarray:
        """Every row's label, train then test: the global index order of fastcifar.splits and the .beton."""
        return np.concatenate([self.train_labels, self.test_labels])


STORE_FILES = frozenset({*(f"{n}.npy" for n in ARRAYS), META, MARKERS["store"]})


def prepare_store(source: Path, out: Path, *, force: bool = False, log: Callable[[str], Any] = print,
                  options: ReadOptions = ReadOptions()) -> dict:
    """Build the store at `out` from `source`; a no-op if `out` already holds a valid store of the same source.

    `out` may be new, an empty folder, or a fastcifar store (`force` replaces one of another source); anything
    else, the source itself or a folder holding it included, is refused before anything is read or written.
    One prepare writes a store at a time (StoreLock), and what `out` holds is checked again at the swap: a folder
    that appeared or changed there while the source was read is never replaced."""
    source, out = Path(source).expanduser().resolve(), Path(out).expanduser()
    real_out = out.resolve()  # a symlinked store folder is replaced where it lives; the link stays
    if not source.exists():
        raise DataError(f"{source}: source does not exist")
    check_regular(source, "source")
    _check_not_source(source, real_out, out)
    created = _missing_parents(real_out)
    try:
        with writer_lock(real_out, "another fastcifar prepare", out):
            return _prepare_locked(source, real_out, out, force, log, options)
    except BaseException:
        for d in created:  # folders this prepare made for its lock, if nothing else landed in them
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _prepare_locked(source: Path, real_out: Path, out: Path, force: bool, log: Callable[[str], Any],
                    options: ReadOptions) -> dict:
    clean_stale_temp_dirs(real_out, log)
    src_hash = source_sha256(source)
    src_meta = {"path": str(source), "sha256": src_hash, "options": options.as_dict()}
    expected = out_state(real_out)  # what the swap may replace: checked again there
    existing = _existing_store(real_out, out, src_meta, force)
    if existing is not None:
        log(f"{out}: up to date (prepared from {source})")
        return existing
    log(f"reading {source}")
    data = read_dataset(read_tree(source, wanted), options)  # refuses one class, empty classes (data.checks)
    for note in data.notes:
        log(note)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real_out.name}.tmp-{os.getpid()}-", dir=real_out.parent))
    try:
        with _disk_full_names(out):  # the first file: name what the user asked for, not the temp folder
            write_marker(tmp, "store")  # first: a killed prepare's temp folder is then recognisably ours
        meta = _write_store(tmp, data, {**src_meta, "kind": data.kind})
        with signals_deferred():
            old = _swap_in(tmp, real_out, out, expected)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temp folder (mkdtemp's unique name, our marker)
        raise
    if old is not None:
        _remove_old_store(old, log)
    n, m = meta["counts"]["train"], meta["counts"]["test"]
    log(f"wrote {out}: {n} train + {m} test images, {len(meta['classes'])} classes, {data.kind}")
    return meta


def _missing_parents(path: Path) -> list[Path]:
    """Create the folders above `path` that do not exist yet; returns them, deepest first."""
    missing = [p for p in path.parents if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


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
        raise NotOurs(f"{out}: holds files fastcifar did not write ({shown(real_out, skip=STORE_FILES)}); not "
                      "replacing it, even with --force; choose another --out")
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


ABSENT, EMPTY = "absent", "empty"


def out_state(real_out: Path) -> Any:
    """What is at `out` now, as much as decides whether it may be replaced: ABSENT, EMPTY (a folder), a store's
    identity (its folder, file names and meta.json), or "other" (anything else, never replaced)."""
    if not real_out.exists() and not real_out.is_symlink():
        return ABSENT
    if real_out.is_symlink() or not real_out.is_dir():
        return "other"
    if is_empty_dir(real_out):
        return EMPTY
    if not is_store_dir(real_out):
        return "other"
    st = real_out.stat()
    names = tuple(sorted(p.name for p in real_out.iterdir()))
    meta = real_out / META
    return (st.st_dev, st.st_ino, names, meta.stat().st_mtime_ns if meta.exists() else None)


def _replaceable(path: Path) -> bool:
    return is_empty_dir(path) or is_store_dir(path)


def _swap_in(tmp: Path, out: Path, shown_out: Path, expected: Any) -> Path | None:
    """Rename the finished temp dir onto `out`. What is at `out` must still be what the start checked (nothing,
    an empty folder, or that same store); an old store or empty folder is moved aside, checked again where it
    now lies (nobody can add to it there by its old name), and returned to be deleted. Anything else is put
    back untouched and refused."""
    now = out_state(out)
    if now != expected and not {now, expected} <= {ABSENT, EMPTY}:
        raise NotOurs(_changed(shown_out, out))
    old: Path | None = None
    if now != ABSENT:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        old.rmdir()  # mkdtemp only reserved a unique name; rename needs it absent
        os.rename(out, old)
        if not _replaceable(old):  # something landed between the check and the rename
            os.rename(old, out)
            raise NotOurs(_changed(shown_out, out))
        if is_store_dir(old) and not has_marker(old, "store"):
            write_marker(old, "store")  # a store from before markers: a killed swap's leftover is then ours
    try:
        os.rename(tmp, out)  # replaces nothing, or an empty folder made this instant (nothing lost)
    except OSError as e:
        if old is not None and not os.path.lexists(out):
            os.rename(old, out)  # put the previous store back: never leave `out` empty-handed
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise NotOurs(_changed(shown_out, out)) from None
        raise
    fsync_dir(out.parent)
    return old


def _changed(shown_out: Path, out: Path) -> str:
    now = f"holds {shown(out, skip=STORE_FILES)}" if out.is_dir() and not is_empty_dir(out) else "is something else"
    return (f"{shown_out}: changed while prepare was reading the source (it now {now}); not replacing it, and the "
            "new store was not written; choose another --out or run prepare again")


def _remove_old_store(old: Path, log: Callable[[str], Any]) -> None:
    """Delete a replaced store moved aside by _swap_in: its own files by name (the marker last), then the folder
    if that left it empty. Anything else found there is left, with a line saying where."""
    names = {p.name for p in old.iterdir()}
    for name in sorted(names & STORE_FILES - {MARKERS["store"]}):
        path = old / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
    if {p.name for p in old.iterdir()} <= {MARKERS["store"]}:
        marker(old, "store").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            old.rmdir()
    if old.exists():
        log(f"left {old}: the store it replaced held files fastcifar did not write ({shown(old)})")


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
