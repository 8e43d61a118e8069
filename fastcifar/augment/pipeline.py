"""The recipe's augment section composed into one batch function, in the order AugmentCfg documents.

Contract: transform(source, idx, gen, epoch) -> float batch. `source` is the split's resident uint8 store
(N, H, W, C) on the training device and `idx` the batch's rows, so a fused kernel can do the gather in the same
pass as the crop (kernels/). Randomness comes only from `gen`, drawn in a fixed order, so a run is a function of
its seed and a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastcifar.augment import basic as B
from fastcifar.recipe import AugmentCfg

Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator, int], torch.Tensor]
Mixer = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _geometric(cfg: AugmentCfg, x: torch.Tensor, idx: torch.Tensor, gen: torch.Generator, epoch: int):
    if cfg.crop_padding:
        x = B.random_crop(x, cfg.crop_padding, gen, cfg.crop_padding_mode)
    if cfg.translate:
        x = B.random_translate(x, cfg.translate, gen)
    if cfg.flip:
        x = B.alternating_flip(x, idx, epoch) if cfg.flip_mode == "alternate" else B.hflip(x, 0.5, gen)
    if cfg.rotation:
        from fastcifar.augment.geometry import random_rotation

        x = random_rotation(x, cfg.rotation, gen)
    return x


def _photometric(cfg: AugmentCfg, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if any(cfg.color_jitter):
        from fastcifar.augment.color import color_jitter

        x = color_jitter(x, *cfg.color_jitter, gen)
    if cfg.randaugment:
        from fastcifar.augment.randaug import rand_augment

        x = rand_augment(x, cfg.randaugment_num_ops, cfg.randaugment_magnitude, cfg.randaugment_num_bins, gen)
    elif cfg.trivialaugment:
        from fastcifar.augment.randaug import trivial_augment_wide

        x = trivial_augment_wide(x, gen)
    return x


def _erase(cfg: AugmentCfg, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if cfg.erasing_p > 0:
        value = cfg.erasing_constant if cfg.erasing_value == "constant" else cfg.erasing_value
        x = B.random_erasing(x, cfg.erasing_p, cfg.erasing_scale, cfg.erasing_ratio, value, gen)
    if cfg.cutout:
        x = B.cutout(x, cfg.cutout, gen)
    return x


def build_train_transform(cfg: AugmentCfg, mean, std, dtype: torch.dtype = torch.float32) -> Transform:
    """(uint8 store, batch rows, generator, epoch) -> normalised float batch, NCHW channels-last."""

    def transform(source: torch.Tensor, idx: torch.Tensor, gen: torch.Generator, epoch: int = 0) -> torch.Tensor:
        x = source[idx].permute(0, 3, 1, 2)  # NCHW view of NHWC rows = channels-last
        x = _photometric(cfg, _geometric(cfg, x, idx, gen, epoch), gen)
        x = B.normalize(x, mean, std, dtype)
        if cfg.resize:
            x = B.resize(x, cfg.resize)
        return _erase(cfg, x, gen)

    return transform


def build_eval_transform(cfg: AugmentCfg, mean, std, dtype: torch.dtype = torch.float32) -> Transform:
    def transform(source: torch.Tensor, idx: torch.Tensor, gen: torch.Generator | None = None,
                  epoch: int = 0) -> torch.Tensor:
        x = B.normalize(source[idx].permute(0, 3, 1, 2), mean, std, dtype)
        return B.resize(x, cfg.resize) if cfg.resize else x

    return transform


def build_mixer(cfg: AugmentCfg, num_classes: int) -> Mixer | None:
    """MixUp / CutMix on the normalised batch, or None when both are off (targets stay class indices)."""
    if not (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0):
        return None
    from fastcifar.augment.mix import mix_batch

    def mixer(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return mix_batch(x, y, num_classes, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_p, cfg.mix_switch_p, gen)

    return mixer
