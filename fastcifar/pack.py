"""Several copies of one model trained as one: the stacked forward of k member models (train.pack).

Each member stays the plain model its solo run builds (same class, same init, its own Parameters), so its
optimizer, schedule, Lookahead, EMA, checkpoints and evaluation are the solo run's own objects. What is shared
is the forward: `PackedNet(members)` is one module whose activations hold the k members side by side in the
channel dimension, (B, k*C, H, W), member j owning channels [j*C, (j+1)*C). Every layer keeps that layout:

- a convolution is the members' convolutions as one grouped convolution (their filters concatenated, groups x k);
- BatchNorm normalises k*C channels (each a member's channel, so its statistics are the member's alone);
- a linear layer is one batched matrix product (k, B, in) x (k, in, out);
- pooling and pointwise layers act per channel as they are.

The members' weights are concatenated in every forward (torch.cat is differentiable: each member's gradient
lands in its own Parameter). BatchNorm running statistics (and the speedrun nets' frozen whitening filters) are
updated in place, so they live in one packed buffer while the member trains, and the member's own buffer tensor
is re-pointed at its slice of it (`bind`; the same tensor objects, so EMA and Lookahead, which hold them, follow);
`unbind` gives each member its own copy back.

Why grouped layers and not torch.func (stack_module_state + vmap(functional_call)): measured on this CPU,
bench/pack_choice.py; see the README's "Packed k-fold" section.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models.resnet as tvr

from fastcifar.errors import RecipeError
from fastcifar.models.resnet import Residual, Scale
from fastcifar.models.speedrun import PatchWhitening, ResidualConvGroup, ShiftBatchNorm

# Parameter-free layers that act per channel (or per feature): the members' instance serves the pack as it is.
STATELESS = (nn.ReLU, nn.GELU, nn.SiLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
             nn.Identity, nn.Dropout, Scale)
# Containers whose own forward only composes their children with per-channel operations (x + f(x), flatten):
# a copy of one with packed children computes the pack. nn.Sequential subclasses that keep its forward count too.
CONTAINERS = (Residual, ResidualConvGroup, tvr.BasicBlock, tvr.ResNet)


class NotPackable(RecipeError):
    """A model (or a layer of it) the pack cannot stack."""


class _Twin(nn.Module):
    """A packed layer over the members' layers of one place in the model (registered, so .train() reaches them)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.k = len(members)

    def cat(self, name: str) -> torch.Tensor | None:
        """The members' parameter `name` concatenated along its first dimension (None where they have none)."""
        parts = [getattr(m, name) for m in self.members]
        return None if parts[0] is None else torch.cat(parts)

    # Buffers the layer updates in place (running statistics): one packed tensor while bound.
    BOUND: tuple[str, ...] = ()

    def bind(self) -> None:
        """Packed buffers from the members' current values; each member's buffer becomes a view of its slice."""
        for name in self.BOUND:
            parts = [getattr(m, name) for m in self.members]
            if parts[0] is None:
                continue
            packed = torch.stack(parts) if parts[0].dim() == 0 else torch.cat(parts)
            self.register_buffer(name, packed, persistent=False)
            n = len(packed) // self.k
            for j, p in enumerate(parts):
                p.data = packed[j] if p.dim() == 0 else packed[j * n:(j + 1) * n]

    def unbind(self) -> None:
        """Each member's buffers as its own tensors again (a copy of its slice)."""
        for name in self.BOUND:
            for m in self.members:
                t = getattr(m, name)
                if t is not None:
                    t.data = t.detach().clone()
            self._buffers.pop(name, None)


class PackedConv2d(_Twin):
    def __init__(self, members: Sequence[nn.Conv2d]):
        super().__init__(members)
        c = members[0]
        if c.padding_mode != "zeros":
            raise NotPackable(f"model.name: a Conv2d with padding_mode={c.padding_mode!r} cannot be packed")
        self.stride, self.padding, self.dilation, self.groups = c.stride, c.padding, c.dilation, c.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.cat("weight"), self.cat("bias"), self.stride, self.padding, self.dilation,
                        self.groups * self.k)


