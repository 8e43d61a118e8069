"""Batched augmentation vs torchvision.transforms.v2 on single images, with the random parameters fixed."""

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from fastcifar import augment as A
from fastcifar.recipe import AugmentCfg


def _batch(b=16, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2)


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_crop_matches_torchvision_pad_then_crop(mode):
    x, pad = _batch(), 4
    g = torch.Generator().manual_seed(1)
    oy = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
    out = A.crop_with_offsets(x, pad, oy, ox, mode)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for i in range(len(x)):
        ref = TF.crop(TF.pad(x[i].contiguous(), [pad], padding_mode=mode), int(oy[i]), int(ox[i]), 32, 32)
        assert torch.equal(out[i], ref), i


def test_crop_offsets_cover_all_positions_uniformly():
    # A single-pixel-marked image reveals each crop's offset; 9x9 offsets, 40k draws -> ~494 per cell.
    x = torch.zeros(40000, 1, 32, 32, dtype=torch.uint8)
    x[:, :, 16, 16] = 255
    out = A.random_crop(x, 4, torch.Generator().manual_seed(0), "constant")
    ys, xs = torch.nonzero(out[:, 0] == 255, as_tuple=True)[1:]
    counts = torch.bincount((ys - 12) * 9 + (xs - 12), minlength=81).float()
    assert counts.numel() == 81 and counts.min() > 0
    expected = 40000 / 81
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 130  # 80 dof: p ~ 0.0004 at 130, so a correct sampler essentially never fails


def test_flip_matches_torchvision_and_rate():
    x = _batch(4000)
    out = A.hflip(x, 0.5, torch.Generator().manual_seed(0))
    flipped = torch.tensor([not torch.equal(out[i], x[i]) for i in range(len(x))])
    for i in torch.nonzero(flipped).flatten()[:20]:
        assert torch.equal(out[i], TF.horizontal_flip(x[i]))
    assert abs(flipped.float().mean().item() - 0.5) < 0.035  # 4000 draws: sd 0.008, so ~4 sd
    assert torch.equal(A.hflip(x, 0.0, torch.Generator()), x)


def test_samples_in_a_batch_are_independent():
    x = _batch(1).expand(512, -1, -1, -1)
    out = A.random_crop(A.hflip(x, 0.5, torch.Generator().manual_seed(3)), 4, torch.Generator().manual_seed(4))
    distinct = {bytes(o.contiguous().numpy()) for o in out}
    assert len(distinct) > 100  # 2 x 81 outcomes per sample; a shared draw would give 1


