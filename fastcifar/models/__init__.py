"""Model registry: name -> ModelEntry (its builder, and what the model needs and supports), as timm's model
entries do, so the trainer and the pre-run checks ask the entry instead of testing names.

    create_model(name, ...)                          a registered model (timm-style verb), random init or a file
    build_model(recipe, num_classes, image_size, device)   the recipe's model, on the device, in its layout
    model_entry(name)                                what the model needs (data init) and supports (sync BN, ...)
    model_options(recipe.model)                      the recipe's values of the model's own options (its entry's)
    init_from_data(name, model, images, mean, std)   the entry's data-dependent init (a no-op for most)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import RecipeError
from .resnet import efficientnet_b2, load_pretrained, resnet9, resnet18, resnet34, tv_resnet18, tv_resnet34
from .small import cnn, cnn_bn, mlp, softmax
from .speedrun import fit_whitening, speedrun_net, speedrun_net95, speedrun_net96
from .speedrun import set_whiten_bias as set_whiten_bias  # re-exported for train.py
from .timm_models import is_timm, timm_model

# init(model, uint8 (N, H, W, 3) training images on the device, mean, std): run once, before training.
DataInit = Callable[[nn.Module, torch.Tensor, Sequence[float], Sequence[float]], None]


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[..., nn.Module]  # builder(num_classes=, image_size=, width=, dropout=)
    data_init: DataInit | None = None  # fitted to the fold's training images before training (speedrun nets)
    whiten_bias: bool = False  # has a whitening layer whose bias model.whiten_bias_epochs may freeze
    # train.sync_bn leaves it intact: convert_sync_batchnorm rebuilds every BatchNorm as a plain SyncBatchNorm,
    # which would drop ShiftBatchNorm's fixed scale and scaled shift
    sync_bn: bool = True
    # Built only of convolutions, BatchNorm, linear, pooling and pointwise layers (tests/test_models.py checks
    # it): torch.func can stack several copies into one model (stack_module_state + vmap)
    stackable: bool = False
    # The model section's keys this model's builder takes (beyond the size), with their defaults: a recipe value
    # other than the default is passed to the builder; any other model refuses a non-default value (recipe check)
    options: Mapping[str, Any] = field(default_factory=dict)


# The speedrun nets' own model keys (fastcifar.models.speedrun: ConvGroup, PatchWhitening, ShiftBatchNorm)
SPEEDRUN_OPTIONS = {"activation": "gelu", "whiten_init": "eigh", "bn_momentum": 0.4, "bias_lr_scale": 64.0}

_PLAIN = dict(stackable=True)
_SPEEDRUN = dict(data_init=fit_whitening, whiten_bias=True, sync_bn=False, stackable=True, options=SPEEDRUN_OPTIONS)
MODELS: dict[str, ModelEntry] = {
    "softmax": ModelEntry(softmax, **_PLAIN),
    "mlp": ModelEntry(mlp, **_PLAIN),
    "cnn": ModelEntry(cnn, **_PLAIN),
    "cnn_bn": ModelEntry(cnn_bn, **_PLAIN),
    "resnet9": ModelEntry(resnet9, **_PLAIN),
    "resnet18": ModelEntry(resnet18, **_PLAIN),
    "resnet34": ModelEntry(resnet34, **_PLAIN),
    "tv_resnet18": ModelEntry(tv_resnet18, **_PLAIN),
    "tv_resnet34": ModelEntry(tv_resnet34, **_PLAIN),
    "efficientnet_b2": ModelEntry(efficientnet_b2),  # stochastic depth draws per sample
    "speedrun_net": ModelEntry(speedrun_net, **_SPEEDRUN),
    "speedrun_net95": ModelEntry(speedrun_net95, **_SPEEDRUN),
    "speedrun_net96": ModelEntry(speedrun_net96, **_SPEEDRUN),
}


def model_names() -> list[str]:
    return list(MODELS)


def known_model(name: str) -> bool:
    """A registered model, or "timm:<name>" (checked against timm's own list when the model is built)."""
    return name in MODELS or is_timm(name)


def model_entry(name: str) -> ModelEntry:
    """The entry of a known model (known_model(name)); KeyError otherwise. Of a "timm:<name>" model nothing is
    known before it is built: the defaults."""
    return ModelEntry(partial(timm_model, name)) if is_timm(name) else MODELS[name]


def option_defaults() -> dict[str, Any]:
    """Every model-section key some registered model takes as an option (ModelEntry.options), with its default."""
    return {k: v for entry in MODELS.values() for k, v in entry.options.items()}


def models_taking(key: str) -> list[str]:
    """The registered models whose builder takes model-section key `key`."""
    return [name for name, entry in MODELS.items() if key in entry.options]


def model_options(model_cfg) -> dict[str, Any]:
    """The options of the recipe's model section (a fastcifar.recipe.ModelCfg) its model takes, where they differ
    from the model's defaults: what create_model passes to the builder."""
    entry = model_entry(model_cfg.name)
    return {k: getattr(model_cfg, k) for k, default in entry.options.items() if getattr(model_cfg, k) != default}


def create_model(name: str, *, num_classes: int = 10, image_size: int = 32, width: int = 0,
                 dropout: float = 0.0, pretrained: str = "", **options: Any) -> nn.Module:
    """Build a registered model; `pretrained` is a local state-dict file ("" = random init), never a download.
    `options`: the model's own choices (its ModelEntry.options; the speedrun nets': SPEEDRUN_OPTIONS)."""
    if not known_model(name):
        raise RecipeError(f"model.name: unknown model {name!r} (choose from {', '.join(MODELS)}, or timm:<name>)")
    if width < 0:
        raise RecipeError(f"model.width: must be >= 0 (0 = default), got {width}")
    if not 0.0 <= dropout < 1.0:
        raise RecipeError(f"model.dropout: must be in [0, 1), got {dropout}")
    entry = model_entry(name)
    for key in options:
        if key not in entry.options:
            raise RecipeError(f"model.{key}: {name} has no such option")
    size = dict(num_classes=num_classes, image_size=image_size, width=width, dropout=dropout)
    model = entry.build(**size, **options)
    if pretrained:
        load_pretrained(model, pretrained, name)
    return model


def build_model(recipe, num_classes: int, image_size: int, device: torch.device, pretrained: bool = True) -> nn.Module:
    """The model of `recipe` (a fastcifar.recipe.Recipe: the registry does not import the recipe module, which
    imports it) on `device`; `image_size` is the stored size (augment.resize, when set, wins)."""
    m = recipe.model
    model = create_model(m.name, num_classes=num_classes, image_size=recipe.augment.resize or image_size,
                         width=m.width, dropout=m.dropout, pretrained=m.pretrained if pretrained else "",
                         **model_options(m))
    # channels-last matches the loader's NHWC batches and is the fast conv layout on CUDA and oneDNN.
    return model.to(device, memory_format=torch.channels_last if recipe.train.channels_last else
                    torch.contiguous_format)


def init_from_data(name: str, model: nn.Module, images: torch.Tensor, mean: Sequence[float],
                   std: Sequence[float]) -> None:
    """The entry's data-dependent initialisation of model `name` (nothing for most models)."""
    init = model_entry(name).data_init
    if init is not None:
        init(model, images, mean, std)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier head: parameters of the last nn.Linear (fc of the ResNets, classifier.1 of EfficientNet)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return list(linears[-1].parameters()) if linears else []
