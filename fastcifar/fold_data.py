"""A fold's loaders: training (the device loader, or the torchvision / DALI / FFCV backend), validation and test
(always the device loader), over the rows of the store the fold's index sets name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from fastcifar.augment import build_eval_transform, build_mixer, build_train_transform
from fastcifar.backends import make_loader
from fastcifar.context import RunPlan
from fastcifar.device import recipe_amp_dtype
from fastcifar.loader import DeviceLoader, TrainLoader, gather_images
from fastcifar.recipe import Recipe
from fastcifar.splits import Fold, take_per_class


@dataclass
class FoldData:
    train: TrainLoader  # the device loader, or train.loader's backend (fastcifar.backends)
    val: DeviceLoader
    test: DeviceLoader | None  # None: the pool merged the test set (k-fold over train+test)


def make_loaders(plan: RunPlan, fold: Fold, log: Callable[[str], Any] = print) -> FoldData:
    recipe, store, device = plan.recipe, plan.store, plan.device
    labels = store.labels
    train_idx = fold.train
    if recipe.data.train_subset:
        train_idx = take_per_class(train_idx, labels, recipe.data.train_subset)
    mean, std = recipe.data.mean, recipe.data.std
    # On CUDA the batch is cast to the autocast dtype in the normalise step: half the bytes for the first conv.
    dtype = recipe_amp_dtype(recipe.train, device) if device.type == "cuda" else None
    train_tf = build_train_transform(recipe.augment, mean, std, dtype or torch.float32)
    eval_tf = build_eval_transform(recipe.augment, mean, std, dtype or torch.float32)
    mixer = build_mixer(recipe.augment, len(store.classes))
    seed = recipe.train.seed * 1000 + fold.index

    def loader(idx, tf, shuffle, batch, mix=None):
        images = gather_images(store.train_images, store.test_images, idx)
        return DeviceLoader(images, labels[idx], batch, tf, device, shuffle=shuffle, seed=seed, mixer=mix)

    bs, ebs = recipe.train.batch_size, recipe.eval.batch_size
    val_idx, test_idx = (_eval_subset(idx, labels, recipe) for idx in (fold.val, fold.test))
    same = test_idx is not None and np.array_equal(test_idx, val_idx)
    val = loader(val_idx, eval_tf, False, ebs)
    test = val if same else (loader(test_idx, eval_tf, False, ebs) if test_idx is not None else None)
    if recipe.train.loader != "device":  # torchvision / DALI / FFCV train; evaluation stays on the device loader
        return FoldData(make_loader(plan, train_idx, seed=seed, log=log), val, test)
    return FoldData(loader(train_idx, train_tf, True, bs, mixer), val, test)


def _eval_subset(idx: np.ndarray | None, labels: np.ndarray, recipe: Recipe) -> np.ndarray | None:
    """data.eval_subset: the first n images of each class of a validation / test set (smoke runs), else all."""
    n = recipe.data.eval_subset
    return take_per_class(idx, labels, n) if n and idx is not None and len(idx) else idx


def eval_counts(fold: Fold, data: FoldData) -> dict[str, int]:
    """How many images validation and test used, of how many the split holds: result.json records both, so a
    number from a capped set (data.eval_subset) is never shown as the whole set's."""
    out = {"val_images": data.val.num_images, "val_images_total": len(fold.val)}
    if data.test is not None and fold.test is not None:
        out.update(test_images=data.test.num_images, test_images_total=len(fold.test))
    return out
