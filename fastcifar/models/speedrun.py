"""A record-class speed model: "speedrun_net", an airbench-style whitened ConvNet, re-derived in our own code.

The design follows the published description (K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
arXiv:2404.00498, and the Myrtle / hlb-CIFAR10 line before it): a frozen 2x2 patch-whitening conv, three conv
groups (conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU) of widths 64-256-256, identity (Dirac) init of
the group convs, BatchNorm with a fixed scale and a learnable shift, a global max-pool and a linear head whose
logits are scaled by 1/9. ~1.97 M trainable parameters at the default width.

The whitening filters come from data: call `model.init_whitening(train_images, mean, std)` once before
training (the trainer does it through the model's registry entry, ModelEntry.data_init). Until then the frozen
filters are a plain random conv, so the model still builds, trains and loads checkpoints without the seam.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import Scale

WHITEN_SAMPLE = 5000  # images used for the patch statistics: 5000 x 961 patches pin down a 12x12 matrix


def patch_second_moment(x: torch.Tensor, k: int, chunk: int = 512) -> torch.Tensor:
    """The (C*k*k, C*k*k) uncentred covariance E[p p^T] of all k x k patches (stride 1, no padding) of the
    float NCHW batch `x`, accumulated in float64 chunk by chunk (5000 images at once would be 4.8 M x 12).

    Uncentred because the conv applies the filters to raw patches; on normalised inputs the mean is ~0 anyway.
    Flattening order is F.unfold's (channel, row, column), the same as a conv weight's (C, k, k).
    """
    n = x.shape[1] * k * k
    acc = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    rows = 0
    for part in x.split(chunk):
        p = F.unfold(part.double(), k).transpose(1, 2).reshape(-1, n)  # (B * L, C*k*k)
        acc += p.T @ p
        rows += p.shape[0]
    return acc / max(rows, 1)


def whitening_filters(cov: torch.Tensor, channels: int, k: int, eps: float, method: str = "eigh") -> torch.Tensor:
    """Filters v_i / sqrt(lambda_i + eps) from the eigen-decomposition cov = V diag(lambda) V^T, largest
    eigenvalue first, shaped (C*k*k, C, k, k). Applied to patches they give decorrelated outputs of variance
    lambda_i / (lambda_i + eps) ~ 1; eps bounds the gain of the near-null directions.

    method "svd" takes V and lambda from the SVD of cov (Hiverge's init): for a symmetric positive semi-definite
    matrix the same decomposition, computed by another LAPACK routine, so each v_i may come out negated; the
    filter bank holds every filter and its negation, so the whitened channels are the same, in another order."""
    if method == "svd":
        evecs, evals, _ = torch.linalg.svd(cov)  # descending
    else:
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)
    filters = evecs.T / torch.sqrt(evals.clamp(min=0) + eps)[:, None]
    return filters.reshape(-1, channels, k, k)


class PatchWhitening(nn.Module):
    """A frozen k x k conv (no padding) whose filters whiten the training patches, followed in the net by a
    GELU: the negated copy of every filter lets the GELU keep both signs of each direction (2*C*k*k = 24
    channels for k = 2).

    The weight is a buffer, not a Parameter: frozen by construction, so no optimizer, weight decay, EMA of
    parameters or a trainer's blanket `requires_grad_(True)` can move it. The bias is a learnable Parameter.
    """

    def __init__(self, in_channels: int = 3, kernel_size: int = 2, eps: float = 5e-4, method: str = "eigh") -> None:
        super().__init__()
        self.in_channels, self.kernel_size, self.eps, self.method = in_channels, kernel_size, eps, method
        n = in_channels * kernel_size * kernel_size
        placeholder = nn.Conv2d(in_channels, 2 * n, kernel_size).weight.detach()  # default init until fitted
        self.register_buffer("weight", placeholder.clone())
        self.bias = nn.Parameter(torch.zeros(2 * n))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Set the filters from the normalised float NCHW images `x` (any device; the result moves to ours)."""
        k, c = self.kernel_size, self.in_channels
        filters = whitening_filters(patch_second_moment(x, k), c, k, self.eps, self.method)
        w = torch.cat([filters, -filters]).to(self.weight.dtype)
        # copy_ keeps the buffer's device and memory format (channels-last after model.to(memory_format=...)).
        self.weight.copy_(w.to(self.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.weight.shape[0]}, kernel_size={self.kernel_size}, eps={self.eps}, "
                f"method={self.method}")


class ShiftBatchNorm(nn.BatchNorm2d):
    """BatchNorm with the scale fixed at 1 and a learnable shift (the speedruns' choice: with a scale the
    following layer's weights and the BN scale are redundant).

    The shift is stored as b' = b / g with g = sqrt(bias_lr_scale), and the forward uses g * b'. For SGD (with
    momentum and weight decay, all linear in the parameter) this is exactly a per-parameter learning rate
    g^2 = bias_lr_scale times the base one on b, with the same relative weight decay: airbench's bias_scaler
    of 64 for BN shifts, from a single optimizer parameter group. momentum is PyTorch's convention
    (running = (1 - m) running + m batch): airbench's 0.6 is m = 0.4.
    """

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12, bias_lr_scale: float = 64.0):
        super().__init__(channels, eps=eps, momentum=momentum, affine=False)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.bias_gain = math.sqrt(bias_lr_scale)
        # An explicit unit scale keeps the call on the same (cuDNN) kernel as an affine BatchNorm; not saved.
        self.register_buffer("unit_scale", torch.ones(channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or self.running_mean is None
        return F.batch_norm(x, self.running_mean, self.running_var, self.unit_scale, self.bias * self.bias_gain,
                            use_batch, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps:g}, momentum={self.momentum}, scale=1 (fixed), "
                f"bias_gain={self.bias_gain:g}")


def dirac_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """3x3 conv, no bias (a BN follows); the first min(c_in, c_out) filters start as the identity map, so at
    init the group passes its input through and training starts from a shallow net (the rest keep
    PyTorch's default init)."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(c_in, c_out)])
    return conv


ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}  # model.activation: the conv groups' (Hiverge: SiLU)


class ConvGroup(nn.Sequential):
    """conv -> 2x2 max-pool -> BN -> act -> conv -> BN -> act (pooling before BN halves the BN work); act is
    GELU (airbench) or SiLU (Hiverge)."""

    def __init__(self, c_in: int, c_out: int, bn_momentum: float, bias_lr_scale: float,
                 activation: str = "gelu") -> None:
        act = ACTIVATIONS[activation]
        super().__init__(OrderedDict([
            ("conv1", dirac_conv(c_in, c_out)), ("pool", nn.MaxPool2d(2)),
            ("norm1", ShiftBatchNorm(c_out, bn_momentum, bias_lr_scale=bias_lr_scale)), ("act1", act()),
            ("conv2", dirac_conv(c_out, c_out)),
            ("norm2", ShiftBatchNorm(c_out, bn_momentum, bias_lr_scale=bias_lr_scale)), ("act2", act()),
        ]))


class ResidualConvGroup(ConvGroup):
    """airbench96's group: ConvGroup plus a third conv -> BN -> GELU, whose output is added back to the output of
    the first GELU (a residual around conv2 and conv3)."""

    def __init__(self, c_in: int, c_out: int, bn_momentum: float, bias_lr_scale: float,
                 activation: str = "gelu") -> None:
        super().__init__(c_in, c_out, bn_momentum, bias_lr_scale, activation)
        self.add_module("conv3", dirac_conv(c_out, c_out))
        self.add_module("norm3", ShiftBatchNorm(c_out, bn_momentum, bias_lr_scale=bias_lr_scale))
        self.add_module("act3", ACTIVATIONS[activation]())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.pool(self.conv1(x))))
        y = self.act2(self.norm2(self.conv2(x)))
        return self.act3(self.norm3(self.conv3(y))) + x


class SpeedrunNet(nn.Sequential):
    """whiten (2x2, frozen) -> GELU -> 3 conv groups -> global max-pool -> dropout -> linear -> x logit_scale.

    At 32 px the map goes 31 -> 15 -> 7 -> 3 -> 1 (the global max-pool is airbench's MaxPool2d(3) there).
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (64, 256, 256), bn_momentum: float = 0.4,
                 bias_lr_scale: float = 64.0, logit_scale: float = 1 / 9, dropout: float = 0.0,
                 residual: bool = False, activation: str = "gelu", whiten_init: str = "eigh") -> None:
        whiten = PatchWhitening(3, 2, method=whiten_init)
        c = whiten.weight.shape[0]
        groups = []
        for i, w in enumerate(widths):
            group = (ResidualConvGroup if residual else ConvGroup)(c, w, bn_momentum, bias_lr_scale, activation)
            groups.append((f"group{i + 1}", group))
            c = w
        super().__init__(OrderedDict([
            ("whiten", whiten), ("act", nn.GELU()), *groups,
            ("pool", nn.AdaptiveMaxPool2d(1)), ("flatten", nn.Flatten()),
            ("dropout", nn.Dropout(dropout)),  # parameter-free: never shifts state-dict keys
            ("fc", nn.Linear(c, num_classes, bias=False)), ("scale", Scale(logit_scale)),
        ]))

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, max_images: int = WHITEN_SAMPLE) -> None:
        """Fit the whitening filters to training images: uint8 (N, H, W, 3) as stored (normalised here with
        `mean` / `std`, in [0, 1] units), or float (N, 3, H, W) already normalised.

        At most `max_images` evenly strided rows are used: strided, not the first ones, because a store may be
        sorted by class (the prepared CIFAR-10 store is), and whitening one class's patches would be biased.
        """
        n = images.shape[0]
        if n == 0:
            raise ValueError("init_whitening: no images")
        rows = torch.linspace(0, n - 1, min(n, max_images), device=images.device).round().long()
        x = images[rows]
        if x.dtype == torch.uint8:
            if mean is None or std is None:
                raise ValueError("init_whitening: uint8 images need mean and std")
            m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
            s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
            x = (x.permute(0, 3, 1, 2).float() / 255.0 - m) / s
        self.whiten.fit(x)


