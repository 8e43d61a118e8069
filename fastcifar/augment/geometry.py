"""Batched affine warps with one matrix per sample: RandomRotation and RandAugment's shear / translate / rotate.

Nearest interpolation, zero fill, output the input's size, as torchvision.transforms.v2.functional.affine and
rotate do for tensors. The inverse matrix is built in float64 the way torchvision builds it in Python floats, cast
to float32, turned into a sampling grid with the same float32 ops and fed to the same grid_sample; so the result
is pixel-identical to torchvision on the same device, not just close (a nearest sample has no "1 LSB": a
coordinate that rounds the other way fetches a different pixel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcifar.augment.color import wide_dtype

# Op kinds of autoaugment_matrices, in RandAugment's op order (ops 1..5 there).
SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE = range(5)


def inverse_affine_matrices(angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, shear_x: torch.Tensor,
                            shear_y: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) float64 output->input maps: rotate `angle` degrees, shear (degrees), translate (px), about the
    centre (cx, cy) given relative to the image centre; scale 1. torchvision's _get_inverse_affine_matrix, batched.
    """
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    # Inverse of the rotation-shear block (its determinant is 1), then the centre and translation folded in.
    cxt, cyt = cx + tx, cy + ty
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * cxt - m1 * cyt
    m5 = cy - m3 * cxt - m4 * cyt
    return torch.stack((m0, m1, m2, m3, m4, m5), dim=-1).view(-1, 2, 3)


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H, W, 2) normalised sampling grid for grid_sample(align_corners=False) from (B, 2, 3) float32 pixel
    maps centred on the image centre (torchvision's _affine_grid: maps first, normalises after)."""
    dev = theta.device
    base = torch.empty(h, w, 3, dtype=torch.float32, device=dev)
    base[..., 0] = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev)
    base[..., 1] = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze(-1)
    base[..., 2] = 1.0
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32, device=dev)
    grid = base.view(1, h * w, 3).expand(theta.shape[0], -1, -1).bmm(scaled)
    return grid.view(-1, h, w, 2)


def affine_nearest(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Warp each uint8 sample by its (B, 2, 3) float64 inverse map: nearest, zero fill, same size."""
    if x.shape[0] == 0:
        return x.clone()
    h, w = x.shape[-2:]
    grid = affine_grid(matrices.to(torch.float32), h, w)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.to(torch.uint8)  # nearest samples are whole numbers already: the cast is exact


def rotate_with_angles(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate sample i counter-clockwise by angles[i] degrees (float64) about its centre: v2.functional.rotate
    with nearest interpolation, expand=False, fill 0."""
    angles = angles.to(wide_dtype(angles.device))
    zero = torch.zeros_like(angles)
    # rotate() reduces the angle to [0, 360) first and its matrix is built for -angle.
    angle = -torch.remainder(angles, 360.0)
    return affine_nearest(x, inverse_affine_matrices(angle, zero, zero, zero, zero, zero, zero))


def draw_rotation_angles(b: int, degrees: float, gen: torch.Generator, device) -> torch.Tensor:
    """(B,) angles uniform in [-degrees, degrees], one per sample."""
    u = torch.rand(b, generator=gen, device=device, dtype=wide_dtype(device))
    return (2.0 * u - 1.0) * degrees


def random_rotation(x: torch.Tensor, degrees: float, gen: torch.Generator) -> torch.Tensor:
    """v2.RandomRotation(degrees): each sample rotated by its own angle, uniform in [-degrees, degrees]."""
    return rotate_with_angles(x, draw_rotation_angles(x.shape[0], degrees, gen, x.device))


def autoaugment_matrices(kind: torch.Tensor, magnitude: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 2, 3) inverse maps for the auto-augment geometric ops with signed float64 magnitudes, as torchvision's
    _AutoAugmentBase applies them: shears (magnitude = shear factor) about the top-left corner, translations by
    int(magnitude) px, rotation by magnitude degrees."""
    m = magnitude.to(wide_dtype(magnitude.device))
    zero = torch.zeros_like(m)
    # Shear: affine(shear=degrees(atan(m)), center=[0, 0]); that centre is (-w/2, -h/2) from the image centre.
    shear = torch.rad2deg(torch.atan(m))
    sx = torch.where(kind == SHEAR_X, shear, zero)
    sy = torch.where(kind == SHEAR_Y, shear, zero)
    is_shear = (kind == SHEAR_X) | (kind == SHEAR_Y)
    cx = torch.where(is_shear, zero - 0.5 * w, zero)
    cy = torch.where(is_shear, zero - 0.5 * h, zero)
    shift = torch.trunc(m)  # translate=[int(magnitude), 0]
    tx = torch.where(kind == TRANSLATE_X, shift, zero)
    ty = torch.where(kind == TRANSLATE_Y, shift, zero)
    angle = torch.where(kind == ROTATE, -torch.remainder(m, 360.0), zero)
    return inverse_affine_matrices(angle, tx, ty, sx, sy, cx, cy)
