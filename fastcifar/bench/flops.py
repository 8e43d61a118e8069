"""Parameters and FLOPs per image, counted by torch.utils.flop_counter on a real forward (+ backward).

FlopCounterMode counts 2 FLOPs per multiply-add of matmuls and convolutions (and attention); elementwise ops,
norms and pooling are not counted, which is the usual convention for MFU. The backward counts what autograd
actually computes: a layer whose input needs no gradient (the first conv) costs one matmul there, not two.
"""

from __future__ import annotations

import torch


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, x: torch.Tensor, *, backward: bool) -> int:
    """Total FLOPs of model(x) (and, with backward, of the backward of a scalar loss) on this batch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        if backward:
            out.float().sum().backward()
    if backward:
        model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def flops_per_image(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image, counted on batch x in train mode (BatchNorm needs >= 2)."""
    was_training = model.training
    model.train()
    try:
        fwd = count_flops(model, x, backward=False)
        both = count_flops(model, x, backward=True)
    finally:
        model.train(was_training)
    return fwd / len(x), both / len(x)