class PackedLinear(_Twin):
    """(B, k*in) -> (B, k*out): member j's features are block j of each row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k = x.shape[0], self.k
        xs = x.reshape(b, k, -1).transpose(0, 1)  # (k, B, in)
        w = torch.stack([m.weight for m in self.members]).transpose(1, 2)  # (k, in, out)
        if self.members[0].bias is None:
            y = torch.bmm(xs, w)
        else:
            y = torch.baddbmm(torch.stack([m.bias for m in self.members]).unsqueeze(1), xs, w)
        return y.transpose(0, 1).reshape(b, -1)


class PackedBatchNorm2d(_Twin):
    """nn.BatchNorm2d over k*C channels, with its running-statistics bookkeeping (batch count, momentum)."""

    BOUND = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, members: Sequence[nn.BatchNorm2d]):
        super().__init__(members)
        bn = members[0]
        self.momentum, self.eps, self.track = bn.momentum, bn.eps, bn.track_running_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average: every member has seen the same number of batches
                factor = 1.0 / float(self.num_batches_tracked[0])
        use_batch = self.training or not self.track
        stats = (self.running_mean, self.running_var) if self.track else (None, None)
        return F.batch_norm(x, *stats, self.cat("weight"), self.cat("bias"), use_batch, factor, self.eps)


class PackedShiftBatchNorm(_Twin):
    """fastcifar.models.speedrun.ShiftBatchNorm over k*C channels (scale fixed at 1, shift = gain * bias)."""

    BOUND = ("running_mean", "running_var")

    def __init__(self, members: Sequence[ShiftBatchNorm]):
        super().__init__(members)
        bn = members[0]
        self.momentum, self.eps, self.gain = bn.momentum, bn.eps, bn.bias_gain
        self.register_buffer("unit_scale", torch.ones(self.k * bn.num_features, device=bn.unit_scale.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.unit_scale, self.cat("bias") * self.gain,
                            self.training, self.momentum, self.eps)


class PackedWhitening(_Twin):
    """The speedrun nets' frozen patch-whitening conv (a buffer each member fitted to its own fold's images)."""

    BOUND = ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.cat("bias").to(x.dtype), groups=self.k)


PACKERS: dict[type, Callable[[Sequence[nn.Module]], _Twin]] = {
    nn.Conv2d: PackedConv2d, nn.Linear: PackedLinear, nn.BatchNorm2d: PackedBatchNorm2d,
    ShiftBatchNorm: PackedShiftBatchNorm, PatchWhitening: PackedWhitening,
}


def _is_container(m: nn.Module) -> bool:
    return type(m) in CONTAINERS or (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward)


def _pack(members: Sequence[nn.Module], where: str) -> nn.Module:
    first = members[0]
    kind = type(first)
    if any(type(m) is not kind for m in members):
        raise NotPackable(f"model.name: the packed models differ at {where or 'the top'}")
    if kind in PACKERS:
        shapes = [[tuple(t.shape) for t in (*m.parameters(), *m.buffers())] for m in members]
        if any(s != shapes[0] for s in shapes):
            raise NotPackable(f"model.width: the packed models' {where} layers differ in shape")
        return PACKERS[kind](members)
    if isinstance(first, STATELESS):
        if isinstance(first, nn.Dropout) and first.p > 0:
            raise NotPackable(f"model.dropout: {first.p} cannot be packed (each fold would need its solo run's "
                              "dropout masks); set model.dropout = 0 or train.pack = 1")
        return first
    if not _is_container(first) or first._parameters or first._buffers:
        what = f"its {kind.__name__} layer ({where})" if where else kind.__name__
        raise NotPackable(f"model.name: {what} cannot be packed; set train.pack = 1")
    clone = kind.__new__(kind)
    clone.__dict__ = {**first.__dict__, "_parameters": OrderedDict(), "_buffers": OrderedDict(),
                      "_non_persistent_buffers_set": set(), "_modules": OrderedDict()}
    for name, child in first.named_children():
        clone._modules[name] = _pack([getattr(m, name) for m in members], f"{where}.{name}".lstrip("."))
    return clone


class PackedNet(nn.Module):
    """k member models as one module: forward takes the members' batches side by side in the channel dimension,
    (B, k*3, H, W), and returns their logits side by side, (B, k*classes). Built unbound: `bind` before training
    it, `unbind` before a member goes its own way."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("PackedNet: no members")
        self.k = len(members)
        self.body = _pack(list(members), "")
        self.bound = False

    def twins(self) -> list[_Twin]:
        return [m for m in self.body.modules() if isinstance(m, _Twin)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @torch.no_grad()
    def bind(self) -> None:
        if not self.bound:
            for t in self.twins():
                t.bind()
            self.bound = True

    @torch.no_grad()
    def unbind(self) -> None:
        if self.bound:
            for t in self.twins():
                t.unbind()
            self.bound = False


def stack_inputs(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The members' batches (B, C, H, W) as one packed batch (B, k*C, H, W); its memory format is theirs."""
    return xs[0] if len(xs) == 1 else torch.cat(list(xs), 1)


def split_logits(logits: torch.Tensor, k: int) -> list[torch.Tensor]:
    """(B, k*classes) -> member j's (B, classes) logits, for j in range(k) (views)."""
    return list(logits.view(logits.shape[0], k, -1).unbind(1))
