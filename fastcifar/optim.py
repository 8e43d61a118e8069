"""Optimizers and per-step learning-rate schedules from the recipe."""

from __future__ import annotations

import inspect
import math

import torch

from fastcifar.errors import RecipeError
from fastcifar.muon import BatchedMuon
from fastcifar.recipe import OptimCfg, ScheduleCfg


def update_kernel(cls: type[torch.optim.Optimizer], device: torch.device) -> dict[str, bool]:
    """How the optimizer updates its parameters: fused on CUDA where this torch has it for `cls` (one kernel
    for all parameters, and GradScaler then skips its per-step host read of found_inf); foreach on the CPU
    (one launch per op instead of one per tensor); torch's own default elsewhere (MPS)."""
    if device.type == "cuda" and "fused" in inspect.signature(cls.__init__).parameters:
        return {"fused": True}
    if device.type in ("cuda", "cpu"):
        return {"foreach": True}
    return {}


def build_optimizer(cfg: OptimCfg, params, device: torch.device, total_steps: int = 0) -> torch.optim.Optimizer:
    """total_steps: the run's optimizer steps (the batched Muon's adaptive renormalisation follows progress)."""
    if cfg.name == "muon":
        return MuonFilters(*conv_filters(list(params)), cfg, device, total_steps)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.name]
    kernel = update_kernel(cls, device)
    if cfg.name == "sgd":
        return cls(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                   **kernel)
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **kernel)


def lr_factor(cfg: ScheduleCfg, step: int, steps_per_epoch: int, total_steps: int, base_lr: float) -> float:
    """Multiplier of the base lr at `step` for the constant / cosine / step / linear schedules (with linear
    warm-up)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "triangle":
        return triangle_factor(cfg, step, total_steps, base_lr)
    if cfg.name == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_epochs)
    if cfg.name == "linear":  # the records' (airbench94_muon, Hiverge): 1 - step / T, reaching 0 at step T
        return 1.0 - (step - warmup) / max(1, total_steps - warmup)
    floor = cfg.min_lr / base_lr
    t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def triangle_factor(cfg: ScheduleCfg, step: int, total_steps: int, base_lr: float) -> float:
    """airbench's piecewise-linear schedule: straight from peak / div_factor at step 0 to the peak (max_lr or
    optim.lr) at step int(pct_start * T), then straight down to reach peak / (div_factor * final_div_factor) at
    step T; step i trains at the value at i, so the last step (T - 1) sits one step above the end value."""
    peak_step = max(1, int(cfg.pct_start * total_steps))
    start = 1.0 / cfg.div_factor
    end = start / cfg.final_div_factor
    if step <= peak_step:
        f = start + (1.0 - start) * step / peak_step
    else:
        f = 1.0 + (end - 1.0) * (step - peak_step) / max(1, total_steps - peak_step)
    return f * (cfg.max_lr or base_lr) / base_lr


def onecycle_pct(pct_start: float, total_steps: int) -> float:
    """pct_start as torch's OneCycleLR can take it. Its warm-up ends at step pct_start * T - 1; where that is 0
    (0.25 of 4 steps, 0.5 of 2, 1/3 of 3) the warm-up starts and ends at step 0 and OneCycleLR divides 0 by 0
    (ZeroDivisionError at the first step). The largest float below it moves the end a hair before step 0, so
    step 0 trains at the peak, as the product a hair below 1 always did (the anneal's first point: exactly the
    peak for "cos", within 1e-15 of it for "linear")."""
    while float(pct_start * total_steps) - 1 == 0:
        pct_start = math.nextafter(pct_start, 0.0)
    return pct_start


def build_scheduler(cfg: ScheduleCfg, optim_cfg: OptimCfg, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int, epochs: int,
                    total_steps: int | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """A scheduler stepped once per optimizer step (not per epoch), so short runs still anneal smoothly; it spans
    total_steps (train.steps) when given, else epochs whole epochs."""
    total = total_steps or steps_per_epoch * epochs
    if cfg.name == "onecycle":
        # Cycling momentum needs a momentum to cycle: plain SGD without momentum keeps it at 0.
        cycle = cfg.cycle_momentum and (optim_cfg.name not in ("sgd", "muon") or optim_cfg.momentum > 0)
        # Each group peaks at its own base lr times max_lr / lr (Muon's filters have their own base lr).
        peak = (cfg.max_lr or optim_cfg.lr) / optim_cfg.lr
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] * peak for g in optimizer.param_groups], total_steps=total,
            pct_start=onecycle_pct(cfg.pct_start, total),
            anneal_strategy=cfg.anneal, div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor,
            cycle_momentum=cycle)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, total, optim_cfg.lr))


# ---------------------------------------------------------------------------------------------- Muon


class MuonFilters(torch.optim.Optimizer):
    """optim.name = "muon": torch.optim.Muon on the conv filters (optim.muon_impl = "batched": fastcifar.muon's
    BatchedMuon, one Newton-Schulz call over all of them), SGD on every other parameter, as one optimizer
    (one state dict, one set of param groups for the lr schedule: Muon's group first, then SGD's).

    Muon takes 2-D parameters only; a conv filter (out, in, k, k) is handed to it as a 2-D view (out, in*k*k) of
    the same storage, so Muon's in-place update is the filter's. Before each step the views get the filters'
    gradients (views too: nothing is copied), after the clipping and non-finite checks that read them.
    """

    def __init__(self, filters: list[torch.nn.Parameter], rest: list[torch.nn.Parameter], cfg: OptimCfg,
                 device: torch.device, total_steps: int = 0):
        if not filters:
            raise RecipeError('optim.name: "muon" found no conv filters in the model; use "sgd"')
        self.filters = filters
        self.batched = cfg.muon_impl == "batched"
        if self.batched:  # the filters themselves, any layout: one Newton-Schulz call per step for all of them
            self.nhwc, self.views = [], []
            self.muon = BatchedMuon(filters, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True,
                                    weight_decay=cfg.muon_weight_decay, coefficients=cfg.muon_ns_coefficients,
                                    ns_steps=cfg.muon_ns_steps, renorm=cfg.muon_renorm,
                                    ns_dtype=getattr(torch, cfg.muon_ns_dtype), total_steps=total_steps)
        else:
            if not hasattr(torch.optim, "Muon"):
                raise RecipeError(f'optim.name: "muon" needs torch.optim.Muon (torch 2.9 or newer), this is '
                                  f"torch {torch.__version__}")
            self.nhwc = [not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                         for p in filters]
            self.views = [torch.nn.Parameter(_matrix(p.detach(), nhwc)) for p, nhwc in zip(filters, self.nhwc)]
            self.muon = torch.optim.Muon(self.views, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True,
                                         weight_decay=cfg.muon_weight_decay)
        # torch.optim refuses an empty parameter list: a model of conv filters only gets a placeholder group
        self.sgd = torch.optim.SGD(rest or [torch.nn.Parameter(torch.zeros(0))], lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                   **update_kernel(torch.optim.SGD, device))
        super().__init__([{"params": self.views or filters}], {"lr": cfg.lr, "momentum": cfg.momentum})
        # The schedulers scale every group's lr and momentum: Muon's and SGD's groups are the ones stepped.
        self.param_groups = self.muon.param_groups + self.sgd.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        for view, p, nhwc in zip(self.views, self.filters, self.nhwc):
            # the gradient in the filter's column order (a copy only if its layout differs)
            view.grad = None if p.grad is None else (p.grad.permute(0, 2, 3, 1) if nhwc else p.grad).reshape(
                view.shape)
        self.muon.step()
        return self.sgd.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none)
        for p in [*self.filters, *self.views]:
            p.grad = None

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "sgd": self.sgd.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.sgd.load_state_dict(state["sgd"])
        self.param_groups = self.muon.param_groups + self.sgd.param_groups


def _matrix(t: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """A conv filter bank (out, in, k, k) as a 2-D view of its storage: (out, in*k*k), or (out, k*k*in) for
    channels-last filters, a column permutation, which Muon's orthogonalisation commutes with."""
    if nhwc:
        return t.permute(0, 2, 3, 1).view(t.shape[0], -1)
    if not t.is_contiguous():
        raise RecipeError('optim.name: "muon" needs contiguous or channels-last conv filters')
    return t.view(t.shape[0], -1)


