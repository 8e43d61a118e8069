"""Any timm model as `model.name = "timm:<name>"` (extra [timm]: pip install 'fastcifar[timm]'): built with the
store's number of classes through timm.create_model, random init or a local file (model.pretrained), never a
download; the trainer treats it like its own models (channels-last, compile, AMP, EMA, DDP, Grad-CAM)."""

from __future__ import annotations

import importlib
import importlib.util

import torch.nn as nn

from fastcifar.errors import RecipeError

PREFIX = "timm:"
MISSING = "needs timm, which is not installed: pip install 'fastcifar[timm]'"


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX) and len(name) > len(PREFIX)


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def timm_model(name: str, *, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0) -> nn.Module:
    if not timm_available():
        raise RecipeError(f"model.name: {name!r} {MISSING}")
    timm = importlib.import_module("timm")  # an optional extra: imported only when a recipe names a timm model
    arch = name[len(PREFIX):]
    if width:
        raise RecipeError(f"model.width: timm models have a fixed width (use 0), got {width}")
    if arch not in timm.list_models():
        raise RecipeError(f"model.name: timm {timm.__version__} has no model {arch!r} (see timm.list_models())")
    kwargs = dict(pretrained=False, num_classes=num_classes, drop_rate=dropout)
    try:  # vision transformers take the input size; convolutional nets do not know the argument
        return timm.create_model(arch, img_size=image_size, **kwargs)
    except TypeError:
        return timm.create_model(arch, **kwargs)
