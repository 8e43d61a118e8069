"""Small baselines: softmax regression, an MLP, the classic TF/Keras tutorial CNN and a lean BatchNorm CNN.

Every builder takes the same keyword arguments (num_classes, image_size, width, dropout) so the
registry can call them uniformly; width=0 means the model's default width.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import RecipeError


def no_width(name: str, width: int) -> None:
    """Refuse a width for a model that has none, rather than silently ignoring the user's setting."""
    if width:
        raise RecipeError(f"model.width: {name} has a fixed width (use 0, got {width})")


def softmax(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0) -> nn.Module:
    """Softmax regression: a single linear map from raw pixels to logits (the loss applies the softmax)."""
    no_width("softmax", width)
    return nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(3 * image_size * image_size, num_classes))


def mlp(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0) -> nn.Module:
    """Two hidden layers (default 512 and 256); width sets the first, the second is half of it."""
    h1 = width or 512
    h2 = max(h1 // 2, 1)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * image_size * image_size, h1), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(h1, h2), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(h2, num_classes),
    )


def cnn(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0) -> nn.Module:
    """The TensorFlow CIFAR tutorial CNN (conv 32-64-64); width scales the 32 base.

    The tutorial flattens a 4x4 map at 32 px; AdaptiveAvgPool2d(4) keeps the head's shape fixed so
    other image sizes work with the same Linear layer.
    """
    w = width or 32
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(2 * w * 16, 2 * w), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(2 * w, num_classes),
    )


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm shift that follows makes it redundant (and it costs time on CPU).
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def cnn_bn(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0) -> nn.Module:
    """The quickstart model: three [conv-BN-ReLU x2, maxpool] stages of w, 2w, 4w channels, GAP, Linear.

    Kept lean (~0.29 M parameters at w=32) so a few epochs run in minutes on two CPU cores.
    """
    w = width or 32
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in (w, 2 * w, 4 * w):
        layers += _conv_bn(c_in, c_out) + _conv_bn(c_out, c_out) + [nn.MaxPool2d(2)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)
