"""Input pipelines other than the device loader: the torchvision DataLoader fallback, NVIDIA DALI, FFCV."""

from __future__ import annotations

import importlib
import os

import numpy as np
import torch

KINDS = ("torchvision", "dali", "ffcv")


def check_loader(recipe) -> None:
    """Refuse, in one line, a train.loader whose library is missing or that cannot express the recipe's augment
    section; cheap, so preflight.check_inputs calls it before the run directory is touched."""
    kind = recipe.train.loader
    if kind != "device" and any(recipe.augment.shift_jitter):
        from fastcifar.errors import RecipeError

        raise RecipeError(f'augment.shift_jitter: train.loader = "{kind}" has no such op (it acts on the normalised '
                          'batch); use train.loader = "device"')
    if kind == "torchvision":
        from fastcifar.backends.torchvision import build_pil_transform

        build_pil_transform(recipe.augment, recipe.data.mean, recipe.data.std, train=True)
    elif kind == "dali":
        from fastcifar.backends.dali import refuse_inexact_draws, require_dali

        require_dali()
        refuse_inexact_draws(recipe.augment)
    elif kind == "ffcv":
        from fastcifar.backends.ffcv import refuse_alternating_flip, require_ffcv

        require_ffcv()
        refuse_alternating_flip(recipe.augment)


def fitted_workers(asked: int, kind: str, log=print) -> int:
    """train.workers (DataLoader worker processes for "torchvision", DALI's and FFCV's CPU threads), fitted to
    the machine: FFCV's numba refuses more threads than cores, and more than the cores only contend."""
    cores = os.cpu_count() or 1
    if kind in ("dali", "ffcv") and asked > cores:
        log(f"train.workers: {asked} {kind.upper()} threads asked, this machine has {cores} cores: using {cores}")
        return cores
    return max(asked, 1) if kind in ("dali", "ffcv") else asked


def make_loader(recipe, store, idx: np.ndarray, labels: np.ndarray, device: torch.device, *, seed: int,
                log=print):
    """The training loader of kind recipe.train.loader over rows `idx` of the store's [train ; test] (labels:
    all of them), meeting DeviceLoader's contract. Evaluation stays on the device loader."""
    from fastcifar.loader import gather_images

    kind = recipe.train.loader
    if kind not in KINDS:
        raise ValueError(f"unknown loader {kind!r}")  # the recipe's Literal type admits only KINDS + "device"
    check_loader(recipe)
    images = gather_images(store.train_images, store.test_images, idx)
    module = importlib.import_module(f"fastcifar.backends.{kind}")
    workers = fitted_workers(recipe.train.workers, kind, log)
    kwargs = dict(train=True, workers=workers, seed=seed, device=device, num_classes=len(store.classes))
    if kind == "ffcv":
        kwargs.update(beton=module.check_beton(module.default_beton(store.path), store), indices=idx)
    make = getattr(module, f"make_{kind}_loader")
    return make(images, labels[idx], recipe.train.batch_size, recipe.augment, recipe.data.mean, recipe.data.std,
                **kwargs)