def test_normalize_is_the_single_cast_step():
    x = _batch(4)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = A.normalize(x, mean, std)
    ref = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(mean), list(std))
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, atol=1e-6)
    assert A.normalize(x, mean, std, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("size", [64, 224, 16])
def test_resize_matches_torchvision_antialiased_bilinear(size):
    x = A.normalize(_batch(3), (0.5,) * 3, (0.25,) * 3)
    out = A.resize(x, size)
    ref = torch.stack([TF.resize(x[i], [size, size], antialias=True) for i in range(3)])
    assert out.shape == (3, 3, size, size)
    assert torch.allclose(out, ref, atol=1e-5)


def test_random_erasing_matches_torchvision_erase_with_fixed_params():
    x = A.normalize(_batch(64), (0.5,) * 3, (0.25,) * 3)
    scale, ratio = (0.02, 0.33), (0.3, 3.3)
    out = A.random_erasing(x, 0.5, scale, ratio, "zero", torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # replay the same draws in the same order
    apply = torch.rand(64, generator=g) < 0.5
    top, left, eh, ew, found = A.erasing_boxes(64, 32, 32, scale, ratio, g, x.device)
    for i in range(64):
        if apply[i] and found[i]:
            ref = TF.erase(x[i], int(top[i]), int(left[i]), int(eh[i]), int(ew[i]), torch.tensor(0.0))
        else:
            ref = x[i]
        assert torch.equal(out[i], ref), i
    erased = (out == 0).all(1).flatten(1).sum(1).float() / 1024
    hit = erased[apply & found]
    assert hit.min() >= 0.015 and hit.max() <= 0.34  # area within scale (rounding of h, w allowed)
    assert 0.35 < (apply & found).float().mean() < 0.65


def test_erasing_box_distribution_matches_torchvision_get_params():
    # Same sampler as v2.RandomErasing: compare the mean erased area over many draws.
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    tv = T.RandomErasing(p=1.0, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=1.0)
    tv_area = torch.stack([(tv(img) == 1).all(0).float().mean() for _ in range(3000)]).mean()
    top, left, eh, ew, found = A.erasing_boxes(3000, 32, 32, (0.02, 0.33), (0.3, 3.3),
                                               torch.Generator().manual_seed(2), "cpu")
    our_area = ((eh * ew).float() / 1024 * found).mean()
    assert abs(float(our_area) - float(tv_area)) < 0.01


def test_random_value_erasing_is_noise():
    x = torch.zeros(256, 3, 32, 32)
    out = A.random_erasing(x, 1.0, (0.1, 0.2), (0.5, 2.0), "random", torch.Generator().manual_seed(0))
    vals = out[out != 0]
    assert vals.numel() > 0 and abs(vals.mean().item()) < 0.05 and abs(vals.std().item() - 1) < 0.05


def test_cutout_zeroes_a_clipped_square():
    x = torch.ones(500, 3, 32, 32)
    out = A.cutout(x, 8, torch.Generator().manual_seed(0))
    zeroed = (out == 0).all(1).flatten(1).sum(1)
    assert zeroed.max() == 64 and zeroed.min() >= 16  # full square inside, at least a quarter at a corner


def test_cutout_inside_keeps_the_whole_square_in_the_image():
    # augment.cutout_mode = "inside" (airbench96's): every square is whole and every position is reachable;
    # "centre" clips at the border, so a 12 px square zeroes ~118 of its 144 px on average at 32 px.
    x = torch.ones(4000, 3, 32, 32)
    inside = A.cutout(x, 12, torch.Generator().manual_seed(0), inside=True)
    zeroed = (inside == 0).all(1)
    assert (zeroed.flatten(1).sum(1) == 144).all()
    rows = zeroed.any(2).float().argmax(1)  # top row of each square
    assert rows.min() == 0 and rows.max() == 20
    centre = (A.cutout(x, 12, torch.Generator().manual_seed(0)) == 0).all(1).flatten(1).sum(1).float()
    assert abs(centre.mean().item() - 10.875 ** 2) < 2.0  # E[clipped side] = 348 / 32 = 10.875 px per axis
    whole = A.cutout(torch.ones(2, 3, 8, 8), 12, torch.Generator().manual_seed(0), inside=True)
    assert (whole == 0).all()  # a square larger than the image covers all of it


def test_build_train_transform_runs_every_basic_op():
    tf = A.build_train_transform(AugmentCfg(erasing_p=0.5, cutout=4, resize=40, translate=2), (0.5,) * 3, (0.5,) * 3)
    source = _batch(8).permute(0, 2, 3, 1).contiguous()  # the store layout: NHWC
    out = tf(source, torch.arange(8), torch.Generator().manual_seed(0), 0)
    assert out.shape == (8, 3, 40, 40) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_translate_matches_torchvision_affine_with_fixed_shift():
    x = _batch(6)
    gen = torch.Generator().manual_seed(3)
    dx, dy = A.basic.translate_offsets(6, 3, torch.Generator().manual_seed(3), "cpu")
    out = A.random_translate(x, 3, gen)
    for i in range(6):
        ref = TF.affine(x[i], angle=0.0, translate=[int(dx[i]), int(dy[i])], scale=1.0, shear=[0.0, 0.0])
        assert torch.equal(out[i], ref)


def test_alternating_flip_flips_each_image_on_alternate_epochs():
    x = _batch(64)
    idx = torch.arange(1000, 1064)
    e0, e1, e2 = (A.alternating_flip(x, idx, e) for e in range(3))
    flipped0 = (e0 != x).flatten(1).any(1)
    assert torch.equal(e0, e2) and 0.3 < flipped0.float().mean() < 0.7  # a fixed half, stable across epochs
    assert torch.equal(torch.where(flipped0[:, None, None, None], x, x.flip(-1)), e1)  # the other way on odd


@pytest.mark.parametrize("flip_mode, cutout_mode", [("random", "centre"), ("alternate", "centre"),
                                                     ("alternate", "inside")])
def test_fused_pipeline_equals_the_unfused_ops_with_the_same_draws(flip_mode, cutout_mode):
    # The hot path (crop + flip + erasing + cutout) goes through kernels.crop_flip; on CPU that is its torch
    # reference. With zero / constant fills it must draw and apply exactly what the op-by-op chain does.
    from fastcifar.augment.pipeline import fusable

    cfg = AugmentCfg(crop_padding=4, flip_mode=flip_mode, erasing_p=0.7, erasing_value="constant",
                     erasing_constant=(0.5, -1.0, 2.0), cutout=6, cutout_mode=cutout_mode)
    assert fusable(cfg)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    source = _batch(64).permute(0, 2, 3, 1).contiguous()
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:24]
    out = A.build_train_transform(cfg, mean, std)(source, idx, torch.Generator().manual_seed(5), 3)
    g = torch.Generator().manual_seed(5)
    x = A.random_crop(source[idx].permute(0, 3, 1, 2), 4, g)
    x = A.alternating_flip(x, idx, 3) if flip_mode == "alternate" else A.hflip(x, 0.5, g)
    x = A.normalize(x, mean, std)
    x = A.random_erasing(x, 0.7, cfg.erasing_scale, cfg.erasing_ratio, cfg.erasing_constant, g)
    ref = A.cutout(x, 6, g, inside=cutout_mode == "inside")
    assert torch.equal(out, ref) and out.is_contiguous(memory_format=torch.channels_last)
