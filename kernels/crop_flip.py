"""Fused gather + padded crop + flip + normalise + box fills for the training batch: one pass over memory.

The unfused path (fastcifar.augment.basic) writes and re-reads the batch once per op: the gathered uint8 rows, the
cropped copy, the flipped copy, the float copy, then one read-modify-write per erase box. The fused kernel reads
each source pixel once (3 KiB per 32x32x3 image) and writes the output once (6 KiB in bf16): one launch instead
of about a dozen full-batch passes (normalize alone makes four fp32 copies). Counted from the code, not measured;
the achieved bandwidth comes from the bench on a GPU.

Three entry points with one signature; the caller draws every random parameter (offsets, flips, boxes) itself, so
either path can serve the same draws:
  crop_flip_erase_reference  pure torch, any device; built from fastcifar.ops (the primitives augment.basic
                             composes), so it IS the semantics
  crop_flip_erase_triton     the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)
  fused_crop_flip_erase      dispatch: Triton when the source is on CUDA and triton imports, else the reference

Normalisation goes through a 256 x C table computed by ops.normalize on the same device, so the kernel's
values equal the reference's bit for bit in every output dtype (no fp32 division in the kernel whose rounding
could differ from torch's: CUDA torch divides by the 255 scalar as a multiply by its reciprocal, CPU torch does
not, and Triton's fp32 `/` is approximate by default). "random" fills are the only values that differ between
paths: the reference draws torch.randn from `gen`, the kernel tl.randn from `seed` (same distribution, same mask).
"""

from __future__ import annotations

import functools
import os
from typing import Literal, Sequence

import torch

from fastcifar import ops
from fastcifar.errors import RecipeError

FillKind = Literal["zero", "constant", "random"]
FILL_KINDS = ("zero", "constant", "random")


