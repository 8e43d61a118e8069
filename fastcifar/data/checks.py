"""What every source must satisfy before it becomes a store, whatever its kind (image folder or archive, CIFAR
pickles, SVHN .mat files): the same refusals in the same words, so no kind is prepared silently into a store
that trains or scores nonsense.

- class names: distinct as printed (not two names that differ only by Unicode normalisation or surrounding
  spaces), valid UTF-8, no control characters;
- images: uint8 (N, S, S, 3), square, MIN_SIDE <= S <= MAX_SIDE, train and test of one size;
- classes: at least 2, and every class has training and test images (a class without training images is never
  learnt and scores 0 %; one without test images is never scored; a set of one class scores 100 %).
"""

from __future__ import annotations

import unicodedata
from typing import Any, Sequence

import numpy as np

from fastcifar.errors import DataError

MIN_SIDE = 8  # the smallest image a model here takes (a 32 px CNN pools 32 -> 4); below it nothing is learnt
MAX_SIDE = 1024  # the largest stored / trained image side (prepare --size's bound; a checkpoint's image_size)
SPLITS = ("train", "test")


def check_class_names(names: Sequence[str], where: str) -> None:
    """DataError for a blank name, a name with control characters, or two names that print alike."""
    seen: dict[str, str] = {}
    for name in names:
        # Cs: a lone surrogate, what Python makes of a file name that is not UTF-8; it cannot even be printed
        if any(unicodedata.category(ch) == "Cs" for ch in name):
            raise DataError(f"{where}: class name {ascii(name)} is not valid UTF-8; rename it")
        key = unicodedata.normalize("NFC", name).strip()
        if not key or any(unicodedata.category(ch) == "Cc" for ch in name):
            raise DataError(f"{where}: class name {ascii(name)} is blank or holds control characters; rename it")
        if key in seen:
            raise DataError(f"{where}: class names {ascii(seen[key])} and {ascii(name)} print the same (they differ "
                            "only by Unicode normalisation or surrounding spaces); rename one")
        seen[key] = name


def check_dataset(data: Any, where: dict[str, str]) -> None:
    """Refuse a Dataset (fastcifar.data.readers) that no kind of source may become; `where`: the locations of
    its class names ("classes") and of each split's images ("train", "test") for the error line."""
    classes = list(data.classes)
    check_class_names(classes, where["classes"])
    if len(classes) < 2:
        raise DataError(f"{where['classes']}: holds {len(classes)} class ({', '.join(classes)}); a classifier needs "
                        "at least 2")
    shapes = {}
    for split in SPLITS:
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        shapes[split] = _check_images(images, where[split])
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
        empty = [c for c, n in zip(classes, counts) if n == 0]
        if empty:
            more = f" (and {len(empty) - 1} more of the {len(classes)})" if len(empty) > 1 else ""
            raise DataError(f"{where[split]}: class {ascii(empty[0])}{more} has no {split} images; every class "
                            "needs training and test images (one without them is never learnt or never scored)")
    if shapes["train"] != shapes["test"]:
        (h, w), (th, tw) = shapes["train"], shapes["test"]
        raise DataError(f"{where['test']}: test images are {tw}x{th} but {where['train']} holds {w}x{h} training "
                        "images; both splits must have one size")


def _check_images(images: np.ndarray, where: str) -> tuple[int, int]:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or not len(images):
        raise DataError(f"{where}: images are {images.dtype} {list(images.shape)}, expected uint8 (N, H, W, 3) "
                        "with N > 0")
    h, w = images.shape[1:3]
    if h != w:
        raise DataError(f"{where}: images are {w}x{h}, not square; models here take square images (an image "
                        "folder source with --size N is resized to N x N)")
    if not MIN_SIDE <= h <= MAX_SIDE:
        raise DataError(f"{where}: images are {w}x{h}, outside the {MIN_SIDE}..{MAX_SIDE} px a store may hold")
    return h, w