def conv_filters(params: list[torch.nn.Parameter]) -> tuple[list, list]:
    """(4-D conv filters, everything else), each in the order given."""
    filters = [p for p in params if p.ndim == 4]
    return filters, [p for p in params if p.ndim != 4]


# ---------------------------------------------------------------------------------------------- Lookahead


class Lookahead:
    """airbench's Lookahead over a model's parameters and float buffers: every `every` optimizer steps,
    slow += (1 - d) (w - slow) and w = slow, with d = decay * (t / total) ** power (t: steps done); after the
    last step (that pull first, when the last step is one of them) w = slow. The slow copy and the step count
    are the state a checkpoint keeps."""

    def __init__(self, model: torch.nn.Module, every: int, decay: float, power: float, total_steps: int):
        self.every, self.decay, self.power, self.total = every, decay, power, max(total_steps, 1)
        self.tensors = [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]
        self.slow = [t.detach().clone() for t in self.tensors]
        self.steps = 0

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps += 1
        pull = self.steps % self.every == 0
        if pull:
            d = self.decay * (min(self.steps, self.total) / self.total) ** self.power
            for slow, t in zip(self.slow, self.tensors):
                slow.lerp_(t.detach(), 1.0 - d)
        if pull or self.steps >= self.total:  # the run ends on the slow weights
            for slow, t in zip(self.slow, self.tensors):
                t.detach().copy_(slow)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "slow": [s.clone() for s in self.slow]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for slow, saved in zip(self.slow, state["slow"]):
            slow.copy_(saved)
