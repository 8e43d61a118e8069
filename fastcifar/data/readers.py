"""Turn a source Tree into arrays: the official python batches, or an image-folder (train/<class>/*, test/<class>/*).

Both readers validate everything they load and raise DataError naming the offending file, because the source is
user-supplied (or downloaded) and a silent mis-read would only surface later as a nonsense accuracy.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from fastcifar.data.archive import Tree, one_line
from fastcifar.data.safe_pickle import safe_loads
from fastcifar.errors import DataError

SPLITS = ("train", "test")
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_FILES = (*CIFAR_TRAIN_BATCHES, "test_batch", "batches.meta")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


@dataclass
class Dataset:
    kind: str  # "cifar-python" | "image-folder"
    classes: list[str]
    train_images: np.ndarray  # uint8 (N, H, W, 3)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    notes: list[str] = field(default_factory=list)  # one line each for the log (e.g. images composited)


def wanted(rel: str) -> bool:
    """The archive members a reader may read: the official batch files and images; all else is never
    decompressed (archive.read_tree)."""
    name = rel.rsplit("/", 1)[-1]
    return name in CIFAR_FILES or name.lower().endswith(IMAGE_EXTS)


def read_dataset(tree: Tree) -> Dataset:
    """Decide the format by content, then read it."""
    batch_paths = sorted((r for r in tree.files if r.rsplit("/", 1)[-1] == "data_batch_1"), key=len)
    if batch_paths:
        return read_cifar_python(tree, batch_paths[0][: -len("data_batch_1")])
    root = _image_root(tree)
    if root is None:
        raise DataError(
            f"{tree.origin}: not a CIFAR-10 source (found neither cifar-10-batches-py/data_batch_1 "
            "nor train/<class>/ and test/<class>/ image folders)"
        )
    return read_image_folder(tree, root)


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
    classes = _read_label_names(tree, prefix + "batches.meta")
    train = [_read_batch(tree, prefix + n, len(classes)) for n in CIFAR_TRAIN_BATCHES]
    test = _read_batch(tree, prefix + "test_batch", len(classes))
    return Dataset(
        kind="cifar-python",
        classes=classes,
        train_images=np.concatenate([x for x, _ in train]),
        train_labels=np.concatenate([y for _, y in train]),
        test_images=test[0],
        test_labels=test[1],
    )


def _read_label_names(tree: Tree, rel: str) -> list[str]:
    where = tree.where(rel)
    meta = safe_loads(tree.read(rel), where)
    names = _get(meta, "label_names") if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{where}: wrong structure (expected a dict with a non-empty list 'label_names')")
    out = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    if len(set(out)) != len(out):
        raise DataError(f"{where}: duplicate class names in label_names")
    return out


def _read_batch(tree: Tree, rel: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch -> (NHWC uint8 images, int64 labels)."""
    where = tree.where(rel)
    batch = safe_loads(tree.read(rel), where)
    if not isinstance(batch, dict):
        raise DataError(f"{where}: wrong structure (expected a dict with 'data' and 'labels', got {type(batch).__name__})")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: wrong shapes (expected 'data' uint8 (N, 3072), got {got})")
    # Only a flat sequence of ints becomes an array: np.asarray of a pickled list that references one big list
    # many times would build a huge nested array before any shape check could refuse it.
    flat = isinstance(labels, np.ndarray) or (isinstance(labels, (list, tuple))
                                              and all(isinstance(v, int) for v in labels))
    y = np.asarray(labels) if flat else np.asarray([])
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(data):
        raise DataError(
            f"{where}: wrong shapes (expected 'labels' as {len(data)} ints, got {y.dtype} of shape {y.shape})"
        )
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{where}: label out of range [0, {num_classes}) (min {y.min()}, max {y.max()})")
    # Rows are channel-planar (1024 R, 1024 G, 1024 B, each 32x32 row-major) -> NHWC.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, y.astype(np.int64)


# --- image folders -----------------------------------------------------------------------------------------------


def _image_root(tree: Tree) -> str | None:
    """'' if train/ and test/ sit at the top, 'top/' if under one top-level folder, None if neither."""
    entries = [*tree.files, *tree.dirs]
    tops = {e.split("/", 1)[0] for e in entries}
    if tops & set(SPLITS):
        return ""
    if len(tops) == 1:
        top = next(iter(tops))
        if any(e.split("/")[1:2] and e.split("/")[1] in SPLITS for e in entries):
            return top + "/"
    return None


