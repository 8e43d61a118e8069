"""The basic batched ops (crop, flip, normalise, resize, erasing, cutout): tensors on any device, per-sample
randomness from an explicit generator.

Batch contract: images arrive as uint8 (B, C, H, W) (any strides: the store is NHWC, so the NCHW view of it is
already channels-last in memory); geometric ops keep uint8; one `normalize` step casts to float, after which the
value-filling ops (erasing, cutout) and resize run. Semantics follow torchvision.transforms.v2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The pixel primitives the fused kernel fuses live one layer down (fastcifar.ops), so fastcifar.kernels can
# build its torch reference from them without importing this package; the ops here compose them.
from fastcifar.ops import box_mask, fill_boxes, gather_crop_flip, normalize, reflect_index  # noqa: F401


def _uniform(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device)


def _randint(high: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample integer in [0, high) (high is a tensor, one bound per sample)."""
    return (torch.rand(high.shape, generator=gen, device=high.device) * high).long().clamp_(max=high - 1)


def flip_mask(b: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    """RandomHorizontalFlip's per-sample decision: True with probability p."""
    return _uniform(b, gen, device) < p


def hflip(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Flip each sample left-right with probability p (RandomHorizontalFlip)."""
    return torch.where(flip_mask(x.shape[0], p, gen, x.device)[:, None, None, None], x.flip(-1), x)


def crop_with_offsets(x: torch.Tensor, padding: int, oy: torch.Tensor, ox: torch.Tensor,
                      mode: str = "reflect") -> torch.Tensor:
    """Crop each sample of the padded batch at (oy, ox) in padded coordinates, without materialising the pad.

    Equivalent to v2.RandomCrop(size, padding, padding_mode=mode) with its offsets fixed; one gather, so the
    padded copy (1.56x the batch at 32+2*4 px) is never written.
    """
    b, _, h, w = x.shape
    rows = oy[:, None] - padding + torch.arange(h, device=x.device)  # (B, H) source row of each output row
    cols = ox[:, None] - padding + torch.arange(w, device=x.device)
    if mode == "reflect":
        out = x[torch.arange(b, device=x.device)[:, None, None], :, reflect_index(rows, h)[:, :, None],
                reflect_index(cols, w)[:, None, :]]
    else:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        out = x[torch.arange(b, device=x.device)[:, None, None], :, rows.clamp(0, h - 1)[:, :, None],
                cols.clamp(0, w - 1)[:, None, :]]
        out = out * inside[..., None].to(out.dtype)
    return out.permute(0, 3, 1, 2)  # advanced indexing put C last: (B, H, W, C) -> NCHW view, NHWC memory


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator, mode: str = "reflect") -> torch.Tensor:
    """v2.RandomCrop(H, padding): offsets uniform in [0, 2*padding] for each sample independently."""
    if padding == 0:
        return x
    return crop_with_offsets(x, padding, *crop_offsets(x.shape[0], padding, gen, x.device), mode)


def crop_offsets(b: int, padding: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """random_crop's draws: (oy, ox), each uniform in [0, 2*padding]."""
    span = torch.full((b,), 2 * padding + 1, device=device)
    return _randint(span, gen), _randint(span, gen)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased (v2.Resize(size, antialias=True)), on float or (CPU) uint8 batches. On the CPU the
    uint8 channels-last path is torch's vectorised one (the kernel torchvision uses): 20x the float path at
    32 -> 224, and 1/4 of the bytes, so the pipeline resizes there before normalising."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def erasing_boxes(b: int, h: int, w: int, scale, ratio, gen: torch.Generator, device,
                  attempts: int = 10) -> tuple[torch.Tensor, ...]:
    """RandomErasing.get_params for a whole batch: 10 tries per sample, the first that fits wins.

    Returns (top, left, height, width, found); found is False where no try fitted (that sample is left as is,
    as torchvision does).
    """
    area = h * w
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(b, attempts, generator=gen, device=device))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(b, attempts, generator=gen, device=device))
    eh = torch.sqrt(target * aspect).round().long()
    ew = torch.sqrt(target / aspect).round().long()
    fits = (eh < h) & (ew < w)
    first = fits.float().argmax(dim=1)  # index of the first fitting try (0 if none fits; masked by `found`)
    found = fits.any(dim=1)
    eh = eh.gather(1, first[:, None]).squeeze(1)
    ew = ew.gather(1, first[:, None]).squeeze(1)
    top = _randint((h - eh + 1).clamp(min=1), gen)
    left = _randint((w - ew + 1).clamp(min=1), gen)
    return top, left, eh, ew, found


