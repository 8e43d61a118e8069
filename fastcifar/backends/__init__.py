"""Input pipelines other than the device loader: the torchvision DataLoader fallback, NVIDIA DALI, FFCV.

BACKENDS is the table of them, one entry per train.loader kind: the library it needs, the check preflight runs
and the factory that builds its training loader (a fastcifar.loader.TrainLoader). Each entry imports its module
only when called, so neither DALI nor FFCV (nor torchvision's DataLoader path) is imported unless it is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from fastcifar.context import RunPlan
    from fastcifar.loader import TrainLoader
    from fastcifar.recipe import Recipe


@dataclass(frozen=True)
class Backend:
    library: str  # the module it needs (importlib.util.find_spec), part of the base install or an extra
    check: Callable[[Recipe], None]  # one-line RecipeError: the library missing, or an augment setting it lacks
    # make(images_nhwc_uint8, labels, batch_size, augment, mean, std, *, train, workers, seed, device,
    #      num_classes, [beton, indices]) -> TrainLoader
    make: Callable[..., TrainLoader]


def _check_torchvision(recipe: Recipe) -> None:
    from fastcifar.backends.torchvision import build_pil_transform

    build_pil_transform(recipe.augment, recipe.data.mean, recipe.data.std, train=True)


def _make_torchvision(*args: Any, **kwargs: Any) -> TrainLoader:
    from fastcifar.backends.torchvision import make_torchvision_loader

    return make_torchvision_loader(*args, **kwargs)


def _check_dali(recipe: Recipe) -> None:
    from fastcifar.backends.dali import refuse_inexact_draws, require_dali

    require_dali()
    refuse_inexact_draws(recipe.augment)


def _make_dali(*args: Any, **kwargs: Any) -> TrainLoader:
    from fastcifar.backends.dali import make_dali_loader

    return make_dali_loader(*args, **kwargs)


def _check_ffcv(recipe: Recipe) -> None:
    from fastcifar.backends.ffcv import refuse_alternating_flip, require_ffcv

    require_ffcv()
    refuse_alternating_flip(recipe.augment)


def _make_ffcv(*args: Any, **kwargs: Any) -> TrainLoader:
    from fastcifar.backends.ffcv import make_ffcv_loader

    return make_ffcv_loader(*args, **kwargs)


BACKENDS: dict[str, Backend] = {
    "torchvision": Backend("torchvision", _check_torchvision, _make_torchvision),
    "dali": Backend("nvidia.dali", _check_dali, _make_dali),
    "ffcv": Backend("ffcv", _check_ffcv, _make_ffcv),
}


def check_loader(recipe: Recipe) -> None:
    """Refuse, in one line, a train.loader whose library is missing or that cannot express the recipe's augment
    section; cheap, so preflight.check_inputs calls it before the run directory is touched."""
    backend = BACKENDS.get(recipe.train.loader)  # "device": the device loader takes every augment section
    if backend is None:
        return
    if any(recipe.augment.shift_jitter):
        from fastcifar.errors import RecipeError

        raise RecipeError(f'augment.shift_jitter: train.loader = "{recipe.train.loader}" has no such op (it acts on '
                          'the normalised batch); use train.loader = "device"')
    backend.check(recipe)


def fitted_workers(asked: int, kind: str, log: Callable[[str], Any] = print) -> int:
    """train.workers (DataLoader worker processes for "torchvision", DALI's and FFCV's CPU threads), fitted to
    the machine: FFCV's numba refuses more threads than cores, and more than the cores only contend."""
    cores = os.cpu_count() or 1
    if kind in ("dali", "ffcv") and asked > cores:
        log(f"train.workers: {asked} {kind.upper()} threads asked, this machine has {cores} cores: using {cores}")
        return cores
    return max(asked, 1) if kind in ("dali", "ffcv") else asked


def make_loader(plan: RunPlan, idx: np.ndarray, *, seed: int, log: Callable[[str], Any] = print) -> TrainLoader:
    """The training loader of kind plan.recipe.train.loader (a BACKENDS key) over rows `idx` of the store's
    [train ; test]. The plan's checks hold: the library is there, the augment section fits the loader
    (check_loader), the FFCV .beton matches the store. Evaluation stays on the device loader."""
    from fastcifar.loader import gather_images

    recipe, store = plan.recipe, plan.store
    kind = recipe.train.loader
    images = gather_images(store.train_images, store.test_images, idx)
    kwargs: dict[str, Any] = dict(train=True, workers=fitted_workers(recipe.train.workers, kind, log), seed=seed,
                                  device=plan.device, num_classes=len(store.classes))
    if plan.beton is not None:  # FFCV reads the fold's rows from the store's .beton
        kwargs.update(beton=plan.beton, indices=idx)
    return BACKENDS[kind].make(images, store.labels[idx], recipe.train.batch_size, recipe.augment,
                               recipe.data.mean, recipe.data.std, **kwargs)
