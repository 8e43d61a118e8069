"""Batched augmentation: pure functions on (B, C, H, W) tensors with per-sample randomness from an explicit
torch.Generator, on any device. Images stay uint8 until the one normalise-and-cast step; semantics follow
torchvision.transforms.v2 (the tests compare against it sample by sample).

Modules: basic (crop, translate, flips, normalise, resize, erasing, cutout), geometry (rotation and the affine
ops of RandAugment), color (ColorJitter and the colour ops), randaug (RandAugment, TrivialAugmentWide), mix
(MixUp, CutMix, soft-target loss), pipeline (the recipe's augment section as one function).
"""

from fastcifar.augment.basic import (alternating_flip, crop_with_offsets, cutout, erasing_boxes, hflip, normalize,
                                     random_crop, random_erasing, random_translate, resize)
from fastcifar.augment.pipeline import build_eval_transform, build_mixer, build_train_transform

__all__ = ["alternating_flip", "build_eval_transform", "build_mixer", "build_train_transform", "crop_with_offsets",
           "cutout", "erasing_boxes", "hflip", "normalize", "random_crop", "random_erasing", "random_translate",
           "resize"]
