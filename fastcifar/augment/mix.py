"""Batched MixUp and CutMix (torchvision.transforms.v2.MixUp / v2.CutMix semantics) with soft targets.

One lambda per batch from Beta(alpha, alpha); each image's partner is the batch rolled by one (image i mixes with
image i - 1), so the batch must already be shuffled; targets become lam * onehot(y) + (1 - lam) * onehot(y.roll(1)).
CutMix pastes a box whose side scales with sqrt(1 - lam) around a uniform centre, clipped to the image, and
corrects lam to the box's true area. The loss is F.cross_entropy on these class probabilities (step.py), which is
the soft-target cross-entropy, label smoothing included (tests/test_mix.py checks the formula).

Everything is decided on the device: the coin flips (mix or not, CutMix or MixUp), lambda and the box are
tensors, and every case is the same weighted sum `x * w + partner * (1 - w)` with a per-pixel weight map w
(MixUp: w = lam; CutMix: 0 in the box, 1 outside; unmixed: 1). So the mixer never reads a value back to the
host: on CUDA it runs on the loader's side stream without stalling the CPU that queues the training step.
Every call also draws the same amount of randomness from `gen`, whatever the outcome or the settings, so a
batch's other random draws do not shift when mix_p / switch_p / the alphas change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Marsaglia-Tsang candidates drawn per Gamma variate. Acceptance is >= 0.95 for every shape >= 1 (measured 0.952
# at 1, 0.982 at 2; shapes below 1 are boosted to >= 1, see _log_gamma_variates), so all 16 are rejected with probability < 0.05**16 ~ 1.5e-21: a fixed block
# replaces the rejection loop (and its host sync) at the cost of 16x a handful of scalars.
GAMMA_CANDIDATES = 16


def _log_gamma_variates(shape: torch.Tensor, gen: torch.Generator, n: int = GAMMA_CANDIDATES) -> torch.Tensor:
    """log of one Gamma(shape, 1) variate per element of `shape` (a float32 1-D tensor > 0), from `gen` only.

    Marsaglia & Tsang (2000) for shape >= 1; below 1 the boost Gamma(a) = Gamma(a + 1) * U**(1/a), kept in log
    space because U**(1/a) underflows float32 for small a (U = 0.01, a = 0.05 -> 1e-40).
    """
    k, dev = shape.numel(), shape.device
    a = torch.where(shape < 1, shape + 1, shape)[:, None]
    d = a - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    z = torch.randn(k, n, generator=gen, device=dev)
    u = 1.0 - torch.rand(k, n, generator=gen, device=dev)  # in (0, 1]: log stays finite
    v = (1.0 + c * z) ** 3
    log_v = torch.log(v.clamp_min(torch.finfo(v.dtype).tiny))
    ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * log_v)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # the first accepted candidate
    log_g = (torch.log(d) + log_v.gather(1, first)).squeeze(1)
    boost = torch.log(1.0 - torch.rand(k, generator=gen, device=dev)) / shape
    return log_g + torch.where(shape < 1, boost, torch.zeros_like(boost))


def sample_beta(a: torch.Tensor, b: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One Beta(a, b) variate per element (a, b: same-shape float tensors > 0) from uniforms / normals of `gen`.

    torch.distributions and torch._standard_gamma take no generator, so Beta comes from two Gammas:
    X / (X + Y) = sigmoid(log X - log Y). Why Gamma ratio rather than the other textbook routes: Joehnk's
    algorithm accepts with probability G(a+1)G(b+1)/G(a+b+1), fine for mixup's alpha <= 1 (0.5 at a = b = 1)
    but 0.17 at 2 and 0.004 at 5, so a fixed candidate block cannot cover it; an inverse CDF on a grid loses
    the endpoint mass that small alphas put there (8% of Beta(0.2, 0.2) lies below 1e-4). Marsaglia-Tsang's
    acceptance stays >= 0.95 for every alpha, and the sigmoid of the log ratio never over- or underflows.
    """
    shape = torch.stack([a, b]).reshape(-1).to(torch.float32)
    log_g = _log_gamma_variates(shape, gen).view(2, *a.shape)
    return torch.sigmoid(log_g[0] - log_g[1])


