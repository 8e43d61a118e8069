"""Synthetic CIFAR-shaped data for tests: official-format batches, image folders, archives, prepared stores.

Images carry class-dependent colour and stripe patterns (plus noise), so a small model can learn them quickly.
Every builder returns the arrays prepare_store is expected to produce, in store order.
"""

from __future__ import annotations

import colorsys
import io
import pickle
import struct
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCH_NAMES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


def class_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 (N, size, size, 3): hue by class, stripe direction/period by class, random shift and noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((len(labels), size, size, 3), np.uint8)
    for i, c in enumerate(labels):
        base = np.array(colorsys.hsv_to_rgb(c / num_classes, 0.8, 0.9)) * 255
        half = 2 + int(c) % 3
        coord = xx if c % 2 else yy
        stripes = ((coord + rng.integers(0, 2 * half)) // half) % 2
        img = base * (0.55 + 0.45 * stripes[..., None]) + rng.normal(0, 6, (size, size, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


# --- official python batches -------------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles the way python2 cPickle did for the official batches: strings as BINSTRING (loaded back as
    bytes with encoding="bytes") and numpy.core.multiarray._reconstruct, not numpy 2's numpy._core spelling."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dumps_batch(obj: Any, protocol: int | str = "py2") -> bytes:
    """Pickle like the official files ("py2") or with a modern protocol (e.g. 5)."""
    if protocol == "py2":
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        return buf.getvalue()
    return pickle.dumps(obj, protocol=int(protocol))


def write_cifar_batches(
    directory: str | Path,
    n_per_class: int = 2,
    classes: tuple[str, ...] = CIFAR_CLASSES,
    *,
    protocol: int | str = "py2",
    seed: int = 0,
    overrides: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Write a cifar-10-batches-py folder: each of the 6 batches holds n_per_class images of every class
    (train = 5 * n_per_class per class). `overrides` replaces a file's bytes (e.g. a malicious data_batch_1)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = len(classes)
    xs, ys = [], []
    for name in BATCH_NAMES:
        labels = rng.permutation(np.repeat(np.arange(k), n_per_class))
        images = class_images(labels, k, rng)
        planar = images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)  # NHWC -> channel-planar rows
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": planar,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]}
        (d / name).write_bytes(dumps_batch(batch, protocol))
        xs.append(images)
        ys.append(labels.astype(np.int64))
    meta = {b"label_names": [c.encode() for c in classes], b"num_cases_per_batch": k * n_per_class, b"num_vis": 3072}
    (d / "batches.meta").write_bytes(dumps_batch(meta, protocol))
    for name, data in (overrides or {}).items():
        (d / name).write_bytes(data)
    return {"classes": list(classes), "train_images": np.concatenate(xs[:5]), "train_labels": np.concatenate(ys[:5]),
            "test_images": xs[5], "test_labels": ys[5]}


def make_cifar_python_tar(
    path: str | Path, n_per_class: int = 2, classes: tuple[str, ...] = CIFAR_CLASSES, **kw: Any
) -> dict[str, Any]:
    """An official-style cifar-10-python.tar.gz (any suffix from make_archive) holding cifar-10-batches-py/."""
    with tempfile.TemporaryDirectory() as tmp:
        expected = write_cifar_batches(Path(tmp) / "cifar-10-batches-py", n_per_class, classes, **kw)
        make_archive(Path(tmp), path)
    return expected


# --- image folders -----------------------------------------------------------------------------------------------


def make_image_folder(
    directory: str | Path,
    n_train_per_class: int,
    n_test_per_class: int,
    fmt: str = "png",
    *,
    classes: tuple[str, ...] = CIFAR_CLASSES,
    size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Write train/<class>/NNNN.<ext> and test/<class>/NNNN.<ext>; returns the expected store arrays."""
    from PIL import Image

    d = Path(directory)
    classes = tuple(sorted(classes))
    rng = np.random.default_rng(seed)
    ext = {"png": "png", "jpeg": "jpg", "jpg": "jpg"}[fmt]
    expected: dict[str, Any] = {"classes": list(classes)}
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), n)
        images = class_images(labels, len(classes), rng, size)
        for c in classes:
            (d / split / c).mkdir(parents=True, exist_ok=True)
        for i, (img, y) in enumerate(zip(images, labels)):
            path = d / split / classes[y] / f"{i % n:04d}.{ext}"
            if ext == "png":
                Image.fromarray(img).save(path, format="PNG")
            else:
                Image.fromarray(img).save(path, format="JPEG", quality=95, subsampling=0)  # 4:4:4 keeps colours close
        expected[f"{split}_images"], expected[f"{split}_labels"] = images, labels
    return expected


def make_archive(src_dir: str | Path, path: str | Path, *, top: str | None = None) -> Path:
    """Pack src_dir's contents into .tar / .tar.gz / .tgz / .zip (by suffix), optionally under one `top` folder."""
    src, path = Path(src_dir), Path(path)
    entries = sorted(src.rglob("*"))
    arc = [(p, "/".join(filter(None, [top, p.relative_to(src).as_posix()]))) for p in entries]
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for p, name in arc:
                zf.write(p, name)
    else:
        mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
        with tarfile.open(path, mode) as tf:
            for p, name in arc:
                tf.add(p, name, recursive=False)
    return path


# --- prepared stores ---------------------------------------------------------------------------------------------


def make_store(
    directory: str | Path, n_train_per_class: int, n_test_per_class: int, num_classes: int = 10, seed: int = 0
) -> Path:
    """Build a prepared store at `directory` through the public prepare API (from a temporary PNG image folder)."""
    from fastcifar.data import prepare_store

    names = CIFAR_CLASSES if num_classes == 10 else tuple(f"class{i:02d}" for i in range(num_classes))
    with tempfile.TemporaryDirectory() as tmp:
        make_image_folder(tmp, n_train_per_class, n_test_per_class, "png", classes=names, seed=seed)
        prepare_store(Path(tmp), Path(directory), force=True, log=lambda *_: None)
    return Path(directory)


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (greyscale for (H, W), RGB for (H, W, 3)) written by hand: PIL cannot write 16-bit RGB."""
    import zlib

    px = np.asarray(pixels, dtype=">u2")
    h, w = px.shape[:2]
    colour = 2 if px.ndim == 3 else 0
    rows = b"".join(b"\x00" + px[y].tobytes() for y in range(h))  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# --- CIFAR-100 and SVHN --------------------------------------------------------------------------------------------


def write_cifar100(directory: str | Path, n_per_class: int = 2, fine: int = 6, coarse: int = 3, *,
                   seed: int = 0, overrides: dict[str, bytes] | None = None) -> dict[str, Any]:
    """A cifar-100-python folder (train, test, meta) with the official keys: 'data', 'fine_labels',
    'coarse_labels', 'filenames' per split, 'fine_label_names' / 'coarse_label_names' in meta. Fine class c
    belongs to coarse class c % coarse. Returns the expected arrays for fine and coarse labels."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fine_names = [f"fine{i:02d}" for i in range(fine)]
    coarse_names = [f"coarse{i}" for i in range(coarse)]
    expected: dict[str, Any] = {"fine_classes": fine_names, "coarse_classes": coarse_names}
    for split, n in (("train", n_per_class * 2), ("test", n_per_class)):
        labels = rng.permutation(np.repeat(np.arange(fine), n))
        images = class_images(labels, fine, rng)
        rows = images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)
        batch = {b"filenames": [f"{split}_{i}.png".encode() for i in range(len(labels))],
                 b"batch_label": f"{split} batch".encode(), b"fine_labels": [int(v) for v in labels],
                 b"coarse_labels": [int(v) % coarse for v in labels], b"data": rows}
        (d / split).write_bytes(dumps_batch(batch))
        expected[f"{split}_images"], expected[f"{split}_fine"] = images, labels.astype(np.int64)
        expected[f"{split}_coarse"] = (labels % coarse).astype(np.int64)
    meta = {b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [n.encode() for n in coarse_names]}
    (d / "meta").write_bytes(dumps_batch(meta))
    for name, data in (overrides or {}).items():
        (d / name).write_bytes(data)
    return expected


def write_svhn(directory: str | Path, n_train: int = 40, n_test: int = 20, *, extra: int = 0, seed: int = 0,
               compress: bool = False) -> dict[str, Any]:
    """SVHN's .mat files as the publisher lays them out: X uint8 (32, 32, 3, N), y (N, 1) with digits 1..9 and
    digit 0 stored as 10 (written with scipy, which the reader under test does not use)."""
    import scipy.io

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    expected: dict[str, Any] = {}
    for name, n in (("train", n_train), ("test", n_test), ("extra", extra)):
        if not n:
            continue
        digits = np.arange(n) % 10
        images = class_images(digits, 10, rng)
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(d / f"{name}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": y},
                         do_compression=compress)
        expected[f"{name}_images"], expected[f"{name}_labels"] = images, digits.astype(np.int64)
    return expected
