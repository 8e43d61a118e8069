"""The recipe's augment section composed into one batch function, in the order AugmentCfg documents.

Contract: transform(source, idx, gen, epoch) -> float batch. `source` is the split's resident uint8 store
(N, H, W, C) on the training device and `idx` the batch's rows, so a fused kernel can do the gather in the same
pass as the crop (kernels/). Randomness comes only from `gen`, drawn in a fixed order, so a run is a function of
its seed and a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from fastcifar.augment import basic as B
from fastcifar.augment.color import color_jitter
from fastcifar.augment.geometry import random_rotation
from fastcifar.augment.mix import mix_batch
from fastcifar.augment.randaug import rand_augment, trivial_augment_wide
from fastcifar.kernels.crop_flip import fused_crop_flip_erase
from fastcifar.recipe import AugmentCfg

Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator, int], torch.Tensor]
Mixer = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _geometric(cfg: AugmentCfg, source: torch.Tensor, idx: torch.Tensor, gen: torch.Generator, epoch: int):
    """Gather + crop (+ flip when nothing sits between them) in one index_select, then translate / flip /
    rotation; draws in the order crop offsets, translate, flip, rotation."""
    pad = cfg.crop_padding
    oy, ox = B.crop_offsets(len(idx), pad, gen, source.device) if pad else (None, None)
    flip_in_gather = cfg.flip and not cfg.translate
    flip = _flips(cfg, idx, gen, epoch, source.device) if flip_in_gather else None
    x = B.gather_crop_flip(source, idx, oy, ox, flip, pad, cfg.crop_padding_mode)
    if cfg.translate:
        x = B.random_translate(x, cfg.translate, gen)
    if cfg.flip and not flip_in_gather:
        x = torch.where(_flips(cfg, idx, gen, epoch, x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    if cfg.rotation:
        x = random_rotation(x, cfg.rotation, gen)
    return x


def _flips(cfg: AugmentCfg, idx: torch.Tensor, gen: torch.Generator, epoch: int, device) -> torch.Tensor:
    return B.alternating_flip_mask(idx, epoch) if cfg.flip_mode == "alternate" else B.flip_mask(len(idx), 0.5, gen,
                                                                                                   device)


def _photometric(cfg: AugmentCfg, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if any(cfg.color_jitter):
        x = color_jitter(x, *cfg.color_jitter, gen)
    if cfg.randaugment:
        x = rand_augment(x, cfg.randaugment_num_ops, cfg.randaugment_magnitude, cfg.randaugment_num_bins, gen)
    elif cfg.trivialaugment:
        x = trivial_augment_wide(x, gen)
    return x


def _jitter(cfg: AugmentCfg, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return B.shift_jitter(x, *cfg.shift_jitter, gen) if any(cfg.shift_jitter) else x


def _erase(cfg: AugmentCfg, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Erasing / cutout write into x: it is always the normalise step's (or resize's) fresh output."""
    if cfg.erasing_p > 0:
        value = cfg.erasing_constant if cfg.erasing_value == "constant" else cfg.erasing_value
        x = B.random_erasing(x, cfg.erasing_p, cfg.erasing_scale, cfg.erasing_ratio, value, gen, inplace=True)
    if cfg.cutout:
        x = B.cutout(x, cfg.cutout, gen, inplace=True, inside=cfg.cutout_mode == "inside")
    return x


def fusable(cfg: AugmentCfg) -> bool:
    """Crop + flip + normalise + erasing/cutout is the hot path the fused kernel covers in one memory pass (and
    crop + flip + normalise then shift_jitter, which acts on the normalised batch, when nothing is erased)."""
    return not (cfg.translate or cfg.rotation or any(cfg.color_jitter) or cfg.randaugment or cfg.trivialaugment
                or cfg.resize or (any(cfg.shift_jitter) and (cfg.erasing_p > 0 or cfg.cutout)))


def _kernel_seed(gen: torch.Generator) -> int:
    """The fused kernel's noise seed, derived from the generator state (a host-side copy for CUDA generators: no
    sync), so the noise is a function of the run's seed and position and a resumed run redraws it exactly."""
    digest = hashlib.blake2b(gen.get_state().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)