def random_erasing(x: torch.Tensor, p: float, scale, ratio, value, gen: torch.Generator,
                   inplace: bool = False) -> torch.Tensor:
    """v2.RandomErasing(p, scale, ratio, value) on a normalised float batch; value is "random" (standard normal
    per pixel), "zero", or a per-channel sequence of constants."""
    b, c, h, w = x.shape
    apply = _uniform(b, gen, x.device) < p
    top, left, eh, ew, found = erasing_boxes(b, h, w, scale, ratio, gen, x.device)
    return fill_boxes(x, top, left, eh, ew, apply & found, value, gen, inplace)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator, inplace: bool = False,
           inside: bool = False) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): a size x size square at a uniform centre, clipped at the border, zeroed;
    inside=True: the whole square inside the image (airbench96's), see cutout_boxes."""
    b, _, h, w = x.shape
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    return fill_boxes(x, *cutout_boxes(b, h, w, size, gen, x.device, inside), active, "zero", gen, inplace)


def alternating_flip_mask(idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """The speedruns' alternating flip: image i is flipped on even epochs iff its fixed bit is set, and on odd
    epochs iff it is not, so every image is seen both ways in any two consecutive epochs (airbench's trick;
    ~0.1-0.2 points at a fixed epoch budget). The bit is a multiplicative hash of the global index, not a draw,
    so it survives resume and needs no state; it is the same set for every seed (airbench draws it per run).
    Bit 15 of the product is balanced (24,999 of ids 0..49,999 set; 2,498-2,501 in each block of 5,000, which is
    one class in a store prepared from class folders) but not random along the index: neighbours differ 95 % of
    the time (lag-1 correlation -0.90). Harmless here: batches are drawn by a random permutation, and the bit does
    not depend on the image."""
    bit = ((idx.long() * 2654435761) >> 15) & 1  # Knuth's golden-ratio multiplier
    return bit == (epoch % 2)


def alternating_flip(x: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
    return torch.where(alternating_flip_mask(idx, epoch).view(-1, 1, 1, 1), x.flip(-1), x)


def translate_offsets(b: int, t: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """v2.RandomAffine(degrees=0, translate=(t/W, t/H)) draws: dx, dy = round(uniform(-t, t)) per sample."""
    d = (torch.rand(2, b, generator=gen, device=device) * 2 - 1) * t
    return d[0].round().long(), d[1].round().long()  # (dx, dy)


def random_translate(x: torch.Tensor, t: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each sample by up to t pixels each way, zero fill: an integer affine, so one gather, exact."""
    dx, dy = translate_offsets(x.shape[0], t, gen, x.device)
    # out[r] = in[r - dy]: a crop of the t-padded image at offset t - dy
    return crop_with_offsets(x, t, t - dy, t - dx, mode="constant")


def cutout_boxes(b: int, h: int, w: int, size: int, gen: torch.Generator | None, device,
                 inside: bool = False) -> tuple[torch.Tensor, ...]:
    """(top, left, height, width) of each sample's cutout square: centred uniformly and clipped at the border,
    or with inside=True its top-left corner uniform over the positions that keep it whole (a square larger than
    the image covers all of it). gen None: torch's global generator (the per-image torchvision Cutout)."""
    if inside:
        top = _randint(torch.full((b,), max(h - size + 1, 1), device=device), gen)
        left = _randint(torch.full((b,), max(w - size + 1, 1), device=device), gen)
        return top, left, (h - top).clamp(max=size), (w - left).clamp(max=size)
    cy = _randint(torch.full((b,), h, device=device), gen)
    cx = _randint(torch.full((b,), w, device=device), gen)
    top, left = (cy - size // 2).clamp(min=0), (cx - size // 2).clamp(min=0)
    bottom, right = (cy - size // 2 + size).clamp(max=h), (cx - size // 2 + size).clamp(max=w)
    return top, left, bottom - top, right - left


def shift_jitter(x: torch.Tensor, brightness: float, contrast: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness and contrast jitter on a normalised float batch (Hiverge's batch_color_jitter): per image,
    x + s with s ~ U(-brightness, brightness), then times k ~ U(1 - contrast, 1 + contrast); draws in the batch's
    dtype, all brightness shifts first, then all contrast factors.

    In pixel units (x = (p - mean) / std) the shift adds s * std to every pixel of a channel (additive, unlike
    ColorJitter's multiplicative brightness), and the factor scales the distance to the dataset mean: torchvision
    v2's adjust_contrast with that mean in place of the image's own grey mean (the same blend when they agree).
    No clamping: the batch is already normalised."""
    b = x.shape[0]
    shift = (torch.rand(b, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * brightness
    scale = (torch.rand(b, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * contrast + 1
    return (x + shift.view(-1, 1, 1, 1)) * scale.view(-1, 1, 1, 1)
