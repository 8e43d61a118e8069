"""Batched colour ops, ColorJitter and rotation vs torchvision.transforms.v2.functional on single images, with each
sample's parameters fixed; then ColorJitter's and RandomRotation's per-sample draws."""

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from fastcifar.augment import color as C
from fastcifar.augment import geometry as G


def _images(b=16, seed=0, c=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 32, 32, c), generator=g, dtype=torch.uint8)
    x[: b // 2, :12] = x[: b // 2, :12, :, :1]  # gray band (R = G = B): where truncating blends are touchiest
    x[-1] = 200  # constant image: zero saturation and hue, flat contrast
    return x.permute(0, 3, 1, 2)


def _factors(b, lo, hi, seed=1):
    u = torch.rand(b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lo + (hi - lo) * u


def _assert_close(out, ref, exact: bool):
    """Exact, or (float blends truncated to uint8) at most 1 LSB on a handful of pixels: the blend's last bit
    depends on the backend fusing its multiply-add the way torchvision's kernel does."""
    assert out.dtype == torch.uint8 and out.shape == ref.shape
    diff = (out.int() - ref.int()).abs()
    if exact:
        assert torch.equal(out, ref), int((diff > 0).sum())
    else:
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.995


CASES = [  # (ours, torchvision's, factor range, exact)
    (C.adjust_brightness, TF.adjust_brightness, (0.0, 2.0), True),
    (C.adjust_contrast, TF.adjust_contrast, (0.0, 2.0), False),
    (C.adjust_saturation, TF.adjust_saturation, (0.0, 2.0), False),
    (C.adjust_sharpness, TF.adjust_sharpness, (0.0, 2.0), False),
    (C.adjust_hue, TF.adjust_hue, (-0.5, 0.5), False),
]


@pytest.mark.parametrize("ours, theirs, rng, exact", CASES, ids=[c[0].__name__ for c in CASES])
@pytest.mark.parametrize("channels", [3, 1])
def test_colour_op_with_per_sample_factor_matches_torchvision(ours, theirs, rng, exact, channels):
    x = _images(c=channels)
    f = _factors(len(x), *rng)
    f[:3] = torch.tensor([rng[0], 1.0 if rng[0] == 0 else 0.0, rng[1]], dtype=torch.float64)  # ends + neutral
    ref = torch.stack([theirs(x[i], float(f[i])) for i in range(len(x))])
    _assert_close(ours(x, f), ref, exact)


def test_posterize_solarize_autocontrast_equalize_match_torchvision():
    x = _images()
    bits = torch.arange(len(x)) % 9  # 0..8, every sample its own
    thr = _factors(len(x), 0.0, 255.0)
    thr[:2] = torch.tensor([0.0, 51.00000076])  # 0: invert all; 255 * float32(0.2) rounds to 51 in float32
    assert torch.equal(C.posterize(x, bits), torch.stack([TF.posterize(x[i], int(bits[i])) for i in range(len(x))]))
    assert torch.equal(C.solarize(x, thr), torch.stack([TF.solarize(x[i], float(thr[i])) for i in range(len(x))]))
    assert torch.equal(C.autocontrast(x), torch.stack([TF.autocontrast(x[i]) for i in range(len(x))]))
    assert torch.equal(C.equalize(x), torch.stack([TF.equalize(x[i]) for i in range(len(x))]))


def _jitter_reference(x, factors, order):
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for i in range(len(x)):
        y = x[i]
        for k in order[i].tolist():
            y = fns[k](y, float(factors[i, k]))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("params", [(0.4, 0.4, 0.4, 0.1), (0.8, 0.0, 0.5, 0.0), (0.0, 0.0, 0.0, 0.5)])
def test_color_jitter_with_fixed_params_matches_torchvision_sequence(params):
    x = _images(48, seed=2)
    factors, order = C.draw_jitter_params(len(x), *params, torch.Generator().manual_seed(3), "cpu")
    assert order.shape == (len(x), sum(r is not None for r in C.jitter_ranges(*params)))
    _assert_close(C.color_jitter_with_params(x, factors, order), _jitter_reference(x, factors, order), False)


def test_jitter_ranges_are_colorjitters():
    for params in [(0.4, 0.4, 0.4, 0.1), (1.5, 0.0, 0.2, 0.5), (0.0, 0.0, 0.0, 0.0)]:
        tv = T.ColorJitter(*params)
        assert C.jitter_ranges(*params) == [tv.brightness, tv.contrast, tv.saturation, tv.hue]


def test_color_jitter_draws_per_sample_factors_and_orders():
    b, params = 20000, (0.4, 0.3, 0.2, 0.1)
    factors, order = C.draw_jitter_params(b, *params, torch.Generator().manual_seed(0), "cpu")
    for k, (lo, hi) in enumerate(C.jitter_ranges(*params)):
        f = factors[:, k]
        assert f.min() >= lo and f.max() <= hi
        assert abs(f.mean().item() - (lo + hi) / 2) < 0.02 * (hi - lo)  # uniform: mean sd = 0.002 of the range
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(b, 4))  # each row a permutation
    # Each op leads equally often (24 orders, uniform): 3 dof chi-square, p ~ 1e-4 at 21.
    counts = torch.bincount(order[:, 0], minlength=4).double()
    assert float(((counts - b / 4) ** 2 / (b / 4)).sum()) < 21
    assert len({tuple(r) for r in order[:200].tolist()}) == 24


def test_color_jitter_is_deterministic_uint8_and_independent_per_sample():
    x = _images(2, seed=4)[:1].expand(128, -1, -1, -1)  # (image 1 of 2 is the constant one)
    a = C.color_jitter(x, 0.4, 0.4, 0.4, 0.1, torch.Generator().manual_seed(5))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, C.color_jitter(x.contiguous(), 0.4, 0.4, 0.4, 0.1, torch.Generator().manual_seed(5)))
    assert len({bytes(o.contiguous().numpy()) for o in a}) == 128


