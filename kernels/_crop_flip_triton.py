"""The Triton kernel behind crop_flip.crop_flip_erase_triton. Imported lazily (only when it is about to run), so
that a machine without Triton, or a process that sets TRITON_INTERPRET=1 later, is never affected by it.

One program per (sample, block of output elements); elements are the (y, x, c) of the NHWC output, so stores are
fully coalesced. Per element: gather the uint8 source pixel (reflect / zero-pad index math, flip by index), map it
through the 256 x C normalisation table, apply the K box fills in order, store once in the output dtype.

Memory moved per 32x32x3 image: 3 KiB of uint8 read and 6 KiB written in bf16 (12 KiB in fp32), plus ~(25 + 32K)
bytes of per-sample parameters (idx, oy, ox, flip, K boxes) and the table (256 x 3 x 2 B = 1.5 KiB, L1/L2
resident). Nothing else touches memory: no padded copy, no float intermediate, no separate erase pass.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seed"])  # a fresh seed every batch must not trigger a recompile (seed == 1 would)
def crop_flip_erase_kernel(src_ptr, idx_ptr, oy_ptr, ox_ptr, flip_ptr, boxes_ptr, fill_ptr, lut_ptr, out_ptr,
                           padding, seed, num_samples,
                           H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                           RANDOM_BITS: tl.constexpr, ZERO_BITS: tl.constexpr, REFLECT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    HWC: tl.constexpr = H * W * C
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # element index inside the output image, NHWC order
    live = e < HWC
    c = e % C
    pix = e // C
    y = pix // W
    x = pix % W

    row = tl.load(idx_ptr + b)  # int64: row * HWC cannot overflow for any store size
    flip = tl.load(flip_ptr + b) != 0
    xc = tl.where(flip, W - 1 - x, x)  # flip after the crop = read the crop's mirrored column
    r = tl.load(oy_ptr + b) - padding + y  # source row/col in the unpadded image
    q = tl.load(ox_ptr + b) - padding + xc
    if REFLECT:  # F.pad(mode="reflect"): -1 -> 1, H -> H - 2 (edge not repeated); valid while padding < H, W
        r = tl.abs(r)
        r = tl.where(r >= H, 2 * (H - 1) - r, r)
        q = tl.abs(q)
        q = tl.where(q >= W, 2 * (W - 1) - q, q)
        inside = live
    else:  # zero padding: masked loads read 0, which the table maps to the normalised value of a black pixel
        inside = live & (r >= 0) & (r < H) & (q >= 0) & (q < W)
    v = tl.load(src_ptr + row * HWC + (r * W + q) * C + c, mask=inside, other=0)
    val = tl.load(lut_ptr + v.to(tl.int32) * C + c, mask=live, other=0)  # table is already in the output dtype

    for k in tl.static_range(K):  # in order: a later box overwrites an earlier one where they overlap
        box = boxes_ptr + (b * K + k) * 4
        top = tl.load(box)
        left = tl.load(box + 1)
        inbox = (y >= top) & (y < top + tl.load(box + 2)) & (x >= left) & (x < left + tl.load(box + 3))
        if (RANDOM_BITS >> k) & 1:
            # one Philox stream position per (box, sample, element): overlapping random boxes differ
            fill = tl.randn(seed, (k * num_samples + b).to(tl.int64) * HWC + e).to(out_ptr.dtype.element_ty)
        elif (ZERO_BITS >> k) & 1:
            fill = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
        else:
            fill = tl.load(fill_ptr + k * C + c, mask=live, other=0)
        val = tl.where(inbox, fill, val)

    tl.store(out_ptr + b.to(tl.int64) * HWC + e, val, mask=live)


def launch(src, idx, oy, ox, flip, boxes, fill, lut, out, padding: int, seed: int, random_bits: int,
           zero_bits: int, reflect: bool) -> None:
    """Launch over (B, ceil(HWC / BLOCK)); all tensors on one device, out is (B, H, W, C) contiguous."""
    b, h, w, c = out.shape
    k = boxes.shape[1]
    hwc = h * w * c
    # 1024 elements (a third of a 32x32x3 image) = 4 warps x 8 elements/thread: enough bytes in flight per SM
    # at 3 programs per image (1536 programs for B=512); small images get one power-of-two block.
    block = min(1024, triton.next_power_of_2(hwc))
    grid = (b, triton.cdiv(hwc, block))
    crop_flip_erase_kernel[grid](src, idx, oy, ox, flip, boxes, fill, lut, out, padding, seed, b,
                                 H=h, W=w, C=c, K=k, RANDOM_BITS=random_bits, ZERO_BITS=zero_bits,
                                 REFLECT=reflect, BLOCK=block)
