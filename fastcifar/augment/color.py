"""Batched colour ops with per-sample factors, bit-exact with torchvision.transforms.v2's tensor kernels.

Every op takes a uint8 (B, C, H, W) batch (any strides) and one parameter per sample, and returns uint8. The
arithmetic mirrors torchvision's kernels step for step, because their float -> uint8 cast truncates: a gray pixel
blended with itself lands on 99.99999 or 100.00001 depending on rounding, i.e. 99 or 100. torchvision's blend
is `x.mul(r).add_(y, alpha=1 - r)`, which PyTorch evaluates as one fused multiply-add (vec::fmadd on CPU, FMA
contraction on CUDA); `_fma` reproduces that single rounding in float64. Factors are float64 tensors (float32 on
MPS: wide_dtype), the value torchvision would hold as a Python float, cast to float32 where its kernel casts it.

`apply_grouped` runs a per-group function on the samples of each group (one host sync per call), which is how
ColorJitter's per-sample op order and RandAugment's per-sample op choice stay batched.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

GroupFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


SYNC_FREE_DEVICES = ("cuda",)  # device types where apply_grouped computes every op and selects, without a sync


def apply_grouped(x: torch.Tensor, group: torch.Tensor, fns: Sequence[Optional[GroupFn]]) -> torch.Tensor:
    """out[i] = fns[group[i]](x[rows], rows)[row of i], each fn called once on all the samples of its group.

    `rows` (long, sorted by position in the batch) lets fn gather its per-sample parameters. A None fn is the
    identity. The group sizes are read once (`tolist`: the only host sync), instead of one `nonzero` per group.
    """
    if x.device.type in SYNC_FREE_DEVICES:
        # No host sync on CUDA: every op runs on the whole batch and torch.where keeps each sample's own result.
        # At 32 px the 14 ops are 14 small kernels (~1.5 MB each at batch 512); a sync per op slot instead would
        # stall the host behind the running train step and defeat the loader's side-stream prefetch.
        rows = torch.arange(len(x), device=x.device)
        out = x
        for k, fn in enumerate(fns):
            if fn is not None:
                out = torch.where((group == k).view(-1, 1, 1, 1), fn(x, rows), out)
        return out
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=len(fns)).tolist()
    out = x.clone()
    start = 0
    for fn, n in zip(fns, counts):
        if fn is not None and n:
            rows = order[start:start + n]
            out[rows] = fn(x[rows], rows)
        start += n
    return out


def wide_dtype(device) -> torch.dtype:
    """float64 for parameter maths and the fused blend; MPS has no float64, so float32 there (results can then
    differ from torchvision's by 1 where a value lands within float32 rounding of an integer)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _col(v: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A per-sample (B,) parameter as (B, 1, 1, 1), cast like torchvision casts its Python-float scalar."""
    return v.to(dtype).view(-1, 1, 1, 1)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32(a * b + c) with one rounding, as torchvision's `c.add_(a, alpha=b)` computes it.

    Exact in float64 here: a is an integer <= 255 (8 bits) times a float32 b (24 bits), and c spans < 53 bits.
    """
    w = wide_dtype(a.device)
    return (a.to(w) * b.to(w) + c.to(w)).float()


def _to_uint8(y: torch.Tensor) -> torch.Tensor:
    return y.clamp_(0, 255).to(torch.uint8)  # truncating cast, as torchvision's kernels do


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend for uint8: x * ratio + other * (1 - ratio), clamped, truncated."""
    return _to_uint8(_fma(other, _col(1.0 - ratio), x.float() * _col(ratio)))


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Floored float32 luma (B, 1, H, W) of a uint8 RGB batch, the same op sequence as torchvision's."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(-3)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _to_uint8(x.float() * _col(factor))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if x.shape[-3] == 1:  # torchvision (and PIL) leave grayscale images as they are
        return x.clone()
    return _blend(x, grayscale(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = grayscale(x) if x.shape[-3] == 3 else x.float()
    # Floored luma is integral, so this sum is exact (< 2**24) for images up to 256x256 and any summation order.
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor)


def adjust_sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the 3x3 (1, 5 centre)/13 blur, interior pixels only (the border is kept, as in PIL)."""
    c, h, w = x.shape[-3:]
    if h <= 2 or w <= 2 or x.numel() == 0:
        return x.clone()
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=torch.float32, device=x.device)
    xf = x.float()
    # The blur is (integer sum) / 13, never within 1/26 of a .5 tie, so rounding it is exact whatever conv
    # algorithm (or batch size) the backend picks.
    blur = F.conv2d(xf, kernel.expand(c, 1, 3, 3), groups=c).round_()
    inner = xf[..., 1:-1, 1:-1]
    out = x.clone()
    out[..., 1:-1, 1:-1] = _to_uint8(_fma(blur - inner, _col(1.0 - factor), inner))
    return out


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """float RGB in [0, 1] -> HSV, the op sequence of torchvision's kernel (Pillow's algorithm)."""
    r, g, _ = img.unbind(dim=-3)
    minc, maxc = torch.aminmax(img, dim=-3)
    eqc = maxc == minc
    ones = torch.ones_like(maxc)
    spread = maxc - minc
    s = spread / torch.where(eqc, ones, maxc)
    rc, gc, bc = ((maxc.unsqueeze(-3) - img) / torch.where(eqc, ones, spread).unsqueeze(-3)).unbind(dim=-3)
    not_r = maxc != r
    is_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(is_g & not_r)
    hr = bc.sub(gc).mul_(~not_r)
    hb = gc.add(4.0).sub_(rc).mul_(not_r & ~is_g)
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


# Which of (v, p, q, t) is R, G and B in each of the 6 hue sectors.
_SECTOR = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def _hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    h, s, v = img.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    sector = i.to(torch.int32).remainder_(6).long()
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    table = torch.tensor(_SECTOR, dtype=torch.long, device=img.device)  # (3, 6)
    pick = table[:, sector].movedim(0, -3)  # (..., 3, H, W)
    return vpqt.gather(-3, pick)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate hue by factor (in turns, [-0.5, 0.5]) per sample, through HSV like torchvision's kernel."""
    if x.shape[-3] == 1 or x.numel() == 0:
        return x.clone()
    hsv = _rgb_to_hsv(x.float().mul_(1.0 / 255))
    h, s, v = hsv.unbind(dim=-3)
    h = (h + _col(factor).squeeze(-1)).remainder_(1.0)
    rgb = _hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    return rgb.mul_(255.0 + 1.0 - 1e-3).to(torch.uint8)  # to_dtype(scale=True): x 255.999, truncate


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` (0..8, per sample) bits of every value."""
    mask = (255 << (8 - bits.long().clamp(0, 8))) & 255
    return x & mask.to(torch.uint8).view(-1, 1, 1, 1)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert values >= threshold (per sample, compared in float32 as torchvision's `image >= float` does)."""
    return torch.where(x.float() >= _col(threshold), 255 - x, x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    return TF.autocontrast(x)  # parameter-free and already batched: torchvision's kernel as it is


def equalize(x: torch.Tensor) -> torch.Tensor:
    return TF.equalize(x)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter_with_params(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Apply ColorJitter with fixed per-sample parameters.

    factors: (B, 4) float64, the brightness, contrast, saturation and hue factor of each sample.
    order: (B, K) long, each row a permutation of the K enabled op ids (BRIGHTNESS .. HUE), applied left to
    right; disabled ops are absent (v2.ColorJitter skips them, and hue 0 is not an identity: HSV round trip).
    """
    for slot in range(order.shape[1]):
        fns = [(lambda xs, rows, k=k: _JITTER_OPS[k](xs, factors[rows, k])) for k in range(4)]
        x = apply_grouped(x, order[:, slot], fns)
    return x


def jitter_ranges(brightness: float, contrast: float, saturation: float,
                  hue: float) -> list[Optional[tuple[float, float]]]:
    """v2.ColorJitter's factor ranges: [max(0, 1 - v), 1 + v] (hue: [-v, v]); None where the range is the
    neutral point, i.e. the op is off."""
    ranges: list[Optional[tuple[float, float]]] = []
    for v, centre in ((brightness, 1.0), (contrast, 1.0), (saturation, 1.0), (hue, 0.0)):
        lo, hi = (max(0.0, centre - v) if centre else -v), centre + v
        ranges.append(None if lo == hi == centre else (lo, hi))
    return ranges


def draw_jitter_params(b: int, brightness: float, contrast: float, saturation: float, hue: float,
                       gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (factors (B, 4) float64, order (B, K) long) for color_jitter_with_params."""
    ranges = jitter_ranges(brightness, contrast, saturation, hue)
    enabled = torch.tensor([k for k, r in enumerate(ranges) if r is not None], dtype=torch.long, device=device)
    # A uniform random permutation per sample: argsort of i.i.d. uniforms (ties have probability ~0).
    perm = torch.argsort(torch.rand(b, len(enabled), generator=gen, device=device), dim=1)
    w = wide_dtype(device)
    u = torch.rand(b, 4, generator=gen, device=device, dtype=w)
    lo = torch.tensor([r[0] if r else 0.0 for r in ranges], dtype=w, device=device)
    hi = torch.tensor([r[1] if r else 0.0 for r in ranges], dtype=w, device=device)
    return lo + (hi - lo) * u, enabled[perm]


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float,
                 gen: torch.Generator) -> torch.Tensor:
    """v2.ColorJitter(brightness, contrast, saturation, hue) with each sample's factors and op order drawn
    independently."""
    factors, order = draw_jitter_params(x.shape[0], brightness, contrast, saturation, hue, gen, x.device)
    return color_jitter_with_params(x, factors, order)
