"""One optimizer step, and what can go wrong in it: non-finite numbers and running out of memory.

Metrics stay on the device. The non-finite check in "stop" mode is lazy: the first bad step index is kept in a
device tensor and read every `poll` steps (every step on the CPU, where a read costs nothing; every 32 on CUDA
and MPS, whose queues run ahead of the host, so the step loop does not wait on the device). "skip" mode has to
decide before the optimizer steps, so it reads the flag every step: that is its price. Both reads go through
fastcifar.engine.read_scalar, the step loop's only host read (tests count them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastcifar import engine
from fastcifar.device import autocast
from fastcifar.errors import FastCifarError
from fastcifar.fused_step import FusedStep
from fastcifar.models import head_parameters
from fastcifar.optim import Lookahead, build_optimizer, build_scheduler
from fastcifar.recipe import Recipe, ScheduleCfg

LR_POINTS = 16  # lr points per epoch in the history (curves.png): a warm-up of a fraction of an epoch shows

OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


class NonFiniteError(FastCifarError):
    exit_code = 3


class OutOfMemory(FastCifarError):
    exit_code = 4


class NonFiniteStep(Exception):
    """Internal: raised by the step runner, turned into a NonFiniteError by the trainer (which knows the run)."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


@dataclass
class EpochTotals:
    """Accumulators of the epoch in progress; saved in a mid-epoch checkpoint so resuming keeps them exact."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    skipped: int = 0
    lr: float = 0.0
    seconds: float = 0.0  # steady-state step time (warm-up excluded: fastcifar.engine.StepClock)
    warmup_seen: int = 0  # images of the warm-up (compile / graph capture) steps among `seen`
    warmup_s: float = 0.0
    # (step of the epoch, lr it trained at) for every step: the lr curve inside the epoch, where a warm-up or a
    # OneCycle rise happens (one lr an epoch hid them); a few hundred pairs, kept in a mid-epoch checkpoint
    lr_trace: list[tuple[int, float]] = field(default_factory=list)
    # (loss sum, images seen) at the epoch's last TensorBoard step point (fastcifar.tblog): the next point
    # averages from there, and a mid-epoch checkpoint keeps it, so a resumed run logs the same mean
    log_mark: tuple[float, int] | None = None

    @classmethod
    def zeros(cls, device: torch.device, lr: float) -> "EpochTotals":
        return cls(torch.zeros((), device=device, dtype=torch.float64),
                   torch.zeros((), device=device, dtype=torch.int64), lr=lr)

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "seen": self.seen,
                "skipped": self.skipped, "lr": self.lr, "seconds": self.seconds,
                "warmup_seen": self.warmup_seen, "warmup_s": self.warmup_s,
                "lr_trace": [[s, v] for s, v in self.lr_trace],
                "log_mark": list(self.log_mark) if self.log_mark is not None else None}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "EpochTotals":
        return cls(state["loss_sum"].to(device), state["correct"].to(device), int(state["seen"]),
                   int(state["skipped"]), float(state["lr"]), float(state["seconds"]),
                   int(state.get("warmup_seen", 0)), float(state.get("warmup_s", 0.0)),
                   [(int(s), float(v)) for s, v in state.get("lr_trace", [])], _mark(state.get("log_mark")))

    def lr_curve(self, epoch: int, steps: int, points: int = LR_POINTS) -> list[list[float]]:
        """At most `points` [x, lr] pairs of the epoch (0-based `epoch`, `steps` per epoch), evenly spaced, the
        first and last step included; x in epochs, step s of epoch e at e + (s + 1) / steps (its end at e + 1)."""
        trace = self.lr_trace
        picks = sorted({round(i * (len(trace) - 1) / max(points - 1, 1)) for i in range(points)}) if trace else []
        return [[epoch + (trace[i][0] + 1) / max(steps, 1), trace[i][1]] for i in picks if i < len(trace)]


def _mark(value) -> tuple[float, int] | None:
    """A checkpoint's log_mark (absent from checkpoints before it existed: None, the epoch's start)."""
    if value is None:
        return None
    loss_sum, seen = value
    return float(loss_sum), int(seen)


class StepRunner:
    """Forward, backward, optimizer and scheduler step of one batch; built complete by build_step."""

    def __init__(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
                 recipe: Recipe, device: torch.device, dtype: torch.dtype | None, log: Callable[[str], Any], *,
                 ema: engine.WeightEMA | None = None, prepare: Callable[[torch.Tensor], None] | None = None,
                 lookahead: Lookahead | None = None, accum: int = 1, skipped_total: int = 0,
                 fused: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None):
        # net: the model as the step calls it (compiled, graphed or DDP-wrapped); its parameters are the plain
        # model's, which the optimizer holds
        self.net, self.optimizer, self.scheduler, self.scaler = net, optimizer, scheduler, scaler
        self.cfg, self.device, self.dtype, self.log = recipe.train, device, dtype, log
        self.accum = accum  # micro-batches per batch; grows only through oom_retry
        self.skipped_total = skipped_total
        self.poll = 32 if device.type in ("cuda", "mps") else 1
        self._bad_step = torch.full((), -1, device=device, dtype=torch.int64)
        self.ema = ema  # updated after every optimizer step
        self.lookahead = lookahead  # pulls the weights to its slow copy every optim.lookahead_every steps
        self.prepare = prepare  # called with each batch before its forward (CUDA-graph capture / step marker)
        self.fused = fused  # train.compile_step: forward, backward and update in one compiled call

    def step(self, x: torch.Tensor, y: torch.Tensor, totals: EpochTotals, step: int) -> None:
        while True:
            try:
                return self._step(x, y, totals, step)
            except OOM_ERRORS:
                self._on_oom(len(y))

    def _forward_backward(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        loss_total = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        for xc, yc in zip(x.chunk(self.accum), y.chunk(self.accum)):
            with autocast(self.device, self.dtype):
                logits = self.net(xc)
            # Class-index targets, or (MixUp / CutMix) class probabilities: cross_entropy takes both.
            loss = F.cross_entropy(logits.float(), yc, label_smoothing=self.cfg.label_smoothing)
            loss = loss * (len(yc) / len(y))  # micro-batch losses add up to the batch mean
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_total += loss.detach()
            hard = yc.argmax(1) if yc.is_floating_point() else yc  # a mixed batch counts its dominant class
            correct += (logits.detach().argmax(1) == hard).sum()
        return loss_total, correct

    def _step(self, x, y, totals: EpochTotals, step: int) -> None:
        x = engine.input_layout(x, self.cfg.channels_last)
        if self.prepare is not None:
            self.prepare(x)
        if self.fused is not None:  # the update is part of the compiled step (recipe: no clip, no skip mode)
            loss, correct = self.fused(x, y)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss, correct = self._forward_backward(x, y)
        self.after_backward(loss, correct, len(y), totals, step)

    def after_backward(self, loss: torch.Tensor, correct: torch.Tensor, images: int, totals: EpochTotals,
                       step: int) -> None:
        """The step once the gradients are in (the batch's mean loss and hit count, on the device): clipping, the
        non-finite check, the optimizer, Lookahead, EMA, the totals and the schedule. A packed step
        (fastcifar.pack_train) runs one backward for several folds, then this for each fold's own runner. With
        train.compile_step the compiled call has already updated the weights: no clipping or optimizer step here
        (the schedule has not moved: param_groups' lr is still the lr this step trained at)."""
        totals.lr = self.optimizer.param_groups[0]["lr"]
        totals.lr_trace.append((step, totals.lr))
        grad_norm = self._unscale_and_clip() if self.fused is None else None
        if self.cfg.on_nonfinite == "skip" and engine.read_scalar(self._nonfinite(loss, grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            totals.skipped += 1
            self.skipped_total += 1
            if self.skipped_total > self.cfg.max_skipped_steps:
                raise NonFiniteStep(step, f"loss or gradient ({self.skipped_total} steps skipped, more than "
                                          f"train.max_skipped_steps = {self.cfg.max_skipped_steps})")
        else:
            if self.fused is None:
                self._optimizer_step()
            if self.lookahead is not None:
                self.lookahead.after_step()
            if self.ema is not None:
                self.ema.update()
            totals.loss_sum += loss.double() * images
            totals.correct += correct
            totals.seen += images
            if self.cfg.on_nonfinite == "stop":
                self._note_stop_mode(loss, grad_norm, step)
        self.scheduler.step()

    def _unscale_and_clip(self) -> torch.Tensor | None:
        params = self.net.parameters()
        if self.scaler is not None:
            if not self.cfg.grad_clip:
                return None  # fp16 overflow in the gradients is the scaler's business, not an error
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, foreach=True)
        if self.cfg.on_nonfinite == "skip":  # the norm (clip at inf: a no-op) tells if every gradient is finite
            return torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=True)
        return None

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """A device bool: the loss, or (without a GradScaler, which handles its own overflow) the grad norm."""
        bad = ~torch.isfinite(loss)
        if grad_norm is not None and self.scaler is None:
            bad = bad | ~torch.isfinite(grad_norm)
        return bad

    def _note_stop_mode(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, step: int) -> None:
        bad = self._nonfinite(loss, grad_norm)
        self._bad_step = torch.where(bad & (self._bad_step < 0), step, self._bad_step)
        if (step + 1) % self.poll == 0:
            self.check_pending()

    def check_pending(self) -> None:
        """Raise if a non-finite step was recorded since the last read (call at every epoch end too)."""
        bad = int(engine.read_scalar(self._bad_step))
        if bad >= 0:
            self._bad_step.fill_(-1)
            raise NonFiniteStep(bad, "loss or gradient")

    def _on_oom(self, batch: int) -> None:
        micro = -(-batch // self.accum)
        peak = ""
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            peak = (f"; peak {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB of "
                    f"{total / 2**30:.1f} GiB")
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self.cfg.oom_retry or micro < 2:
            raise OutOfMemory(f"out of memory at train.batch_size = {batch} (micro-batch {micro}{peak}); try "
                              f"train.batch_size = {max(1, micro // 2)}, or set train.oom_retry = true to retry "
                              f"with gradient accumulation") from None
        self.accum *= 2
        self.log(f"out of memory at micro-batch {micro}{peak}: retrying the batch of {batch} as "
                           f"{self.accum} micro-batches of {-(-batch // self.accum)} (same effective batch)")


def make_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 on CUDA needs loss scaling; bf16 and fp32 do not (and MPS fp16 has no GradScaler)."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None


def set_trainable(model: torch.nn.Module, stage: int) -> list[torch.nn.Parameter] | None:
    """Stage 1: only the classifier head requires grad (returned, in the model's order: the optimizer's order
    must not vary between runs); stage 2: everything (None)."""
    head = head_parameters(model) if stage == 1 else None
    for p in model.parameters():
        p.requires_grad_(head is None or any(p is h for h in head))
    return head


def stage_steps(recipe: Recipe, steps_per_epoch: int) -> int:
    """Optimizer steps of the full-training stage: train.steps (less the head stage's), else whole epochs."""
    head = recipe.finetune.head_epochs * steps_per_epoch
    if recipe.train.steps:
        return recipe.train.steps - head
    return recipe.train.epochs * steps_per_epoch - head


def build_step(net: torch.nn.Module, model: torch.nn.Module, recipe: Recipe, device: torch.device,
               dtype: torch.dtype | None, *, steps_per_epoch: int, stage: int = 2, scaler=None,
               ema: engine.WeightEMA | None = None, prepare: Callable[[torch.Tensor], None] | None = None,
               log: Callable[[str], Any] = print, accum: int = 1, skipped_total: int = 0) -> StepRunner:
    """The train step, complete: `net` (the model as the step calls it: compiled, graphed or DDP-wrapped) and
    the optimizer over `model`'s parameters for `stage`. Stage 1 trains only the classifier head at
    finetune.head_lr (constant) for finetune.head_epochs; stage 2 trains everything with the recipe's optimizer
    and schedule over the remaining epochs (the whole run when there is no stage 1)."""
    r = recipe
    head = set_trainable(model, stage)
    lookahead = None
    if stage == 1:  # the head alone: plain SGD / Adam (Muon's filters and Lookahead belong to the full run)
        head_optim = replace(r.optim, lr=r.finetune.head_lr, name="sgd" if r.optim.name == "muon" else r.optim.name)
        optimizer = build_optimizer(head_optim, head, device)
        scheduler = build_scheduler(ScheduleCfg(name="constant"), r.optim, optimizer, steps_per_epoch,
                                    r.finetune.head_epochs)
    else:
        epochs = r.train.epochs - r.finetune.head_epochs
        total = stage_steps(r, steps_per_epoch)
        optimizer = build_optimizer(r.optim, model.parameters(), device, total)
        scheduler = build_scheduler(r.schedule, r.optim, optimizer, steps_per_epoch, epochs, total)
        if r.optim.lookahead_every:
            o = r.optim
            lookahead = Lookahead(model, o.lookahead_every, o.lookahead_decay, o.lookahead_power, total)
    fused = None
    if r.train.compile_step and stage == 2:
        if scaler is not None:  # fp16 on a GPU without bf16: GradScaler's unscale / skip are host-side logic
            log("warning: train.compile_step ignored: fp16 with GradScaler (this GPU has no bf16); stepping eagerly")
        else:
            fused = FusedStep(model, optimizer, device, dtype, r.train.label_smoothing, engine.COMPILE_BACKEND,
                              r.train.compile_mode)
    return StepRunner(net, optimizer, scheduler, scaler, recipe, device, dtype, log, ema=ema, prepare=prepare,
                      lookahead=lookahead, accum=accum, skipped_total=skipped_total, fused=fused)