def cutmix_box(lam: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(x1, y1, x2, y2) int64 tensor as v2.CutMix draws it: half-sides int(0.5 * sqrt(1 - lam) * side) around
    the integer centre (cx, cy), clipped to the image (so the box may be smaller than lam asks)."""
    r = 0.5 * torch.sqrt((1.0 - lam).clamp_min(0))
    rw, rh = torch.floor(r * w).long(), torch.floor(r * h).long()
    cx, cy = cx.long(), cy.long()
    return torch.stack([(cx - rw).clamp_min(0), (cy - rh).clamp_min(0), (cx + rw).clamp_max(w),
                        (cy + rh).clamp_max(h)])


def _box_mask(box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(H, W) bool: True inside the half-open box [y1, y2) x [x1, x2)."""
    rows = torch.arange(h, device=box.device)
    cols = torch.arange(w, device=box.device)
    in_r = (rows >= box[1]) & (rows < box[3])
    in_c = (cols >= box[0]) & (cols < box[2])
    return in_r[:, None] & in_c[None, :]


def _blend(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, lam: torch.Tensor,
           num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x * w + partner * (1 - w) per pixel and lam * onehot(y) + (1 - lam) * onehot(partner's y).

    The weight stays float32 even for a half-precision batch (a bf16 lam would keep 8 bits: 0.3 -> 0.30078); the
    arithmetic runs in float32 and the result is rounded to x's dtype. The weight is laid out like one image of x
    (empty_like keeps x's strides): an (H, W) map broadcast over a channels-last batch puts a stride-0 dim
    innermost, and x * w took 9 ms instead of 0.3 ms on CPU at 512x3x32x32. Working in place on the partner copy (v2.MixUp's own order) keeps the
    fresh buffers at two batches: on CPU each fresh 6 MB buffer (512x3x32x32 float32) is freshly mapped memory,
    and the out-of-place form took 6112 vs 3040 minor page faults a call and ran 2-10x slower (12 vs 1.2 ms).
    """
    wdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = torch.empty_like(x[:1], dtype=wdt).copy_(weight.to(x.device).expand(x[:1].shape))
    partner = torch.cat([x[-1:], x[:-1]])  # = x.roll(1, 0); cat keeps x's layout (channels-last stays so)
    out = partner.mul_(1.0 - w).add_(x * w)
    onehot = F.one_hot(y, num_classes).to(torch.float32)
    lam = lam.to(device=y.device, dtype=torch.float32)
    return out, onehot.roll(1, 0) * (1.0 - lam) + onehot * lam


def mixup_with(x: torch.Tensor, y: torch.Tensor, lam: float | torch.Tensor,
               num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v2.MixUp with its lambda fixed: (mixed batch like x, soft targets (B, K) float32)."""
    lam_t = torch.as_tensor(lam, dtype=torch.float32).to(x.device)
    return _blend(x, y, lam_t.reshape(1, 1), lam_t, num_classes)


def cutmix_with(x: torch.Tensor, y: torch.Tensor, box, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v2.CutMix with its box (x1, y1, x2, y2) fixed; lam is the fraction of each image left outside the box."""
    h, w = x.shape[-2:]
    box_t = torch.as_tensor(box, dtype=torch.int64, device=x.device)
    inside = _box_mask(box_t, h, w)
    lam = 1.0 - inside.sum().to(torch.float32) / (h * w)
    return _blend(x, y, ~inside, lam, num_classes)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              mix_p: float, switch_p: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix on a float (B, C, H, W) batch with int64 labels (B,) -> (batch like x, (B, K) float32).

    With probability 1 - mix_p the batch is left as is (targets still one-hot float32, so the dtype is the same
    every step). Otherwise CutMix if only cutmix_alpha > 0, MixUp if only mixup_alpha > 0, and with both on,
    CutMix with probability switch_p, else MixUp (timm's Mixup convention), each with its own alpha.
    Draw order (fixed): 2 coins, Beta(mixup_alpha), Beta(cutmix_alpha), box centre (x, y); an unused alpha draws
    a dummy Beta(1, 1) so the generator always advances by the same amount.
    """
    if x.ndim != 4 or y.shape != x.shape[:1]:
        raise ValueError(f"mix_batch needs x (B, C, H, W) and y (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
    h, w, dev = x.shape[-2], x.shape[-1], x.device
    # Constants are made with torch.full, not torch.tensor: a CUDA tensor built from a Python list is a copy
    # from pageable host memory, which waits for the stream first.
    coins = torch.rand(2, generator=gen, device=dev)
    alphas = torch.stack([torch.full((), a if a > 0 else 1.0, device=dev) for a in (mixup_alpha, cutmix_alpha)])
    lam_mix, lam_cut = sample_beta(alphas, alphas, gen).unbind()
    u = torch.rand(2, generator=gen, device=dev)  # box centre, as v2.CutMix's randint(W), randint(H)
    cx, cy = (u[0] * w).floor().clamp_max(w - 1), (u[1] * h).floor().clamp_max(h - 1)
    inside = _box_mask(cutmix_box(lam_cut, cx, cy, h, w), h, w)

    mixed = coins[0] < mix_p
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cut = coins[1] < switch_p
    else:
        use_cut = torch.full((), cutmix_alpha > 0, device=dev)
    one = torch.ones((), device=dev)
    lam_box = 1.0 - inside.sum().to(torch.float32) / (h * w)  # CutMix's lam, corrected to the clipped box
    lam = torch.where(mixed, torch.where(use_cut, lam_box, lam_mix), one)
    weight = torch.where(mixed & use_cut, (~inside).to(torch.float32), torch.where(mixed, lam_mix, one))
    return _blend(x, y, weight, lam, num_classes)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over the batch of -sum_k q_k log softmax(logits)_k with q = (1 - ls) * target + ls / K.

    The written-out form of what F.cross_entropy computes for probability targets (the loss step.py uses);
    kept as the reference the tests hold F.cross_entropy to, not for training.
    """
    k = logits.shape[-1]
    q = (1.0 - label_smoothing) * target + label_smoothing / k
    return -(q * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


__all__ = ["cutmix_box", "cutmix_with", "mix_batch", "mixup_with", "sample_beta", "soft_cross_entropy"]
