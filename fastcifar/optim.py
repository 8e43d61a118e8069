"""Optimizers and per-step learning-rate schedules from the recipe."""

from __future__ import annotations

import inspect
import math

import torch

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


def build_optimizer(cfg: OptimCfg, params, device: torch.device) -> torch.optim.Optimizer:
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.name]
    kernel = update_kernel(cls, device)
    if cfg.name == "sgd":
        return cls(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                   **kernel)
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **kernel)


def lr_factor(cfg: ScheduleCfg, step: int, steps_per_epoch: int, total_steps: int, base_lr: float) -> float:
    """Multiplier of the base lr at `step` for the constant / cosine / step schedules (with linear warm-up)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_epochs)
    floor = cfg.min_lr / base_lr
    t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(cfg: ScheduleCfg, optim_cfg: OptimCfg, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A scheduler stepped once per optimizer step (not per epoch), so short runs still anneal smoothly."""
    total = steps_per_epoch * epochs
    if cfg.name == "onecycle":
        # Cycling momentum needs a momentum to cycle: plain SGD without momentum keeps it at 0.
        cycle = optim_cfg.name != "sgd" or optim_cfg.momentum > 0
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.max_lr or optim_cfg.lr, total_steps=total, pct_start=cfg.pct_start,
            anneal_strategy=cfg.anneal, div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor,
            cycle_momentum=cycle)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, total, optim_cfg.lr))