def _fused(cfg: AugmentCfg, mean, std, dtype: torch.dtype) -> Transform:
    """Draw every parameter up front (crop offsets, flips, erasing box, cutout box), then one fused call: the
    Triton kernel on CUDA, its torch reference (the same ops as the unfused path) elsewhere."""
    kinds: list[str] = []
    if cfg.erasing_p > 0:
        kinds.append(cfg.erasing_value)
    if cfg.cutout:
        kinds.append("zero")
    consts = [cfg.erasing_constant] * (cfg.erasing_p > 0) + [(0.0, 0.0, 0.0)] * bool(cfg.cutout)
    fills: dict[torch.device, torch.Tensor] = {}

    def transform(source: torch.Tensor, idx: torch.Tensor, gen: torch.Generator, epoch: int = 0) -> torch.Tensor:
        b, h, w, c = len(idx), *source.shape[1:]
        dev, pad = source.device, cfg.crop_padding
        oy, ox = B.crop_offsets(b, pad, gen, dev) if pad else (torch.zeros(b, device=dev, dtype=torch.long),) * 2
        flip = _flips(cfg, idx, gen, epoch, dev) if cfg.flip else torch.zeros(b, device=dev, dtype=torch.bool)
        boxes = []
        if cfg.erasing_p > 0:
            apply = B._uniform(b, gen, dev) < cfg.erasing_p
            top, left, eh, ew, found = B.erasing_boxes(b, h, w, cfg.erasing_scale, cfg.erasing_ratio, gen, dev)
            boxes.append(torch.stack([top, left, eh * (apply & found), ew], 1))  # height 0 = no box
        if cfg.cutout:
            inside = cfg.cutout_mode == "inside"
            boxes.append(torch.stack(B.cutout_boxes(b, h, w, cfg.cutout, gen, dev, inside), 1))
        box_t = torch.stack(boxes, 1) if boxes else torch.zeros(b, 0, 4, device=dev, dtype=torch.long)
        if dev not in fills:  # once per device: a per-batch host-to-device copy would stall the CUDA stream
            fills[dev] = torch.tensor(consts, dtype=torch.float32).view(len(kinds), c).to(dev)
        fill = fills[dev]
        seed = _kernel_seed(gen) if source.is_cuda else 0
        x = fused_crop_flip_erase(source, idx, oy, ox, flip, box_t, kinds, fill, mean, std, padding=pad,
                                  mode=cfg.crop_padding_mode, out_dtype=dtype, gen=gen, seed=seed)
        return _jitter(cfg, x, gen)  # the normalised batch; fusable() keeps erasing / cutout off with it

    return transform


def build_train_transform(cfg: AugmentCfg, mean, std, dtype: torch.dtype = torch.float32) -> Transform:
    """(uint8 store, batch rows, generator, epoch) -> normalised float batch, NCHW channels-last."""
    if fusable(cfg):
        return _fused(cfg, mean, std, dtype)

    def transform(source: torch.Tensor, idx: torch.Tensor, gen: torch.Generator, epoch: int = 0) -> torch.Tensor:
        x = _photometric(cfg, _geometric(cfg, source, idx, gen, epoch), gen)
        return _erase(cfg, _jitter(cfg, _normalize_resize(cfg, x, mean, std, dtype), gen), gen)

    return transform


def _normalize_resize(cfg: AugmentCfg, x: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """On the CPU resize the uint8 batch, then normalise (torch's vectorised uint8 kernel: 20x the float one at
    32 -> 224, as the seed projects' PIL Resize before ToTensor); elsewhere normalise first and resize in the compute
    dtype (uint8 interpolation is CPU-only). The two orders differ by the uint8 rounding: < 1/255 per pixel."""
    if cfg.resize and x.device.type == "cpu":
        return B.normalize(B.resize(x, cfg.resize), mean, std, dtype)
    x = B.normalize(x, mean, std, dtype)
    return B.resize(x, cfg.resize) if cfg.resize else x


def build_eval_transform(cfg: AugmentCfg, mean, std, dtype: torch.dtype = torch.float32) -> Transform:
    def transform(source: torch.Tensor, idx: torch.Tensor, gen: torch.Generator | None = None,
                  epoch: int = 0) -> torch.Tensor:
        return _normalize_resize(cfg, source[idx].permute(0, 3, 1, 2), mean, std, dtype)

    return transform


def build_mixer(cfg: AugmentCfg, num_classes: int) -> Mixer | None:
    """MixUp / CutMix on the normalised batch, or None when both are off (targets stay class indices)."""
    if not (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0):
        return None

    def mixer(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return mix_batch(x, y, num_classes, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_p, cfg.mix_switch_p, gen)

    return mixer