def _check(source: torch.Tensor, idx: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor,
           boxes: torch.Tensor, fill_kind: Sequence[str], fill_value: torch.Tensor, mean, std, padding: int,
           mode: str) -> None:
    """Shape/dtype contract, checked without reading device memory (no host sync on the hot path)."""
    if source.dtype != torch.uint8 or source.dim() != 4 or not source.is_contiguous():
        raise ValueError(f"source must be a contiguous uint8 (N, H, W, C) store, got {source.dtype} "
                         f"{tuple(source.shape)} contiguous={source.is_contiguous()}")
    _, h, w, c = source.shape
    b = idx.shape[0]
    for name, t, dtype in (("idx", idx, torch.int64), ("oy", oy, torch.int64), ("ox", ox, torch.int64),
                           ("flip", flip, torch.bool)):
        if t.shape != (b,) or t.dtype != dtype or t.device != source.device:
            raise ValueError(f"{name} must be {dtype} of shape ({b},) on {source.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    k = len(fill_kind)
    if boxes.shape != (b, k, 4) or boxes.dtype != torch.int64 or boxes.device != source.device:
        raise ValueError(f"boxes must be int64 ({b}, {k}, 4) on {source.device} (one box per fill_kind), "
                         f"got {boxes.dtype} {tuple(boxes.shape)} on {boxes.device}")
    if fill_value.shape != (k, c):
        raise ValueError(f"fill_value must be ({k}, {c}), got {tuple(fill_value.shape)}")
    if bad := [f for f in fill_kind if f not in FILL_KINDS]:
        raise ValueError(f"fill_kind entries must be in {FILL_KINDS}, got {bad}")
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std need {c} values (one per channel), got {len(mean)} and {len(std)}")
    if mode not in ("reflect", "constant"):
        raise ValueError(f"mode must be 'reflect' or 'constant', got {mode!r}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if mode == "reflect" and padding >= min(h, w):  # F.pad's own limit: a reflection must stay inside the image
        raise RecipeError(f"augment.crop_padding: reflect padding {padding} must be smaller than the image "
                          f"({h}x{w}); use a smaller padding or crop_padding_mode = \"constant\"")


def crop_flip_erase_reference(source: torch.Tensor, idx: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
                              flip: torch.Tensor, boxes: torch.Tensor, fill_kind: Sequence[str],
                              fill_value: torch.Tensor, mean, std, *, padding: int, mode: str,
                              out_dtype: torch.dtype, gen: torch.Generator | None = None,
                              seed: int = 0) -> torch.Tensor:
    """The fused op spelled as the unfused basic ops (crop_with_offsets -> flip -> normalize -> box fills).

    Returns (B, C, H, W) in out_dtype, channels-last memory. `seed` is unused (it feeds the kernel's RNG); each
    "random" box draws one full-batch torch.randn from `gen`, as basic.random_erasing does.
    """
    _check(source, idx, oy, ox, flip, boxes, fill_kind, fill_value, mean, std, padding, mode)
    x = ops.gather_crop_flip(source, idx, oy, ox, flip, padding, mode)
    x = ops.normalize(x, mean, std, out_dtype)
    _, _, h, w = x.shape
    for k, kind in enumerate(fill_kind):
        top, left, eh, ew = boxes[:, k].unbind(1)
        if kind == "random" and gen is None:
            raise ValueError("a 'random' fill needs a generator (gen) on the reference path")
        # x is normalize's fresh output, so the fills may write into it
        x = ops.fill_boxes(x, top, left, eh, ew, (eh > 0) & (ew > 0), fill_value[k] if kind == "constant" else kind,
                         gen, inplace=True)
    return x.contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=32)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """(256, C) table: row v = ops.normalize of a pixel of value v in every channel, in the output dtype.

    Computed by the reference op on the target device, so table lookups reproduce its rounding exactly; cached
    because torch.tensor(mean, device=cuda) in normalize is a host-to-device copy we do not want per batch.
    """
    c = len(mean)
    values = torch.arange(256, device=device, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, c, 1, 256)
    return ops.normalize(values, mean, std, dtype)[0, :, 0, :].t().contiguous()


def crop_flip_erase_triton(source: torch.Tensor, idx: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
                           flip: torch.Tensor, boxes: torch.Tensor, fill_kind: Sequence[str],
                           fill_value: torch.Tensor, mean, std, *, padding: int, mode: str,
                           out_dtype: torch.dtype, gen: torch.Generator | None = None,
                           seed: int = 0) -> torch.Tensor:
    """The same op as one Triton kernel launch. `gen` is unused: "random" fills draw tl.randn(seed, offset),
    so pass a fresh `seed` per batch (e.g. drawn from the run's generator) for fresh noise. Pass fill_value on
    the source's device: a host tensor costs a synchronous copy per call."""
    _check(source, idx, oy, ox, flip, boxes, fill_kind, fill_value, mean, std, padding, mode)
    if not source.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                         "imported, for CPU tensors); use fused_crop_flip_erase to fall back to torch")
    from fastcifar.kernels import _crop_flip_triton  # lazy: triton is imported only when the kernel runs

    _, h, w, c = source.shape
    b, dev = idx.shape[0], source.device
    out = torch.empty((b, h, w, c), device=dev, dtype=out_dtype)
    # fill kinds become compile-time bit masks (one variant per kind pattern, a handful per run); constants are
    # cast to the output dtype before the kernel, as torch.where in the reference does
    fill = fill_value.to(device=dev, dtype=torch.float32).to(out_dtype).contiguous()
    bits = {kind: sum(1 << k for k, f in enumerate(fill_kind) if f == kind) for kind in ("random", "zero")}
    lut = _normalize_table(tuple(map(float, mean)), tuple(map(float, std)), out_dtype, dev)
    _crop_flip_triton.launch(source, idx, oy, ox, flip, boxes.contiguous(), fill, lut, out, padding,
                             int(seed) & (2**63 - 1), bits["random"], bits["zero"], mode == "reflect")
    return out.permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels-last


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton imports (checked once, at first dispatch, not at import of this module)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_crop_flip_erase(source: torch.Tensor, idx: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
                          flip: torch.Tensor, boxes: torch.Tensor, fill_kind: Sequence[str],
                          fill_value: torch.Tensor, mean, std, *, padding: int, mode: str,
                          out_dtype: torch.dtype, gen: torch.Generator | None = None,
                          seed: int = 0) -> torch.Tensor:
    """Dispatch: the Triton kernel for CUDA sources when triton imports, else the torch reference."""
    impl = crop_flip_erase_triton if source.is_cuda and triton_available() else crop_flip_erase_reference
    return impl(source, idx, oy, ox, flip, boxes, fill_kind, fill_value, mean, std, padding=padding, mode=mode,
                out_dtype=out_dtype, gen=gen, seed=seed)
