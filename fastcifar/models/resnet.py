"""ResNets and EfficientNet, plus loading of local pretrained weights (never downloaded).

The CIFAR-stem ResNet-18/34 reuse torchvision's implementation and only swap the stem, so their
state-dict keys match torchvision's and ImageNet-trained backbones can be inspected side by side.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
import torchvision.models as tvm

from ..errors import CheckpointError
from .small import no_width


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class Residual(nn.Module):
    """x + f(x), with f two conv-BN-ReLU blocks at constant width (the Myrtle residual)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res(x)


class Scale(nn.Module):
    """Multiply by a constant: ResNet-9 scales its logits by 0.125 so the initial softmax is not saturated."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def resnet9(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0) -> nn.Module:
    """The DAWNBench (Myrtle.ai) ResNet-9; width scales the 64-channel base (64-128-256-512)."""
    w = width or 64
    return nn.Sequential(OrderedDict([
        ("prep", _conv_bn(3, w)),
        ("layer1", nn.Sequential(_conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w))),
        ("layer2", nn.Sequential(_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))),
        ("layer3", nn.Sequential(_conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w))),
        ("pool", nn.AdaptiveMaxPool2d(1)),
        ("flatten", nn.Flatten()),
        ("dropout", nn.Dropout(dropout)),  # parameter-free, so it never shifts state-dict keys
        ("fc", nn.Linear(8 * w, num_classes, bias=False)),
        ("scale", Scale(0.125)),
    ]))


def _add_dropout(model: tvm.ResNet, dropout: float) -> tvm.ResNet:
    # Dropout goes after the (parameter-free) avgpool, not into fc, so fc.* keys stay torchvision's.
    if dropout:
        model.avgpool = nn.Sequential(model.avgpool, nn.Dropout(dropout))
    return model


def _cifar_stem(model: tvm.ResNet) -> tvm.ResNet:
    # 32-px input: a 3x3 stride-1 stem and no max-pool keep the 32x32 map that a 7x7/2 + pool would cut to 8x8.
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def resnet18(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0) -> nn.Module:
    no_width("resnet18", width)
    return _add_dropout(_cifar_stem(tvm.resnet18(weights=None, num_classes=num_classes)), dropout)


def resnet34(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0) -> nn.Module:
    no_width("resnet34", width)
    return _add_dropout(_cifar_stem(tvm.resnet34(weights=None, num_classes=num_classes)), dropout)


def tv_resnet18(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0) -> nn.Module:
    no_width("tv_resnet18", width)
    return _add_dropout(tvm.resnet18(weights=None, num_classes=num_classes), dropout)


def tv_resnet34(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0) -> nn.Module:
    no_width("tv_resnet34", width)
    return _add_dropout(tvm.resnet34(weights=None, num_classes=num_classes), dropout)


def efficientnet_b2(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0) -> nn.Module:
    no_width("efficientnet_b2", width)
    return tvm.efficientnet_b2(weights=None, num_classes=num_classes, dropout=dropout)


# ---------------------------------------------------------------------------------------------
# Pretrained weights from a local file.


def _weights_only_reason(err: Exception) -> str:
    """The one informative line of torch's multi-paragraph weights-only error."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln.split("WeightsUnpickler error:")[-1].strip().rstrip(".")
    return lines[-1] if lines else type(err).__name__


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a state dict (bare, or under "model"/"state_dict") without ever unpickling code."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: not found")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a file")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _weights_only_reason(err)
        if "GLOBAL" in reason:  # a class or function reference: the policy, not corruption, refused it
            raise CheckpointError(f"{path}: refused by weights-only loading ({reason})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    except Exception as err:  # truncated zip, EOF, ...: torch raises many types for a bad file
        first = (str(err).splitlines() or [""])[0][:120]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not (isinstance(obj, dict) and obj
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise CheckpointError(f"{path}: not a state dict")
    # Weights saved from DataParallel or torch.compile carry a wrapper prefix on every key.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def _head_prefix(model: nn.Module) -> str:
    """The classifier is the last Linear layer (fc, classifier.1, or a Sequential index)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] + "." if names else "\0"


def _listing(label: str, keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit]) + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{label}: {shown}"


def load_pretrained(model: nn.Module, path: str, name: str) -> None:
    """Load local weights into `model`; a classifier of another class count is dropped, all else must fit."""
    state = read_state_dict(path)
    own = model.state_dict()
    head = _head_prefix(model)
    head_differs = any(k.startswith(head) and k in own and v.shape != own[k].shape for k, v in state.items())
    if head_differs:  # e.g. ImageNet's 1000-way fc: keep the freshly initialised head instead
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    # num_batches_tracked is a counter, absent from older torchvision files; BatchNorm fills it in.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
               and not (head_differs and k.startswith(head))]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    problems = [_listing(label, keys) for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)) if keys]
    if problems:
        raise CheckpointError(f"{path}: does not fit {name} ({'; '.join(problems)})")
    model.load_state_dict(state, strict=False)  # everything was checked above; strict would reject the dropped head
