"""MixUp / CutMix vs torchvision.transforms.v2 with lambda and box fixed, the generator-driven Beta sampler
against the Beta formulas, the mix_p / switch_p coins, and the soft-target loss step.py trains with."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T

from fastcifar.augment.mix import (cutmix_box, cutmix_with, mix_batch, mixup_with, sample_beta,
                                   soft_cross_entropy)
from fastcifar.augment.pipeline import build_mixer
from fastcifar.loader import DeviceLoader
from fastcifar.recipe import AugmentCfg

K = 10


def _batch(b=6, h=8, w=12, seed=0, channels_last=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, h, w, generator=g)
    y = torch.randint(0, K, (b,), generator=g)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def _constant_batch(b, h=8, w=8):
    """Image i is filled with the value i and has class i, so a pixel tells which image it came from."""
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).contiguous()
    return x.contiguous(memory_format=torch.channels_last), torch.arange(b) % K


def _fix_lambda(monkeypatch, transform, lam: float):
    monkeypatch.setattr(transform._dist, "sample", lambda shape=(): torch.tensor([lam]))


@pytest.mark.parametrize("lam", [0.0, 0.1234567, 0.5, 0.87654321, 1.0])
def test_mixup_matches_torchvision(monkeypatch, lam):
    x, y = _batch()
    ref = T.MixUp(alpha=1.0, num_classes=K)
    _fix_lambda(monkeypatch, ref, float(torch.tensor(lam)))  # the float32 value both sides see
    ref_x, ref_y = ref(x, y)
    out_x, out_y = mixup_with(x, y, torch.tensor(lam), K)
    assert torch.equal(out_x, ref_x)
    assert torch.equal(out_y, ref_y)
    assert out_x.is_contiguous(memory_format=torch.channels_last) and out_y.dtype == torch.float32


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_box_and_output_match_torchvision(monkeypatch, seed):
    # H != W catches swapped axes; lambdas below 0.5 make boxes larger than the image half, so they clip.
    x, y = _batch(h=10, w=14, seed=seed)
    lam = float(torch.rand((), generator=torch.Generator().manual_seed(100 + seed)))
    ref = T.CutMix(alpha=1.0, num_classes=K)
    _fix_lambda(monkeypatch, ref, lam)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # v2.CutMix draws the centre from the global RNG: randint(W), then randint(H)
        cx, cy = torch.randint(14, size=(1,)), torch.randint(10, size=(1,))
        torch.manual_seed(seed)
        ref_x, ref_y = ref(x, y)
    box = cutmix_box(torch.tensor(lam), cx[0], cy[0], 10, 14)
    out_x, out_y = cutmix_with(x, y, box, K)
    assert torch.equal(out_x, ref_x)
    torch.testing.assert_close(out_y, ref_y, rtol=0, atol=1e-7)  # lam: float32 here, float64 in torchvision
    assert out_x.is_contiguous(memory_format=torch.channels_last)


def test_cutmix_soft_labels_are_the_pixel_fraction():
    b, h, w = 5, 8, 8
    x, y = _constant_batch(b, h, w)
    gen = torch.Generator().manual_seed(3)
    unclipped = {1 - (2 * k) ** 2 / (h * w) for k in range(h // 2 + 1)}  # areas of boxes inside the image
    clipped = 0
    for _ in range(40):
        out, soft = mix_batch(x, y, K, 0.0, 1.0, 1.0, 0.5, gen)
        torch.testing.assert_close(soft.sum(1), torch.ones(b))
        own = (out[:, 0] == torch.arange(b, dtype=out.dtype).view(b, 1, 1)).flatten(1).float().mean(1)
        partner = out[:, 0] == torch.arange(b, dtype=out.dtype).roll(1).view(b, 1, 1)
        assert (partner.flatten(1).float().mean(1) + own == 1).all()  # every pixel is from image i or i - 1
        torch.testing.assert_close(soft[torch.arange(b), y], own, rtol=0, atol=1e-6)
        torch.testing.assert_close(soft[torch.arange(b), y.roll(1)], 1 - own, rtol=0, atol=1e-6)
        clipped += all(abs(float(own[0]) - u) > 1e-6 for u in unclipped)
    assert clipped > 0  # some boxes hit the border, and lam was corrected to the clipped area


@pytest.mark.parametrize("a,b", [(0.2, 0.2), (1.0, 1.0), (2.0, 2.0), (0.5, 3.0), (0.05, 0.05)])
def test_beta_sampler_mean_and_variance(a, b):
    n = 100_000
    s = sample_beta(torch.full((n,), a), torch.full((n,), b), torch.Generator().manual_seed(0)).double()
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert ((s >= 0) & (s <= 1)).all()
    # Within 5 standard errors (each estimated from the sample itself): a correct sampler fails ~1 in 1.7 M.
    assert abs(s.mean() - mean) < 5 * s.std() / math.sqrt(n)
    sq = (s - mean) ** 2
    assert abs(sq.mean() - var) < 5 * sq.std() / math.sqrt(n)


def test_beta_sampler_matches_torch_distribution():
    # Two-sample Kolmogorov-Smirnov against torch.distributions.Beta; the 0.001 critical value for n = m is
    # 1.95 * sqrt(2 / n) (= 0.0195 at 20k).
    n, a = 20_000, 0.4
    ours = sample_beta(torch.full((n,), a), torch.full((n,), a), torch.Generator().manual_seed(1)).double()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        ref = torch.distributions.Beta(torch.tensor(a), torch.tensor(a)).sample((n,)).double()
    grid = torch.cat([ours, ref]).sort().values
    cdf = lambda s: torch.searchsorted(s.sort().values, grid, right=True).double() / n  # noqa: E731
    assert float((cdf(ours) - cdf(ref)).abs().max()) < 1.95 * math.sqrt(2 / n)


def test_mixup_lambda_distribution_through_mix_batch():
    a, n = 0.4, 1000
    x, y = _constant_batch(2)  # classes 0 and 1: soft[0, 0] is lambda
    gen = torch.Generator().manual_seed(5)
    lam = torch.tensor([mix_batch(x, y, K, a, 0.0, 1.0, 0.5, gen)[1][0, 0].item() for _ in range(n)]).double()
    mean, var = 0.5, 1 / (4 * (2 * a + 1))
    assert abs(lam.mean() - mean) < 5 * math.sqrt(var / n)
    sq = (lam - mean) ** 2
    assert abs(sq.mean() - var) < 5 * sq.std() / math.sqrt(n)


def test_mix_p_zero_leaves_the_batch_unchanged():
    x, y = _batch()
    out, soft = mix_batch(x, y, K, 0.2, 1.0, 0.0, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
    assert soft.dtype == torch.float32 and torch.equal(soft, F.one_hot(y, K).float())


def _kind(x: torch.Tensor, out: torch.Tensor) -> str:
    """none / cutmix / mixup, read from a mixed _constant_batch: MixUp leaves no pixel at an original value
    (lam is 0 or 1 with probability ~0), CutMix leaves only original values."""
    if torch.equal(out, x):
        return "none"
    return "cutmix" if ((out == x) | (out == x.roll(1, 0))).all() else "mixup"


def test_mix_p_and_switch_p_are_respected():
    # 32x32: a CutMix box is empty (so the batch looks unmixed) only when 1 - lam < 1 / 256, 0.4% of CutMix draws.
    n, b, mix_p, switch_p = 1200, 3, 0.7, 0.25
    x, y = _constant_batch(b, 32, 32)
    gen = torch.Generator().manual_seed(7)
    kinds = [_kind(x, mix_batch(x, y, K, 1.0, 1.0, mix_p, switch_p, gen)[0]) for _ in range(n)]
    mixed, cut = n - kinds.count("none"), kinds.count("cutmix")
    # Binomial counts within 5 standard deviations: a correct mixer fails about 1 in 1.7 M runs.
    assert abs(mixed - n * mix_p) < 5 * math.sqrt(n * mix_p * (1 - mix_p))
    assert abs(cut - mixed * switch_p) < 5 * math.sqrt(mixed * switch_p * (1 - switch_p))


def test_single_method_ignores_switch_p():
    x, y = _constant_batch(3, 32, 32)
    gen = torch.Generator().manual_seed(2)
    assert {_kind(x, mix_batch(x, y, K, 0.0, 1.0, 1.0, 0.0, gen)[0]) for _ in range(30)} <= {"cutmix", "none"}
    assert {_kind(x, mix_batch(x, y, K, 1.0, 0.0, 1.0, 1.0, gen)[0]) for _ in range(30)} == {"mixup"}


def test_generator_advances_the_same_whatever_the_settings():
    x, y = _batch()
    states = []
    for args in [(0.2, 1.0, 1.0, 0.5), (0.0, 1.0, 0.0, 1.0), (3.0, 0.0, 0.5, 0.0)]:
        gen = torch.Generator().manual_seed(9)
        mix_batch(x, y, K, *args, gen)
        states.append(gen.get_state())
    assert all(torch.equal(s, states[0]) for s in states)
    a = mix_batch(x, y, K, 0.2, 1.0, 1.0, 0.5, torch.Generator().manual_seed(4))
    b = mix_batch(x, y, K, 0.2, 1.0, 1.0, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_keeps_dtype_and_channels_last(dtype):
    x, y = _batch()
    x = x.to(dtype)
    for alphas in [(1.0, 0.0), (0.0, 1.0)]:
        out, soft = mix_batch(x, y, K, *alphas, 1.0, 0.5, torch.Generator().manual_seed(0))
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        assert soft.dtype == torch.float32 and soft.shape == (len(y), K)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_cross_entropy_on_soft_targets_is_the_soft_target_loss(ls):
    x, y = _batch(b=16)
    _, soft = mix_batch(x, y, K, 1.0, 0.0, 1.0, 0.5, torch.Generator().manual_seed(0))
    logits = torch.randn(16, K, generator=torch.Generator().manual_seed(1))
    manual = -(((1 - ls) * soft + ls / K) * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(F.cross_entropy(logits, soft, label_smoothing=ls), manual)
    torch.testing.assert_close(soft_cross_entropy(logits, soft, ls), manual)
    # With one-hot targets (an unmixed batch) it is the same loss as with class indices.
    hard = F.one_hot(y, K).float()
    torch.testing.assert_close(F.cross_entropy(logits, hard, label_smoothing=ls),
                               F.cross_entropy(logits, y, label_smoothing=ls))


def test_training_on_mixed_targets_reduces_loss():
    # 4 classes, each a fixed random 3x4x4 template plus noise; a linear model trained only on MixUp / CutMix
    # batches and soft targets must still learn them (clean loss from ln 4 = 1.39 to well under half of it).
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(4, 3, 4, 4, generator=g)
    mixer = build_mixer(AugmentCfg(mixup_alpha=0.4, cutmix_alpha=1.0), 4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def data(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return templates[y] + 0.5 * torch.randn(n, 3, 4, 4, generator=g), y

    xt, yt = data(512)
    before = F.cross_entropy(model(xt), yt).item()
    for _ in range(150):
        x, y = mixer(*data(64), g)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(xt), yt).item()
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert before > 1.0 and after < 0.5 * before and acc > 0.95


def test_loader_with_mixer_yields_probability_targets():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, K, 40)
    to_float = lambda src, idx, gen, epoch: src[idx].permute(0, 3, 1, 2).float()  # noqa: E731
    loader = DeviceLoader(images, labels, 16, to_float, torch.device("cpu"), shuffle=True, seed=0,
                          mixer=build_mixer(AugmentCfg(cutmix_alpha=1.0, mixup_alpha=0.2), K))
    batches = list(loader)
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == (16, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (16, K) and y.dtype == torch.float32
        torch.testing.assert_close(y.sum(1), torch.ones(16))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU twin is every test above)")
def test_cuda_mix_batch_never_syncs_with_the_host():
    dev = torch.device("cuda")
    x, y = _constant_batch(4, 32, 32)
    x, y = x.to(dev), y.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host read-back inside mix_batch raises
    try:
        outs = [mix_batch(x, y, K, 0.2, 1.0, 0.8, 0.5, gen) for _ in range(20)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for out, soft in outs:
        assert out.device == dev and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(soft.sum(1), torch.ones(4, device=dev))
        own = (out[:, 0] == x[:, 0]).flatten(1).float().mean(1)
        if ((out == x) | (out == x.roll(1, 0))).all():  # unmixed or CutMix: labels are the pixel fractions
            torch.testing.assert_close(soft[torch.arange(4, device=dev), y], own, rtol=0, atol=1e-6)
