"""Model registry: name -> builder(num_classes=, image_size=, width=, dropout=) -> nn.Module, and, for models
that fit part of themselves to the training data before training (speedrun_net's whitening layer), that hook.

    create_model(name, ...)                          a registered model (timm-style verb), random init or a file
    build_model(recipe, num_classes, image_size, device)   the recipe's model, on the device, in its layout
    init_from_data(name, model, images, mean, std)   the registry's data-dependent init (a no-op for most)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..errors import RecipeError
from .resnet import efficientnet_b2, load_pretrained, resnet9, resnet18, resnet34, tv_resnet18, tv_resnet34
from .small import cnn, cnn_bn, mlp, softmax
from .speedrun import fit_whitening, speedrun_net, speedrun_net95, speedrun_net96
from .speedrun import set_whiten_bias as set_whiten_bias  # re-exported for train.py
from .timm_models import is_timm, timm_model

MODELS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f for f in (softmax, mlp, cnn, cnn_bn, resnet9, resnet18, resnet34,
                            tv_resnet18, tv_resnet34, efficientnet_b2, speedrun_net, speedrun_net95, speedrun_net96)
}


# name -> init(model, uint8 (N, H, W, 3) training images on the device, mean, std): run once, before training.
DATA_INIT: dict[str, Callable[[nn.Module, torch.Tensor, Sequence[float], Sequence[float]], None]] = {
    "speedrun_net": fit_whitening,
    "speedrun_net95": fit_whitening,
    "speedrun_net96": fit_whitening,
}


# model section keys only the speedrun nets take, with their defaults (a non-default one is passed to the builder)
SPEEDRUN_OPTIONS = {"activation": "gelu", "whiten_init": "eigh", "bn_momentum": 0.4, "bias_lr_scale": 64.0}


def model_names() -> list[str]:
    return list(MODELS)


def known_model(name: str) -> bool:
    """A registered model, or "timm:<name>" (checked against timm's own list when the model is built)."""
    return name in MODELS or is_timm(name)


def create_model(name: str, *, num_classes: int = 10, image_size: int = 32, width: int = 0,
                 dropout: float = 0.0, pretrained: str = "", **options: str) -> nn.Module:
    """Build a registered model; `pretrained` is a local state-dict file ("" = random init), never a download.
    `options`: a model's own choices (the speedrun nets': SPEEDRUN_OPTIONS)."""
    if not known_model(name):
        raise RecipeError(f"model.name: unknown model {name!r} (choose from {', '.join(MODELS)}, or timm:<name>)")
    if width < 0:
        raise RecipeError(f"model.width: must be >= 0 (0 = default), got {width}")
    if not 0.0 <= dropout < 1.0:
        raise RecipeError(f"model.dropout: must be in [0, 1), got {dropout}")
    size = dict(num_classes=num_classes, image_size=image_size, width=width, dropout=dropout)
    model = timm_model(name, **size) if is_timm(name) else MODELS[name](**size, **options)
    if pretrained:
        load_pretrained(model, pretrained, name)
    return model


def build_model(recipe, num_classes: int, image_size: int, device: torch.device, pretrained: bool = True) -> nn.Module:
    """The model of `recipe` (a fastcifar.recipe.Recipe: the registry does not import the recipe module, which
    imports it) on `device`; `image_size` is the stored size (augment.resize, when set, wins)."""
    m = recipe.model
    options = {k: getattr(m, k) for k in SPEEDRUN_OPTIONS if getattr(m, k) != SPEEDRUN_OPTIONS[k]}
    model = create_model(m.name, num_classes=num_classes, image_size=recipe.augment.resize or image_size,
                         width=m.width, dropout=m.dropout, pretrained=m.pretrained if pretrained else "", **options)
    # channels-last matches the loader's NHWC batches and is the fast conv layout on CUDA and oneDNN.
    return model.to(device, memory_format=torch.channels_last if recipe.train.channels_last else
                    torch.contiguous_format)


def init_from_data(name: str, model: nn.Module, images: torch.Tensor, mean: Sequence[float],
                   std: Sequence[float]) -> None:
    """The registered data-dependent initialisation of model `name` (nothing for most models)."""
    hook = DATA_INIT.get(name)
    if hook is not None:
        hook(model, images, mean, std)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier head: parameters of the last nn.Linear (fc of the ResNets, classifier.1 of EfficientNet)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return list(linears[-1].parameters()) if linears else []
