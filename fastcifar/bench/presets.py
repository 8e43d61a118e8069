"""The augmentation presets every loader is timed on, as recipe augment sections (AugmentCfg).

The RandAugment presets follow seed 000 (flip + RandAugment(2, 9) + RandomErasing(0.25), no padded crop); the last
one adds its 224-px resize, so it is the seed's whole input pipeline.
"""

from __future__ import annotations

import importlib.util

from fastcifar.recipe import AugmentCfg

_RA = dict(flip=True, crop_padding=0, randaugment=True, randaugment_num_ops=2, randaugment_magnitude=9,
           erasing_p=0.25)

PRESETS: dict[str, AugmentCfg] = {
    "none": AugmentCfg(flip=False, crop_padding=0),
    "crop+flip": AugmentCfg(flip=True, crop_padding=4),
    "crop+flip+erasing": AugmentCfg(flip=True, crop_padding=4, erasing_p=0.25),
    "randaugment+erasing": AugmentCfg(**_RA),
    "randaugment+erasing+resize224": AugmentCfg(**_RA, resize=224),
}


def missing_ops(cfg: AugmentCfg) -> str | None:
    """Why fastcifar's batched pipeline cannot run this section yet (a module still being written), else None."""
    needs = []
    if cfg.randaugment or cfg.trivialaugment:
        needs.append("fastcifar.augment.randaug")
    if any(cfg.color_jitter):
        needs.append("fastcifar.augment.color")
    if cfg.rotation:
        needs.append("fastcifar.augment.geometry")
    if cfg.mixup_alpha or cfg.cutmix_alpha:
        needs.append("fastcifar.augment.mix")
    absent = [m for m in needs if importlib.util.find_spec(m) is None]
    return f"n/a (not available: {', '.join(absent)} missing)" if absent else None
