"""Batched RandAugment and TrivialAugmentWide: every sample draws its own ops, magnitudes and signs.

torchvision.transforms.v2 draws one op per call, so applied to a batch it gives every image the same op; here a
(B,) op id, bin and sign are drawn per op slot, and each op runs once on the samples that chose it (the five
geometric ops as one batched affine warp). Op ids follow torchvision's op order, magnitudes its tables (built with
the same float32 linspace, so e.g. RandAugment's shear at bin 9 of 31 is 0.09000000357627869, not 0.09); fill 0,
nearest interpolation (both transforms' defaults).
"""

from __future__ import annotations

import functools

from typing import Callable

import torch

from fastcifar.augment import color as C
from fastcifar.augment.geometry import affine_nearest, autoaugment_matrices

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
NUM_OPS = len(OPS)
SIGNED = (False, True, True, True, True, True, True, True, True, True, False, False, False, False)
_FIRST_GEOMETRIC = 1  # ShearX .. Rotate (ids 1-5) are one batched affine warp


def magnitude_table(wide: bool, num_bins: int, h: int, w: int) -> torch.Tensor:
    """(NUM_OPS, num_bins) float64 unsigned magnitudes: RandAugment's space, or TrivialAugmentWide's if `wide`.
    Rows of parameter-free ops are 0."""
    def lin(hi: float, lo: float = 0.0) -> torch.Tensor:
        return torch.linspace(lo, hi, num_bins)

    if wide:
        shear, tx, ty, rot, colour, post_span = lin(0.99), lin(32.0), lin(32.0), lin(135.0), lin(0.99), 6
    else:
        shear, tx, ty, rot, colour = lin(0.3), lin(150.0 / 331.0 * w), lin(150.0 / 331.0 * h), lin(30.0), lin(0.9)
        post_span = 4
    bits = (8 - (torch.arange(num_bins) / ((num_bins - 1) / post_span))).round().int()
    zero = torch.zeros(num_bins)
    rows = [zero, shear, shear, tx, ty, rot, colour, colour, colour, colour, bits, lin(0.0, 1.0), zero, zero]
    return torch.stack([r.to(torch.float64) for r in rows])


@functools.lru_cache(maxsize=8)
def _signed_mask(device: torch.device) -> torch.Tensor:
    return torch.tensor(SIGNED, device=device)  # cached: a per-batch host-to-device copy stalls the CUDA stream


@functools.lru_cache(maxsize=32)
def _device_table(wide: bool, num_bins: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    return magnitude_table(wide, num_bins, h, w).to(device, C.wide_dtype(device))  # cached, as above


def signed_magnitudes(table: torch.Tensor, op_ids: torch.Tensor, bins: torch.Tensor,
                      negate: torch.Tensor) -> torch.Tensor:
    """Per-sample magnitude table[op, bin], negated where `negate` and the op is a signed one."""
    table = table.to(op_ids.device, C.wide_dtype(op_ids.device))
    signed = _signed_mask(op_ids.device)[op_ids]
    mag = table[op_ids, bins]
    return torch.where(signed & negate, -mag, mag)


def _affine(xs: torch.Tensor, rows: torch.Tensor, op_ids: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    h, w = xs.shape[-2:]
    return affine_nearest(xs, autoaugment_matrices(op_ids[rows] - _FIRST_GEOMETRIC, mags[rows], h, w))


def apply_ops(x: torch.Tensor, op_ids: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Apply op op_ids[i] (an index into OPS) with signed float64 magnitude magnitudes[i] to sample i, as
    torchvision's _AutoAugmentBase._apply_image_or_video_transform does to one image."""
    def factor(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> C.GroupFn:
        return lambda xs, rows: op(xs, 1.0 + magnitudes[rows])  # the colour ops take 1 + magnitude

    fns = [None,  # Identity
           lambda xs, rows: _affine(xs, rows, op_ids, magnitudes),
           factor(C.adjust_brightness), factor(C.adjust_saturation), factor(C.adjust_contrast),
           factor(C.adjust_sharpness),
           lambda xs, rows: C.posterize(xs, magnitudes[rows].long()),  # int(magnitude)
           lambda xs, rows: C.solarize(xs, 255.0 * magnitudes[rows]),
           lambda xs, rows: C.autocontrast(xs),
           lambda xs, rows: C.equalize(xs)]
    # Op id -> kernel: 0 -> 0, the five geometric ops -> 1, the eight others -> 2..9.
    kernel = (op_ids - 4).clamp(min=_FIRST_GEOMETRIC)
    kernel = torch.where(op_ids == 0, 0, kernel)
    return C.apply_grouped(x, kernel, fns)


def _draw(b: int, num_bins: int, gen: torch.Generator, device) -> tuple[torch.Tensor, ...]:
    """One slot's per-sample (op id, bin, negate); all three drawn for every sample so the stream position
    does not depend on the ops chosen."""
    op_ids = torch.randint(NUM_OPS, (b,), generator=gen, device=device)
    bins = torch.randint(num_bins, (b,), generator=gen, device=device)
    negate = torch.rand(b, generator=gen, device=device) <= 0.5  # torchvision: `if rand() <= 0.5: negate`
    return op_ids, bins, negate


def draw_rand_augment(b: int, num_ops: int, magnitude: int, num_bins: int, h: int, w: int,
                      gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(op ids, signed magnitudes), each (num_ops, B): RandAugment's per-sample draws, fixed bin `magnitude`."""
    table = _device_table(False, num_bins, h, w, torch.device(device))
    ops, mags = [], []
    for _ in range(num_ops):
        op_ids, _, negate = _draw(b, num_bins, gen, device)
        ops.append(op_ids)
        mags.append(signed_magnitudes(table, op_ids, torch.full_like(op_ids, magnitude), negate))
    if not ops:
        empty = torch.empty(0, b, device=device)
        return empty.long(), empty.to(C.wide_dtype(device))
    return torch.stack(ops), torch.stack(mags)


def rand_augment(x: torch.Tensor, num_ops: int, magnitude: int, num_bins: int, gen: torch.Generator) -> torch.Tensor:
    """v2.RandAugment(num_ops, magnitude, num_magnitude_bins=num_bins) with per-sample op choice and signs."""
    ops, mags = draw_rand_augment(x.shape[0], num_ops, magnitude, num_bins, *x.shape[-2:], gen, x.device)
    for op_ids, m in zip(ops, mags):
        x = apply_ops(x, op_ids, m)
    return x


def draw_trivial_augment(b: int, num_bins: int, h: int, w: int, gen: torch.Generator,
                         device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(op ids, bins, signed magnitudes), each (B,): TrivialAugmentWide's per-sample draws."""
    op_ids, bins, negate = _draw(b, num_bins, gen, device)
    return op_ids, bins, signed_magnitudes(_device_table(True, num_bins, h, w, torch.device(device)), op_ids, bins, negate)


def trivial_augment_wide(x: torch.Tensor, gen: torch.Generator, num_bins: int = 31) -> torch.Tensor:
    """v2.TrivialAugmentWide(num_bins): one op per sample at a uniform bin, random sign."""
    op_ids, _, mags = draw_trivial_augment(x.shape[0], num_bins, *x.shape[-2:], gen, x.device)
    return apply_ops(x, op_ids, mags)
