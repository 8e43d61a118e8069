"""Evaluation: one pass of logits over a set gives loss, accuracy, per-class accuracy and the confusion matrix."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fastcifar.augment import build_eval_transform
from fastcifar.checkpoint import load_checkpoint
from fastcifar.data import open_store
from fastcifar.device import autocast, recipe_amp_dtype, resolve_device
from fastcifar.engine import input_layout, strip_compile_prefix, tta_logits
from fastcifar.errors import CheckpointError, FastCifarError, first_line
from fastcifar.loader import DeviceLoader
from fastcifar.models import build_model, create_model
from fastcifar.recipe import recipe_from_dict
from fastcifar.stores import checkpoint_store

if TYPE_CHECKING:
    from rich.console import Console


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype | None,
             num_classes: int, keep_logits: bool = False, tta: str = "none",
             channels_last: bool = True) -> dict[str, Any]:
    """Metrics accumulate on the device; the host reads them once at the end (no per-batch sync).

    tta: "none", "flip" or "flip_translate" (fastcifar.engine.TTA_VIEWS: the weighted mean of the logits of
    mirrored / shifted copies). channels_last=False feeds the model NCHW-contiguous batches (train.channels_last).

    keep_logits=True also returns the (N, C) float32 logits and targets on the CPU, in loader order, for the
    full metric set (fastcifar.metrics) and the figures.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    kept: list[torch.Tensor] = []
    for x, y in loader:
        with autocast(device, dtype):
            logits = tta_logits(model, input_layout(x, channels_last), tta)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        if keep_logits:
            kept.append(logits.float())
    model.train(was_training)
    cm = confusion.view(num_classes, num_classes).cpu()  # rows: true class, columns: predicted
    n = int(cm.sum())
    per_class = (cm.diag().double() / cm.sum(1).clamp(min=1).double()).tolist()
    out = {"loss": float(loss_sum) / max(n, 1), "acc": float(cm.diag().sum()) / max(n, 1), "n": n,
           "per_class_acc": per_class, "confusion": cm.tolist()}
    if keep_logits:
        out["logits"] = torch.cat(kept).cpu()
        out["targets"] = loader.labels.cpu()
    return out


DEFAULT_IMAGE_SIZE = 32  # checkpoints written before "image_size" was stored all came from 32 px stores


def load_trained_model(checkpoint: str | Path, device: torch.device):
    """Rebuild a checkpoint's model in eval mode; returns (model, recipe, classes, image_size).

    Shared by `eval`, `predict` and `export`: a corrupt, foreign or mismatched checkpoint is one CheckpointError
    line. Its fields are range-checked on loading (fastcifar.fields), and the model its recipe describes is
    built on the meta device and held to the weights the file holds before anything is allocated."""
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    try:
        recipe = recipe_from_dict(ckpt["recipe"])
        classes = list(ckpt["classes"])
        image_size = int(ckpt.get("image_size") or DEFAULT_IMAGE_SIZE)
        weights = strip_compile_prefix(ckpt["model"])  # also reads a compiled wrapper's keys
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint lacks its recipe, class names or weights ({e})") from None
    except FastCifarError as e:  # a recipe this fastcifar refuses (e.g. an unknown model) is a bad checkpoint
        raise CheckpointError(f"{path}: checkpoint recipe refused ({e})") from None
    if "auto" in (recipe.data.mean, recipe.data.std):  # a run saves the numbers it normalised with
        raise CheckpointError(f"{path}: checkpoint does not record its normalisation (data.mean / data.std)")
    _check_shapes(path, recipe, len(classes), image_size, weights)
    try:
        model = build_model(recipe, len(classes), image_size, device, pretrained=False)
        model.load_state_dict(weights)
    except FastCifarError as e:
        raise CheckpointError(f"{path}: cannot rebuild {recipe.model.name} ({e})") from None
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: weights do not fit {recipe.model.name} ({first_line(e)})") from None
    model.eval()
    return model, recipe, classes, image_size


def _check_shapes(path: Path, recipe, num_classes: int, image_size: int, weights: dict) -> None:
    """The recipe's model built on the meta device (nothing allocated) against the file's tensors: a recipe,
    class list or image size that does not match them is refused before the real build could ask for 240 GB."""
    m = recipe.model
    try:
        with torch.device("meta"):
            probe = create_model(m.name, num_classes=num_classes, image_size=recipe.augment.resize or image_size,
                                 width=m.width, dropout=m.dropout)
    except Exception:  # noqa: BLE001 - a model the meta device cannot build: the real build below decides
        return
    for key, want in probe.state_dict().items():
        got = weights.get(key)
        if isinstance(got, torch.Tensor) and tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: weights do not fit {m.name} with {num_classes} classes at "
                                  f"{image_size}x{image_size}: {key} is {list(got.shape)} in the file, the model "
                                  f"needs {list(want.shape)}")


def eval_checkpoint(path: str | Path, data_dir: str | None, device_name: str,
                    console: Console | None = None) -> dict[str, Any]:
    """`fastcifar eval`: test accuracy, per-class accuracy and confusion of a saved checkpoint on a store's whole
    test set (printed as a table when `console` is given; `--json` writes the returned dict)."""
    device = resolve_device(device_name, key="--device")
    model, recipe, classes, image_size = load_trained_model(path, device)
    store = open_store(Path(data_dir) if data_dir else checkpoint_store(Path(path), recipe.data.store))
    if list(store.classes) != classes:
        raise CheckpointError(f"{path}: trained on classes {classes}, but {store.path} holds {list(store.classes)}")
    h, w = store.test_images.shape[1:3]
    if (h, w) != (image_size, image_size):  # the model would run, and its accuracy would describe other data
        raise CheckpointError(f"{path}: trained on {image_size}x{image_size} images, but {store.path} holds "
                              f"{w}x{h} images")
    transform = build_eval_transform(recipe.augment, recipe.data.mean, recipe.data.std)
    loader = DeviceLoader(store.test_images, store.test_labels, recipe.eval.batch_size, transform, device,
                          shuffle=False)
    metrics = evaluate(model, loader, device, recipe_amp_dtype(recipe.train, device), len(classes),
                       tta=recipe.eval.tta, channels_last=recipe.train.channels_last)
    note = ("this model's folds were drawn from train+test, so the test set overlaps its training data"
            if recipe.split.pool == "train+test" else None)
    result = {"checkpoint": str(path), "store": str(store.path), "images": metrics["n"], "accuracy": metrics["acc"],
              "loss": metrics["loss"] if math.isfinite(metrics["loss"]) else None, "classes": classes,
              "per_class": [{"class": name, "accuracy": acc, "images": sum(row)} for name, acc, row in
                            zip(classes, metrics["per_class_acc"], metrics["confusion"])],
              "confusion": metrics["confusion"], "note": note}
    if console is not None:
        print_eval(result, console)
    return result


def print_eval(result: dict[str, Any], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    if result["note"]:
        console.print(f"[yellow]note: {escape(result['note'])}[/yellow]")
    table = Table(title=f"{Path(result['checkpoint']).name}: test accuracy {result['accuracy']:.2%} on "
                        f"{result['images']} images")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    table.add_column("images", justify="right")
    for row in result["per_class"]:
        table.add_row(escape(row["class"]), f"{row['accuracy']:.2%}", str(row["images"]))
    console.print(table)