def test_rotation_with_fixed_angles_matches_torchvision():
    x = _images(32, seed=6)
    angles = _factors(len(x), -180.0, 180.0, seed=7)
    # torchvision's fast paths (0, 90, 180, 270 go through rot90) and angles that wrap around 360.
    angles[:10] = torch.tensor([0.0, 90.0, -90.0, 180.0, -180.0, 270.0, 360.0, 450.0, -45.0, 1e-9])
    out = G.rotate_with_angles(x, angles)
    ref = torch.stack([TF.rotate(x[i], float(angles[i]), fill=0) for i in range(len(x))])  # RandomRotation fill
    assert out.dtype == torch.uint8 and torch.equal(out, ref)


def test_random_rotation_draws_uniform_angles_per_sample():
    angles = G.draw_rotation_angles(20000, 30.0, torch.Generator().manual_seed(0), "cpu")
    assert angles.min() >= -30.0 and angles.max() <= 30.0
    counts = torch.histc(angles.float(), bins=12, min=-30.0, max=30.0).double()
    assert float(((counts - 20000 / 12) ** 2 / (20000 / 12)).sum()) < 35  # 11 dof: p ~ 2e-4 at 35
    x = _images(64, seed=8)
    out = G.random_rotation(x, 30.0, torch.Generator().manual_seed(1))
    same = G.rotate_with_angles(x, G.draw_rotation_angles(64, 30.0, torch.Generator().manual_seed(1), "cpu"))
    assert torch.equal(out, same) and out.shape == x.shape and out.dtype == torch.uint8
    one = G.random_rotation(x[:1].expand(64, -1, -1, -1), 30.0, torch.Generator().manual_seed(2))
    assert len({bytes(o.contiguous().numpy()) for o in one}) > 48


def test_affine_matrices_match_torchvision_for_shear_and_translate():
    x = _images(8, seed=9)
    kinds = torch.tensor([G.SHEAR_X, G.SHEAR_Y, G.TRANSLATE_X, G.TRANSLATE_Y, G.ROTATE, G.SHEAR_X, G.TRANSLATE_Y,
                          G.ROTATE])
    mags = torch.tensor([0.3, -0.99, 14.5, -9.9, -27.0, -0.05, 31.9, 135.0], dtype=torch.float64)
    out = G.affine_nearest(x, G.autoaugment_matrices(kinds, mags, 32, 32))
    for i, (k, m) in enumerate(zip(kinds.tolist(), mags.tolist())):
        if k == G.ROTATE:
            ref = TF.rotate(x[i], m)
        else:
            shear = [torch.rad2deg(torch.atan(torch.tensor(m, dtype=torch.float64))).item(), 0.0]
            shear = shear if k == G.SHEAR_X else shear[::-1] if k == G.SHEAR_Y else [0.0, 0.0]
            shift = [int(m), 0] if k == G.TRANSLATE_X else [0, int(m)] if k == G.TRANSLATE_Y else [0, 0]
            center = [0, 0] if k in (G.SHEAR_X, G.SHEAR_Y) else None
            ref = TF.affine(x[i], angle=0.0, translate=shift, scale=1.0, shear=shear, center=center)
        assert torch.equal(out[i], ref), (k, m)
