"""Image folders (train/<class>/*.png|jpg and test/<class>/*.png|jpg, at the top or under one folder): decoded
with PIL's PNG and JPEG parsers only, converted faithfully to 8-bit RGB (to_rgb), and either of one common size or,
with `size`, resized to size x size (shorter side to size, centre crop, antialiased bicubic).
"""

from __future__ import annotations

import io

import numpy as np

from fastcifar.data.archive import Tree, one_line
from fastcifar.errors import DataError

SPLITS = ("train", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
MIN_SIDE = 8  # the smallest image a model here takes (a 32 px CNN pools 32 -> 4); below it nothing is learnt


def image_root(tree: Tree) -> str | None:
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


def read_image_folder(tree: Tree, root: str, size: int = 0):
    """(classes, train images, train labels, test images, test labels, notes for the log); classes sorted."""
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
    decoder = _Decoder(tree, size)
    arrays = []
    for s in SPLITS:
        paths = [p for c in classes for p in groups[s][c]]
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(groups[s][c]) for c in classes])
        arrays += [decoder.decode_all(paths), labels]
    return (classes, *arrays, decoder.notes())


class _Decoder:
    """Decodes images with PIL: one common size across the whole source, or every image resized to `size`."""

    def __init__(self, tree: Tree, size: int = 0) -> None:
        self.tree, self.size = tree, size
        self.first: str | None = None
        self.shape: tuple[int, ...] | None = None
        self.composited: list[str] = []  # images whose transparency was composited onto black (to_rgb)
        self.resized = 0

    def notes(self) -> list[str]:
        done = self.composited
        out = [f"{len(done)} images had transparency and were composited onto black (first: {done[0]})"] \
            if done else []
        if self.size:
            out.append(f"{self.resized} images resized to {self.size}x{self.size} (shorter side, centre crop, "
                       "antialiased bicubic)")
        return out

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
        h, w = arr.shape[:2]
        if min(h, w) < MIN_SIDE:
            raise DataError(f"{self.tree.where(rel)}: image is {w}x{h}, smaller than {MIN_SIDE}x{MIN_SIDE}")
        if self.size:
            if (h, w) != (self.size, self.size):
                arr = square_resize(arr, self.size)
                self.resized += 1
            return arr
        if self.shape is None:
            if h != w:
                raise DataError(f"{self.tree.where(rel)}: image is {w}x{h}, not square; pass --size N to resize "
                                "every image to N x N")
            self.first, self.shape = rel, arr.shape
        elif arr.shape != self.shape:
            raise DataError(
                f"{self.tree.where(rel)}: image is {w}x{h} but {self.tree.where(self.first or '')} is "
                f"{self.shape[1]}x{self.shape[0]} (all images must have the same size; pass --size N to resize "
                "them at prepare time)"
            )
        return arr


def square_resize(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3): shorter side to `size`, centre crop; PIL's bicubic filter widens
    with the shrink factor, so downscaling is antialiased."""
    from PIL import Image

    h, w = arr.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    im = Image.fromarray(arr).resize((nw, nh), getattr(Image, "Resampling", Image).BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im)[top:top + size, left:left + size].copy()


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
