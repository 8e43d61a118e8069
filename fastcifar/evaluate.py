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
from fastcifar.engine import input_layout, select_least_confident, strip_compile_prefix, tta_logits
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
             channels_last: bool = True, tta_fraction: float = 1.0) -> dict[str, Any]:
    """Metrics accumulate on the device; the host reads them once at the end (no per-batch sync).

    tta: "none", "flip", "flip_translate" or "flip_translate_mean" (fastcifar.engine.TTA_VIEWS: the weighted mean
    of the logits of mirrored / shifted copies). tta_fraction < 1: selective TTA (selective_tta_logits), and the
    result says how many images got the views ("tta_selection"). channels_last=False feeds the model
    NCHW-contiguous batches (train.channels_last).

    keep_logits=True also returns the (N, C) float32 logits and targets on the CPU, in loader order, for the
    full metric set (fastcifar.metrics) and the figures.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    kept: list[torch.Tensor] = []
    selection = None
    if tta != "none" and tta_fraction < 1.0:
        logits, selection = selective_tta_logits(model, loader, device, dtype, tta, tta_fraction, channels_last)
        batches = iter([(logits, loader.labels)])
    else:
        batches = ((_logits(model, x, device, dtype, tta, channels_last), y) for x, y in loader)
    for logits, y in batches:
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
    if selection is not None:
        out["tta_selection"] = selection
    if keep_logits:
        out["logits"] = torch.cat(kept).cpu()
        out["targets"] = loader.labels.cpu()
    return out


def _logits(model, x: torch.Tensor, device: torch.device, dtype, tta: str, channels_last: bool) -> torch.Tensor:
    with autocast(device, dtype):
        return tta_logits(model, input_layout(x, channels_last), tta)


@torch.no_grad()
def selective_tta_logits(model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype | None,
                         tta: str, fraction: float, channels_last: bool = True) -> tuple[torch.Tensor, dict]:
    """Hiverge's selective TTA over a whole evaluation set: plain logits for every image, then the `tta` views
    for the int(N * fraction) least confident ones (one softmax-maximum ranking over the whole set, not per
    batch), whose logits they replace. Two passes over the loader; the chosen images go through the TTA views in
    chunks of the loader's batch size (the last one ragged), like Hiverge's, so the shapes a compiled model sees
    do not depend on which images were chosen. Returns (float32 logits (N, C) in loader order, {"tta_fraction",
    "tta_images", "tta_confidence_max"}: the highest plain confidence among the chosen images, the threshold the
    fraction amounts to)."""
    logits = torch.cat([_logits(model, x, device, dtype, "none", channels_last).float() for x, _ in loader])
    chosen = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    picked = select_least_confident(logits, fraction)
    chosen[picked] = True
    confidence = logits.softmax(1).amax(1)
    size, start = loader.batch_size, 0
    waiting_x, waiting_i = [], []  # chosen images not yet through the views, and their rows
    for x, _ in loader:
        rows = chosen[start:start + len(x)].nonzero().squeeze(1)  # one host read a batch: evaluation only
        waiting_x.append(x[rows])
        waiting_i.append(start + rows)
        start += len(x)
        if sum(len(i) for i in waiting_i) >= size or start == len(logits):
            xs, idx = torch.cat(waiting_x), torch.cat(waiting_i)
            full = len(idx) if start == len(logits) else len(idx) - len(idx) % size
            for a in range(0, full, size):
                logits[idx[a:a + size]] = _logits(model, xs[a:a + size], device, dtype, tta, channels_last).float()
            waiting_x, waiting_i = [xs[full:]], [idx[full:]]
    top = float(confidence[picked].max()) if len(picked) else None
    return logits, {"tta_fraction": fraction, "tta_images": len(picked), "tta_confidence_max": top}


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
                       tta=recipe.eval.tta, channels_last=recipe.train.channels_last,
                       tta_fraction=recipe.eval.tta_fraction)
    note = ("this model's folds were drawn from train+test, so the test set overlaps its training data"
            if recipe.split.pool == "train+test" else None)
    result = {"checkpoint": str(path), "store": str(store.path), "images": metrics["n"], "accuracy": metrics["acc"],
              "loss": metrics["loss"] if math.isfinite(metrics["loss"]) else None, "classes": classes,
              "per_class": [{"class": name, "accuracy": acc, "images": sum(row)} for name, acc, row in
                            zip(classes, metrics["per_class_acc"], metrics["confusion"])],
              "confusion": metrics["confusion"], "note": note}
    if "tta_selection" in metrics:  # selective TTA: how many test images got the views, at what threshold
        result["tta_selection"] = metrics["tta_selection"]
    if console is not None:
        print_eval(result, console)
    return result


def print_eval(result: dict[str, Any], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    if result["note"]:
        console.print(f"[yellow]note: {escape(result['note'])}[/yellow]")
    table = Table(title=f"{Path(result['checkpoint']).name}: test accuracy {result['accuracy']:.2%} on "
                        f"{result['images']:,} images")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    table.add_column("images", justify="right")
    for row in result["per_class"]:
        table.add_row(escape(row["class"]), f"{row['accuracy']:.2%}", str(row["images"]))
    console.print(table)