def _collect(tree: Tree, root: str) -> dict[str, dict[str, list[str]]]:
    """split -> class -> sorted image paths. Class folders come from dir entries and from any path beneath them."""
    groups: dict[str, dict[str, list[str]]] = {}
    for entry in [*tree.dirs, *tree.files]:
        if not entry.startswith(root):
            continue
        parts = entry[len(root) :].split("/")
        if parts[0] in SPLITS:
            split = groups.setdefault(parts[0], {})
            # A loose file directly under train/ is not a class; anything deeper implies a class folder.
            if len(parts) >= 3 or (len(parts) == 2 and entry in tree.dirs):
                files = split.setdefault(parts[1], [])
                if len(parts) == 3 and entry in tree.files and parts[2].lower().endswith(IMAGE_EXTS):
                    files.append(entry)
    for split in groups.values():
        for files in split.values():
            files.sort()
    return groups


def read_image_folder(tree: Tree, root: str) -> Dataset:
    groups = _collect(tree, root)
    for s in SPLITS:
        if not groups.get(s):
            raise DataError(
                f"{tree.where(root + s)}: missing {s}/ folder with class subfolders "
                "(expected train/<class>/*.png|jpg and test/<class>/*.png|jpg)"
            )
    classes = sorted(groups["train"])
    if set(groups["test"]) != set(classes):
        only_train = sorted(set(classes) - set(groups["test"]))
        only_test = sorted(set(groups["test"]) - set(classes))
        raise DataError(
            f"{tree.where(root.rstrip('/'))}: train/ and test/ have different classes "
            f"(only in train: {only_train}, only in test: {only_test})"
        )
    for s in SPLITS:
        for c in classes:
            if not groups[s][c]:
                raise DataError(f"{tree.where(f'{root}{s}/{c}')}: empty class folder (no .png/.jpg/.jpeg files)")
    decoder = _Decoder(tree)
    arrays = {}
    for s in SPLITS:
        paths = [p for c in classes for p in groups[s][c]]
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(groups[s][c]) for c in classes])
        arrays[s] = (decoder.decode_all(paths), labels)
    done = decoder.composited
    notes = [f"{len(done)} images had transparency and were composited onto black (first: {done[0]})"] if done else []
    return Dataset("image-folder", classes, *arrays["train"], *arrays["test"], notes=notes)


class _Decoder:
    """Decodes images with PIL, enforcing one common size across the whole source."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.first: str | None = None
        self.shape: tuple[int, ...] | None = None
        self.composited: list[str] = []  # images whose transparency was composited onto black (to_rgb)

    def decode_all(self, paths: list[str]) -> np.ndarray:
        out: np.ndarray | None = None
        for i, rel in enumerate(paths):
            img = self.decode(rel)
            if out is None:  # allocate once the (common) size is known
                out = np.empty((len(paths), *img.shape), np.uint8)
            out[i] = img
        assert out is not None  # callers guarantee non-empty class folders
        return out

    def decode(self, rel: str) -> np.ndarray:
        from PIL import Image  # deferred: importing PIL is not free and only image folders need it

        try:
            # formats=...: only let PIL's PNG/JPEG parsers see untrusted bytes, not every plugin it ships.
            with Image.open(io.BytesIO(self.tree.read(rel)), formats=["PNG", "JPEG"]) as im:
                arr, alpha = to_rgb(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"{self.tree.where(rel)}: truncated or corrupt image ({one_line(e)})") from None
        except UnsupportedImage as e:
            raise DataError(f"{self.tree.where(rel)}: {e}") from None
        if alpha:
            self.composited.append(self.tree.where(rel))
        if self.shape is None:
            self.first, self.shape = rel, arr.shape
        elif arr.shape != self.shape:
            h, w = arr.shape[:2]
            raise DataError(
                f"{self.tree.where(rel)}: image is {w}x{h} but {self.tree.where(self.first or '')} is "
                f"{self.shape[1]}x{self.shape[0]} (all images must have the same size)"
            )
        return arr


class UnsupportedImage(Exception):
    """An image mode with no faithful 8-bit RGB conversion."""


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes for 16-bit greyscale PNGs


def to_rgb(im) -> tuple[np.ndarray, bool]:
    """uint8 (H, W, 3) of a PIL image and whether it had (non-opaque) transparency.

    16-bit greyscale is scaled to 8 bits (PIL's own convert clips it: everything above 255 turns white), and
    transparency is composited onto black (alpha-premultiplied; PIL's convert would just drop the alpha,
    showing whatever colour hides under transparent pixels). 16-bit RGB(A) PNGs open as 8-bit RGB(A) already.
    """
    if im.mode in SIXTEEN_BIT:
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise UnsupportedImage(f"{im.mode} image with values outside 0..65535; convert it to 8-bit RGB")
        g = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2), False
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[..., 3:].astype(np.uint32)
        if alpha.min(initial=255) == 255:
            return np.ascontiguousarray(rgba[..., :3]), False
        return ((rgba[..., :3] * alpha + 127) // 255).astype(np.uint8), True
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB")), False
