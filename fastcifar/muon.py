"""Muon with one batched Newton-Schulz call per step over all conv filters (optim.muon_impl = "batched"), the way
the current CIFAR-10 records orthogonalise: every filter's update, flattened to a (out, in*k*k) matrix, is
zero-padded into one (n, rows, cols) stack and orthogonalised together (Hiverge's cifar10-speedrun; airbench94_muon
runs the same iteration one filter at a time). Zero padding changes nothing: X X^T of a padded matrix is the
original's padded, and every iterate stays zero outside it.

Per step, for the filters p with gradient g (airbench94_muon's and Hiverge's order):
  buf = m * buf + g;  u = g + m * buf (Nesterov) or buf
  renormalise (optim.muon_renorm): p *= sqrt(out) / (|p| + 1e-7) every step ("every", airbench94_muon) or when
      step - last >= 2 + floor(15 * step / T) ("adaptive", Hiverge: from every 2nd step to every 17th)
  p -= lr * NS(u);  p *= 1 - lr * wd (optim.muon_weight_decay, Hiverge's order)
NS: X = U / (|U| + eps) per matrix, then muon_ns_steps of X = a X + (b A + c A^2) X with A = X X^T (on the wide
orientation, rows <= cols), in muon_ns_dtype. The step counters are tensors, so the step has no host read and
no value-dependent Python branch (it compiles into one graph with the rest of the train step).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

NS_EPS = 1e-7


def orthogonalize(mats: Sequence[torch.Tensor], coefficients: Sequence[float], steps: int,
                  dtype: torch.dtype | None = None, pad_to: int = 16) -> list[torch.Tensor]:
    """Newton-Schulz on every matrix of `mats` in one batched call: each is turned wide (rows <= cols), zero-padded
    to (max rows, max cols rounded up to pad_to) and stacked; the results come back in each matrix's own shape,
    in `dtype` (default: the matrices' own)."""
    tall = [m.shape[0] > m.shape[1] for m in mats]
    wide = [m.mT if t else m for m, t in zip(mats, tall)]
    rows = max(m.shape[0] for m in wide)
    cols = -(-max(m.shape[1] for m in wide) // pad_to) * pad_to
    x = torch.stack([F.pad(m.to(dtype or m.dtype), (0, cols - m.shape[1], 0, rows - m.shape[0])) for m in wide])
    x = x / (x.norm(dim=(1, 2), keepdim=True) + NS_EPS)
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    out = [x[i, :m.shape[0], :m.shape[1]] for i, m in enumerate(wide)]
    return [o.mT if t else o for o, t in zip(out, tall)]


class BatchedMuon(torch.optim.Optimizer):
    """Muon over 4-D conv filters (any memory format) with one batched Newton-Schulz call per step (see the
    module docstring). total_steps: the run's steps, for the adaptive renormalisation's interval."""

    def __init__(self, params, lr: float, momentum: float, nesterov: bool = True, weight_decay: float = 0.0,
                 coefficients: Sequence[float] = (3.4445, -4.775, 2.0315), ns_steps: int = 5,
                 renorm: str = "none", ns_dtype: torch.dtype | None = None, total_steps: int = 0):
        if renorm not in ("none", "every", "adaptive"):
            raise ValueError(f"renorm: none, every or adaptive, got {renorm!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.coefficients, self.ns_steps, self.renorm, self.ns_dtype = tuple(coefficients), ns_steps, renorm, ns_dtype
        self.total_steps = max(total_steps, 1)
        first = self.param_groups[0]["params"][0]
        # steps taken and the last renormalised step, as tensors (checkpointed with the group)
        self.counters = torch.zeros(2, dtype=torch.int64, device=first.device)

    @torch.no_grad()
    def step(self, closure=None):
        renorm = self.advance()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params, [p.grad for p in params], group["lr"], renorm)
        return None

    def advance(self) -> torch.Tensor | bool:
        """Count a step; whether its filters are renormalised (a device bool for "adaptive")."""
        self.counters[0] += 1
        step, last = self.counters[0], self.counters[1]
        if self.renorm == "every":
            return True
        if self.renorm == "none":
            return False
        # Hiverge: norm_freq = 2 + int(15 * step / T); renormalise when step - last >= norm_freq
        every = 2 + torch.div(15 * step, self.total_steps, rounding_mode="floor")
        now = step - last >= every
        self.counters[1] = torch.where(now, step, last)
        return now

    def buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The momentum buffers of `params`, created (zeros: the first step's buffer is then its gradient)."""
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [self.state[p]["momentum_buffer"] for p in params]

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], lr, renorm,
                momentum=None) -> None:
        """One step of `params` with `grads`; lr and momentum floats or 0-d tensors (the compiled step's)."""
        m = group["momentum"] if momentum is None else momentum
        bufs = self.buffers(params)
        torch._foreach_mul_(bufs, m)
        torch._foreach_add_(bufs, grads)
        if not group["nesterov"]:
            updates = bufs
        elif isinstance(m, torch.Tensor):  # alpha= takes numbers only
            updates = torch._foreach_add(grads, torch._foreach_mul(bufs, m))
        else:
            updates = torch._foreach_add(grads, bufs, alpha=m)
        ortho = orthogonalize([u.reshape(len(u), -1) for u in updates], self.coefficients, self.ns_steps,
                              self.ns_dtype)
        if renorm is not False:
            norms = torch._foreach_norm(params)
            scale = [math.sqrt(len(p)) / (n + 1e-7) for p, n in zip(params, norms)]
            if renorm is not True:  # a device bool: scale 1 on the steps between renormalisations
                scale = [torch.where(renorm, s, torch.ones_like(s)) for s in scale]
            torch._foreach_mul_(params, [s.to(p.dtype) for s, p in zip(scale, params)])
        ortho = [o.view(p.shape).to(p.dtype) for o, p in zip(ortho, params)]
        if isinstance(lr, torch.Tensor):  # the compiled step passes its lr as a tensor (no recompile per value)
            torch._foreach_sub_(params, torch._foreach_mul(ortho, lr))
        else:
            torch._foreach_add_(params, ortho, alpha=-lr)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["counters"] = self.counters.cpu().tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        counters = state.pop("counters", [0, 0])
        super().load_state_dict(state)
        self.counters.copy_(torch.tensor(counters, dtype=torch.int64))
