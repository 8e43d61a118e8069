"""`fastcifar predict`: top-k classes of image files (or of the PNG/JPEG files in folders) under a saved checkpoint
or export, preprocessed as in evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fastcifar.augment import build_eval_transform
from fastcifar.data.archive import MEMBER_CAP, check_regular, one_line
from fastcifar.data.images import IMAGE_EXTS, decode_image, fit_image
from fastcifar.device import resolve_device
from fastcifar.engine import tta_logits
from fastcifar.errors import DataError, FastCifarError
from fastcifar.evaluate import load_trained_model
from fastcifar.export import exported_runner, looks_exported, read_export

if TYPE_CHECKING:
    from rich.console import Console

BATCH = 256  # images per forward pass: bounds memory when many files (or augment.resize = 224) are given


def read_image(path: str | Path, image_size: int) -> torch.Tensor:
    """uint8 (3, S, S) of an image file, made exactly as `prepare --size S` makes a store's images
    (data.images.decode_image + fit_image: shorter side to S, centre crop, antialiased bicubic)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such image file")
    check_regular(path, "image")  # a FIFO would block the read forever
    if path.is_dir():
        raise DataError(f"{path}: is a folder; pass image files or a folder of them")
    if path.stat().st_size > MEMBER_CAP:  # an image file is read whole: the cap prepare puts on a data file
        raise DataError(f"{path}: is {path.stat().st_size / 2**20:,.0f} MiB, over the {MEMBER_CAP // 2**20} MiB "
                        "an image file may have")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({one_line(e)})") from None
    rgb, _ = decode_image(data, str(path))  # 16-bit greyscale scaled, transparency composited, as in prepare
    return torch.from_numpy(np.array(fit_image(rgb, image_size))).permute(2, 0, 1)


def expand_images(paths: list[Path]) -> list[Path]:
    """The files named, with each folder replaced by the PNG/JPEG files below it (recursively, sorted by path;
    other files skipped, symlinked folders not followed). A folder without an image is refused."""
    out: list[Path] = []
    for path in paths:
        if not path.is_dir() or path.is_symlink():
            out.append(path)
            continue
        found = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTS and not f.is_dir())
        if not found:
            raise DataError(f"{path}: folder holds no image files ({', '.join(IMAGE_EXTS)})")
        out.extend(found)
    return out


def preprocess(batch: torch.Tensor, recipe) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> the float batch the model saw in evaluation: build_eval_transform itself, so
    normalise / resize happen in the same order and dtype as in `fastcifar eval` on the same device."""
    transform = build_eval_transform(recipe.augment, recipe.data.mean, recipe.data.std)
    nhwc = batch.permute(0, 2, 3, 1).contiguous()  # the store's layout
    return transform(nhwc, torch.arange(len(batch), device=batch.device))


def predict(checkpoint: Path, images: list[Path], top_k: int = 3, device_name: str = "auto") -> list[dict[str, Any]]:
    """Per image {"image": str, "top": [(class, probability), ...]} with the k most probable classes."""
    if top_k < 1:
        raise FastCifarError(f"--top-k: must be >= 1, got {top_k}")
    images = expand_images(list(images))
    if not images:
        raise DataError("no image files given")
    if looks_exported(Path(checkpoint)):  # an ONNX / TorchScript file from `fastcifar export`
        probs, classes = _exported_probs(Path(checkpoint), images)
    else:
        probs, classes = _checkpoint_probs(Path(checkpoint), images, device_name)
    top_p, top_i = probs.topk(min(top_k, len(classes)), dim=1)
    return [{"image": str(path), "top": [(classes[i], float(p)) for p, i in zip(ps.tolist(), idx.tolist())]}
            for path, ps, idx in zip(images, top_p, top_i)]


def _checkpoint_probs(checkpoint: Path, images: list[Path], device_name: str) -> tuple[torch.Tensor, list[str]]:
    device = resolve_device(device_name)
    model, recipe, classes, image_size = load_trained_model(checkpoint, device)
    # Every file is read before the model runs, so a bad one fails the command before any output.
    pixels = torch.stack([read_image(p, image_size) for p in images])
    probs = []
    # fp32, no autocast: a handful of images costs nothing, and the probabilities are then reproducible.
    with torch.no_grad():
        for start in range(0, len(pixels), BATCH):
            x = preprocess(pixels[start:start + BATCH].to(device), recipe)
            # the recipe's test-time augmentation (eval.tta), as validation and `fastcifar eval` apply it
            probs.append(torch.softmax(tta_logits(model, x, recipe.eval.tta), dim=1).cpu())
    return torch.cat(probs), classes


def _exported_probs(path: Path, images: list[Path]) -> tuple[torch.Tensor, list[str]]:
    """The export has normalisation and TTA inside: it takes the uint8 NHWC pixels as they are read."""
    meta = read_export(path)
    nhwc = torch.stack([read_image(p, int(meta["image_size"])) for p in images]).permute(0, 2, 3, 1).numpy()
    run = exported_runner(path)  # loaded once, not once a batch
    logits = [torch.from_numpy(run(nhwc[s:s + BATCH])) for s in range(0, len(nhwc), BATCH)]
    return torch.softmax(torch.cat(logits).float(), dim=1), [str(c) for c in meta["classes"]]


def print_predictions(results: list[dict[str, Any]], console: Console) -> None:
    """One row per image: its top-k classes with probabilities, most probable first."""
    from rich.table import Table

    k = max((len(r["top"]) for r in results), default=0)
    table = Table(title="predictions")
    table.add_column("image", overflow="fold")
    for rank in range(1, k + 1):
        table.add_column(f"#{rank}", justify="right")
    for r in results:
        cells = [f"{name} {p:.2%}" for name, p in r["top"]]
        table.add_row(r["image"], *cells, *[""] * (k - len(cells)))
    console.print(table)
