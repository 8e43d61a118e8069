"""Turn a source Tree into arrays: CIFAR-10 / CIFAR-100 python pickles, SVHN .mat files (data.matfile), or an
image folder train/<class>/*, test/<class>/* (data.images).

Every reader validates everything it loads and raises DataError naming the offending file, because the source is
user-supplied (or downloaded) and a silent mis-read would only surface later as a nonsense accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fastcifar.data.archive import Tree
from fastcifar.data.checks import check_dataset
from fastcifar.data.images import IMAGE_EXTS, image_root, read_image_folder
from fastcifar.data.matfile import SVHN_FILES, read_svhn
from fastcifar.data.safe_pickle import safe_loads
from fastcifar.errors import DataError

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_FILES = (*CIFAR_TRAIN_BATCHES, "test_batch", "batches.meta")
CIFAR100_FILES = ("train", "test", "meta")  # inside cifar-100-python/
DATASETS = ("auto", "cifar10", "cifar100", "svhn", "folder")


@dataclass(frozen=True)
class ReadOptions:
    """What `fastcifar prepare` was asked for beyond the source: recorded in the store's meta, so a store
    prepared with other options is not mistaken for an up-to-date one."""

    dataset: str = "auto"  # one of DATASETS; auto: decided by what the source holds
    labels: str = "fine"  # CIFAR-100: "fine" (100 classes) or "coarse" (20 superclasses)
    size: int = 0  # image folders: resize every image to size x size (0: all must already share one size)
    extra: bool = False  # SVHN: add extra_32x32.mat to the training split

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "labels": self.labels, "size": self.size, "extra": self.extra}


@dataclass
class Dataset:
    kind: str  # "cifar-python" | "cifar100-python" | "svhn-mat" | "image-folder"
    classes: list[str]
    train_images: np.ndarray  # uint8 (N, H, W, 3)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    notes: list[str] = field(default_factory=list)  # one line each for the log (e.g. images composited)
    where: dict[str, str] = field(default_factory=dict)  # "classes", "train", "test": where each came from


def wanted(rel: str) -> bool:
    """The archive members a reader may read: the official data files and images; all else is never
    decompressed (archive.read_tree)."""
    name = rel.rsplit("/", 1)[-1]
    return (name in CIFAR_FILES or name in CIFAR100_FILES or name in SVHN_FILES
            or name.lower().endswith(IMAGE_EXTS))


def _find(tree: Tree, name: str) -> list[str]:
    """Paths of files called `name`, shallowest first."""
    return sorted((r for r in tree.files if r.rsplit("/", 1)[-1] == name), key=lambda r: (r.count("/"), r))


def detect(tree: Tree) -> str:
    """The dataset a source holds, by its content."""
    if _find(tree, "data_batch_1"):
        return "cifar10"
    if any(_find(tree, n) for n in ("train", "meta")) and all(_find(tree, n) for n in CIFAR100_FILES):
        return "cifar100"
    if _find(tree, "train_32x32.mat"):
        return "svhn"
    if image_root(tree) is not None:
        return "folder"
    raise DataError(f"{tree.origin}: not a dataset fastcifar reads (found none of cifar-10-batches-py/data_batch_1, "
                    "cifar-100-python/{train,test,meta}, train_32x32.mat + test_32x32.mat, or train/<class>/ and "
                    "test/<class>/ image folders)")


def read_dataset(tree: Tree, options: ReadOptions = ReadOptions()) -> Dataset:
    """Read the source as options.dataset (decided by content when "auto"), held to what every kind of source
    must satisfy (data.checks: class names, image shapes, no class without images)."""
    data = _read(tree, options)
    check_dataset(data, {k: data.where.get(k, str(tree.origin)) for k in ("classes", "train", "test")})
    return data


def _read(tree: Tree, options: ReadOptions) -> Dataset:
    dataset = detect(tree) if options.dataset == "auto" else options.dataset
    if dataset == "cifar10":
        paths = _find(tree, "data_batch_1")
        if not paths:
            raise DataError(f"{tree.origin}: --dataset cifar10 needs cifar-10-batches-py/data_batch_1 (not found)")
        return read_cifar_python(tree, paths[0][: -len("data_batch_1")])
    if dataset == "cifar100":
        return read_cifar100(tree, options.labels)
    if dataset == "svhn":
        return _read_svhn(tree, options.extra)
    root = image_root(tree)
    if root is None:
        raise DataError(f"{tree.origin}: --dataset folder needs train/<class>/ and test/<class>/ image folders")
    classes, train_x, train_y, test_x, test_y, notes = read_image_folder(tree, root, options.size)
    return Dataset("image-folder", classes, train_x, train_y, test_x, test_y, notes=notes,
                   where={"classes": tree.where(root + "train"), "train": tree.where(root + "train"),
                          "test": tree.where(root + "test")})


# --- official python batches -------------------------------------------------------------------------------------


def _get(d: dict, key: str) -> object:
    # python2 pickles load with bytes keys under encoding="bytes"; re-pickled copies may have str keys.
    return d[key.encode()] if key.encode() in d else d.get(key)


def read_cifar_python(tree: Tree, prefix: str) -> Dataset:
    missing = [n for n in CIFAR_FILES if prefix + n not in tree.files]
    if missing:
        raise DataError(
            f"{tree.where(prefix.rstrip('/'))}: cifar-10-batches-py is missing {', '.join(missing)} "
            f"(expected {', '.join(CIFAR_FILES)})"
        )
    classes = _read_names(tree, prefix + "batches.meta", "label_names")
    train = [_read_batch(tree, prefix + n, len(classes)) for n in CIFAR_TRAIN_BATCHES]
    test = _read_batch(tree, prefix + "test_batch", len(classes))
    return Dataset(
        kind="cifar-python",
        classes=classes,
        train_images=np.concatenate([x for x, _ in train]),
        train_labels=np.concatenate([y for _, y in train]),
        test_images=test[0],
        test_labels=test[1],
        where={"classes": tree.where(prefix + "batches.meta"), "train": tree.where(prefix + "data_batch_1") + " to 5",
               "test": tree.where(prefix + "test_batch")},
    )


def _read_names(tree: Tree, rel: str, key: str) -> list[str]:
    where = tree.where(rel)
    meta = safe_loads(tree.read(rel), where)
    names = _get(meta, key) if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{where}: wrong structure (expected a dict with a non-empty list '{key}')")
    out = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    if len(set(out)) != len(out):
        raise DataError(f"{where}: duplicate class names in {key}")
    return out


def _read_batch(tree: Tree, rel: str, num_classes: int, key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """One batch -> (NHWC uint8 images, int64 labels); `key`: the labels' name (CIFAR-100: fine_labels, ...)."""
    where = tree.where(rel)
    batch = safe_loads(tree.read(rel), where)
    expected = f"a dict with 'data' (uint8 rows of 3072 pixels) and '{key}' (one int per row)"
    if not isinstance(batch, dict):
        raise DataError(f"{where}: wrong structure (expected {expected}, got {type(batch).__name__})")
    missing = [k for k in ("data", key) if k.encode() not in batch and k not in batch]
    if missing:
        found = sorted(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k) for k in batch)[:8]
        raise DataError(f"{where}: no '{missing[0]}' key (expected {expected}; found {found})")
    data, labels = _get(batch, "data"), _get(batch, key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: wrong shapes: 'data' must be uint8 (N, 3072), got {_described(data)}")
    if not len(data):
        raise DataError(f"{where}: holds no images ('data' is (0, 3072)); remove the file or fill it")
    # Only a flat sequence of ints becomes an array: np.asarray of a pickled list that references one big list
    # many times would build a huge nested array before any shape check could refuse it.
    flat = isinstance(labels, np.ndarray) or (isinstance(labels, (list, tuple))
                                              and all(isinstance(v, int) and not isinstance(v, bool) for v in labels))
    y = np.asarray(labels) if flat else None
    if y is None or y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(data):
        raise DataError(f"{where}: wrong shapes: '{key}' must be a list of {len(data)} ints (one per row of 'data'), "
                        f"got {_described(labels)}")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{where}: label out of range [0, {num_classes}) (min {y.min()}, max {y.max()})")
    # Rows are channel-planar (1024 R, 1024 G, 1024 B, each 32x32 row-major) -> NHWC.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, y.astype(np.int64)


def _described(v: object) -> str:
    """A value read from a pickle, in a few words for an error line."""
    if isinstance(v, np.ndarray):
        return f"a {v.dtype} array of shape {v.shape}"
    if isinstance(v, (list, tuple)):
        odd = next((type(x).__name__ for x in v if not isinstance(x, int) or isinstance(x, bool)), None)
        return f"a {type(v).__name__} of {len(v)} items" + (f" (one a {odd})" if odd else "")
    return f"a {type(v).__name__}"


# --- CIFAR-100 -----------------------------------------------------------------------------------------------------


def read_cifar100(tree: Tree, labels: str = "fine") -> Dataset:
    """cifar-100-python/{train,test,meta}: 'data' (N, 3072) uint8 rows, 'fine_labels' / 'coarse_labels', and
    'fine_label_names' / 'coarse_label_names' in meta."""
    if labels not in ("fine", "coarse"):
        raise DataError(f"--labels: must be fine or coarse, got {labels!r}")
    found = {n: _find(tree, n) for n in CIFAR100_FILES}
    missing = [n for n, paths in found.items() if not paths]
    if missing:
        raise DataError(f"{tree.origin}: cifar-100-python is missing {', '.join(missing)} (expected train, test, "
                        "meta)")
    classes = _read_names(tree, found["meta"][0], f"{labels}_label_names")
    key = f"{labels}_labels"
    train = _read_batch(tree, found["train"][0], len(classes), key)
    test = _read_batch(tree, found["test"][0], len(classes), key)
    return Dataset("cifar100-python", classes, *train, *test,
                   where={"classes": tree.where(found["meta"][0]), "train": tree.where(found["train"][0]),
                          "test": tree.where(found["test"][0])})


def _read_svhn(tree: Tree, extra: bool) -> Dataset:
    need = ["train_32x32.mat", "test_32x32.mat"] + (["extra_32x32.mat"] if extra else [])
    paths = {n: _find(tree, n) for n in need}
    missing = [n for n, p in paths.items() if not p]
    if missing:
        raise DataError(f"{tree.origin}: SVHN needs {', '.join(need)} (missing {', '.join(missing)})")
    files = {n: tree.read(p[0]) for n, p in paths.items()}
    where = {n: tree.where(p[0]) for n, p in paths.items()}
    train_x, train_y, test_x, test_y, classes = read_svhn(files, where, extra)
    train_where = where["train_32x32.mat"] + (" + extra_32x32.mat" if extra else "")
    return Dataset("svhn-mat", classes, train_x, train_y, test_x, test_y,
                   where={"classes": train_where, "train": train_where, "test": where["test_32x32.mat"]})
