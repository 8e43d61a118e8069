"""Model registry: name -> builder(num_classes=, image_size=, width=, dropout=) -> nn.Module."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..errors import RecipeError
from .resnet import efficientnet_b2, load_pretrained, resnet9, resnet18, resnet34, tv_resnet18, tv_resnet34
from .small import cnn, cnn_bn, mlp, softmax
from .speedrun import speedrun_net

MODELS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f for f in (softmax, mlp, cnn, cnn_bn, resnet9, resnet18, resnet34,
                            tv_resnet18, tv_resnet34, efficientnet_b2, speedrun_net)
}


def model_names() -> list[str]:
    return list(MODELS)


def create_model(name: str, *, num_classes: int = 10, image_size: int = 32, width: int = 0,
                 dropout: float = 0.0, pretrained: str = "") -> nn.Module:
    """Build a registered model; `pretrained` is a local state-dict file ("" = random init), never a download."""
    if name not in MODELS:
        raise RecipeError(f"model.name: unknown model {name!r} (choose from {', '.join(MODELS)})")
    if width < 0:
        raise RecipeError(f"model.width: must be >= 0 (0 = default), got {width}")
    if not 0.0 <= dropout < 1.0:
        raise RecipeError(f"model.dropout: must be in [0, 1), got {dropout}")
    model = MODELS[name](num_classes=num_classes, image_size=image_size, width=width, dropout=dropout)
    if pretrained:
        load_pretrained(model, pretrained, name)
    return model