def set_whiten_bias(model: nn.Module, trainable: bool) -> bool:
    """model.whiten_bias_epochs: the whitening bias trains or is frozen; True when that changed."""
    bias = model.whiten.bias
    changed = bias.requires_grad != trainable
    bias.requires_grad_(trainable)
    return changed


def fit_whitening(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
    """The registry's data-dependent init for speedrun_net: its frozen first conv whitens training patches."""
    model.init_whitening(images, mean, std)


# Each builder also takes the speedrun options of the recipe's model section (models.SPEEDRUN_OPTIONS):
# activation ("gelu" | "silu"), whiten_init ("eigh" | "svd"), bn_momentum, bias_lr_scale.
def speedrun_net(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0,
                 **options) -> nn.Module:
    """airbench94-style net; width sets the first group (default 64), the other two are 4x it (256)."""
    w = width or 64
    return SpeedrunNet(num_classes, (w, 4 * w, 4 * w), dropout=dropout, **options)


def speedrun_net95(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0,
                   **options) -> nn.Module:
    """airbench95-style: wider groups, 128 -> 384 -> 384 (width sets the first; the others are 3x it)."""
    w = width or 128
    return SpeedrunNet(num_classes, (w, 3 * w, 3 * w), dropout=dropout, **options)


def speedrun_net96(*, num_classes: int, image_size: int, width: int = 0, dropout: float = 0.0,
                   **options) -> nn.Module:
    """airbench96-style: 128 -> 512 -> 512, three convs per group with a residual (width sets the first)."""
    w = width or 128
    return SpeedrunNet(num_classes, (w, 4 * w, 4 * w), dropout=dropout, residual=True, **options)
