"""Image folders (train/<class>/*.png|jpg and test/<class>/*.png|jpg, at the top or under one folder), and the one
way fastcifar turns an image file into pixels: decode_image (PIL's PNG and JPEG parsers only, size-checked before
decoding, converted faithfully to 8-bit RGB by to_rgb) and fit_image (shorter side to S, centre crop, antialiased
bicubic). prepare --size, predict and the export's documented input all use these two, so a model sees a file the
way its store saw its images (PREPROCESS names them in the store's meta, the checkpoint and the export).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np

from fastcifar.data.archive import MEMBER_CAP, Tree, one_line
from fastcifar.data.checks import MAX_SIDE, MIN_SIDE, check_class_names
from fastcifar.errors import DataError

SPLITS = ("train", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
# Pixels an image file may declare: checked before decoding, so a 1.5 KB PNG claiming 60000 x 60000 is refused
# instead of decoded (8192 x 8192 = 64 Mpx, 192 MiB as RGB; a 48 Mpx phone photo passes).
MAX_PIXELS = 8192 * 8192
# What an image from disk goes through to become S x S (fit_image). Recorded in the store's meta.json, the
# checkpoints and exports, so predict applies what prepare applied; a file naming anything else is refused.
PREPROCESS = "shorter-side-centre-crop-bicubic"


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
    # first: a name in train/ and its NFD twin in test/ would otherwise be reported as two different classes
    check_class_names(sorted(set(classes) | set(groups["test"])), tree.where(root.rstrip("/")))
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
        arr, alpha = decode_image(self.tree.read(rel, MEMBER_CAP), self.tree.where(rel))
        if alpha:
            self.composited.append(self.tree.where(rel))
        h, w = arr.shape[:2]
        if self.size:
            if (h, w) != (self.size, self.size):
                arr = fit_image(arr, self.size)
                self.resized += 1
            return arr
        if self.shape is None:
            if h != w:
                raise DataError(f"{self.tree.where(rel)}: image is {w}x{h}, not square; pass --size N to resize "
                                "every image to N x N")
            if h > MAX_SIDE:
                raise DataError(f"{self.tree.where(rel)}: image is {w}x{h}, larger than {MAX_SIDE}x{MAX_SIDE}; "
                                "pass --size N to resize every image to N x N")
            self.first, self.shape = rel, arr.shape
        elif arr.shape != self.shape:
            raise DataError(
                f"{self.tree.where(rel)}: image is {w}x{h} but {self.tree.where(self.first or '')} is "
                f"{self.shape[1]}x{self.shape[0]} (all images must have the same size; pass --size N to resize "
                "them at prepare time)"
            )
        return arr


def decode_image(data: bytes | memoryview, where: str) -> tuple[np.ndarray, bool]:
    """uint8 (H, W, 3) RGB of a PNG or JPEG file's bytes, and whether transparency was composited (to_rgb).

    Only PIL's PNG and JPEG parsers see the bytes; the declared size is checked before any pixel is decoded
    (MAX_PIXELS), and images smaller than MIN_SIDE are refused. Every failure is one DataError naming `where`."""
    from PIL import Image  # deferred: importing PIL is not free and only image files need it

    try:
        # formats=...: only let PIL's PNG/JPEG parsers see untrusted bytes, not every plugin it ships. PIL's own
        # bomb warning (above 89 Mpx) is silenced: MAX_PIXELS below refuses those sizes in one line.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
        with im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise UnsupportedImage(f"image is {w}x{h} ({w * h / 1e6:,.0f} Mpx), over the "
                                       f"{MAX_PIXELS / 1e6:.0f} Mpx fastcifar decodes; shrink it first")
            arr, alpha = to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: truncated or corrupt image, or not a PNG or JPEG ({one_line(e)})") from None
    except UnsupportedImage as e:
        raise DataError(f"{where}: {e}") from None
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise DataError(f"{where}: image is {w}x{h}, smaller than {MIN_SIDE}x{MIN_SIDE}")
    return arr, alpha


def fit_image(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3), the PREPROCESS: the centred square of side min(H, W) resampled to
    size x size with PIL's bicubic filter, which widens with the shrink factor (antialiased) - shorter side to
    size, centre crop.

    Only that square, plus the filter's reach around it, is handed to PIL, so the work is bounded by the decoded
    image whatever its aspect ratio: resizing a whole 8 x 60000 PNG to a shorter side of 1024 before cropping
    built a 1024 x 7,680,000 intermediate (24 GB)."""
    from PIL import Image

    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    side = min(h, w)
    x0, y0 = (w - side) / 2, (h - side) / 2
    # bicubic reaches 2 output pixels each way, i.e. 2 * side / size source pixels when shrinking (+1 for rounding)
    reach = math.ceil(2 * max(side / size, 1)) + 1
    left, top = max(0, math.floor(x0) - reach), max(0, math.floor(y0) - reach)
    right, bottom = min(w, math.ceil(x0 + side) + reach), min(h, math.ceil(y0 + side) + reach)
    region = Image.fromarray(np.ascontiguousarray(arr[top:bottom, left:right]))
    box = (x0 - left, y0 - top, x0 - left + side, y0 - top + side)
    return np.asarray(region.resize((size, size), getattr(Image, "Resampling", Image).BICUBIC, box=box))


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
