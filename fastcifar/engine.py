"""The throughput engine around the train step: torch.compile, CUDA graphs, weight EMA, test-time augmentation,
the compile warm-up clock, and the one place the step loop reads a device value on the host.

Decisions (see plan_engine):
- compile: torch.compile(model, mode=train.compile_mode) on any device when train.compile is set (inductor
  on CPU builds C++ kernels: ~90 s of warm-up for the tiny test CNN on 2 cores, so it is never a default). The
  checkpoints always hold the plain module's state_dict: the trainer keeps the uncompiled module and only steps
  through the compiled wrapper, so no "_orig_mod." prefix is ever saved (strip_compile_prefix reads ones that were).
- CUDA graphs (train.cuda_graphs): forward + backward of the model are captured with
  torch.cuda.make_graphed_callables at the first training batch; the loss, the optimizer step and the scheduler
  stay eager. Whole-step capture would bake the per-step learning rate and OneCycle's cycled momentum into the
  graph as constants (torch's SGD and the schedulers pass them as Python floats), so every replay would train at
  the captured values; the fused optimizer is 1-3 kernel launches per step anyway, the conv net's forward and
  backward are hundreds. With train.compile on, the compiler's own CUDA graphs are used instead (mode
  "reduce-overhead"). Where graphs cannot work the run warns in one line and trains eagerly (the same numbers):
  on a CPU or MPS device (warning rather than error, so one recipe serves a GPU box and a laptop), with
  train.oom_retry (micro-batches change the captured shape), with finetune.head_epochs (the trainable set
  changes between stages) and under torch.distributed (DDP's gradient hooks run outside a captured graph).
  Grad clipping and on_nonfinite = "skip" stay allowed: they act after the graphed backward, eagerly.
- Devices: everything CUDA-only (graphs, synchronize, the cudagraph step marker) is behind a device.type check;
  MPS and CPU get compile (opt-in), EMA, TTA and the warm-up clock as they are. AMP is fastcifar.device's:
  bf16 autocast on CUDA (fp16 + GradScaler without bf16), fp16 on MPS, bf16 on the CPU, fp32 with amp off.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from fastcifar.errors import first_line
from fastcifar.recipe import Recipe

# Test seam: the backend torch.compile uses. Tests set "eager" / "aot_eager" (dynamo tracing, no C++ build).
COMPILE_BACKEND = "inductor"
COMPILE_PREFIX = "_orig_mod."  # what torch.compile's wrapper puts before every state_dict key
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor modes that record CUDA graphs


# ---------------------------------------------------------------------------------------------- host reads


def read_scalar(t: torch.Tensor) -> float | int | bool:
    """The single place the step loop copies a device value to the host (a stream sync on CUDA and MPS).

    The step loop calls it only for the lazy non-finite poll (every 32 steps on CUDA / MPS) and for
    on_nonfinite = "skip" (every step: it must decide before the optimizer steps). Tests count its calls.
    """
    return t.item()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (for honest wall-clock boundaries); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def input_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The loader yields channels-last batches; with train.channels_last off the model gets NCHW-contiguous
    ones, else a conv with channels-last input would run channels-last anyway (torch follows the input)."""
    return x if channels_last else x.contiguous()


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class EnginePlan:
    compile: bool
    compile_mode: str
    graphs: Literal["off", "module", "compiler"]  # module: make_graphed_callables; compiler: inductor's
    warmup_steps: int  # first steps timed as warm-up (compile / capture), kept out of img/s
    notes: tuple[str, ...] = ()  # one-line warnings for the user (a requested feature that is off)
    compile_step: bool = False  # train.compile_step: the whole step is one compiled graph (fastcifar.fused_step)

    def as_dict(self) -> dict:
        return asdict(self)


def _graph_refusal(recipe: Recipe, device: torch.device, distributed: bool) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA device, this run is on {device.type}"
    if recipe.train.compile:
        return None  # the compiler records its own graphs and re-records for new shapes
    if recipe.train.oom_retry:
        return "train.oom_retry splits batches into micro-batches of other shapes than the captured one"
    if recipe.finetune.head_epochs:
        return "finetune.head_epochs changes the trainable parameters between stages"
    if recipe.model.whiten_bias_epochs:
        return "model.whiten_bias_epochs freezes a parameter mid-run, after capture"
    if distributed:
        return "DistributedDataParallel's gradient hooks run outside a captured graph"
    return None


def plan_engine(recipe: Recipe, device: torch.device, distributed: bool | None = None) -> EnginePlan:
    """What the engine will do for this recipe on this device, and why a requested feature is off."""
    tr = recipe.train
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    notes: list[str] = []
    mode, graphs = tr.compile_mode, "off"
    if tr.cuda_graphs:
        why = _graph_refusal(recipe, device, distributed)
        if why:
            notes.append(f"train.cuda_graphs ignored: {why}; training without CUDA graphs")
        elif tr.compile:
            graphs = "compiler"
            mode = {"default": "reduce-overhead", "max-autotune-no-cudagraphs": "max-autotune"}.get(mode, mode)
        else:
            graphs = "module"
    if tr.compile and device.type == "cuda" and mode in CUDAGRAPH_MODES:
        graphs = "compiler"
    # Warm-up: compile happens in step 1 (forward and backward); the compiler's CUDA graphs run step 1 eagerly,
    # record in step 2 and replay from step 3; make_graphed_callables captures inside step 1.
    warmup = 3 if graphs == "compiler" else 1 if (tr.compile or tr.compile_step or graphs == "module") else 0
    return EnginePlan(tr.compile, mode, graphs, warmup, tuple(notes), tr.compile_step)


def compile_model(model: torch.nn.Module, mode: str, backend: str | None = None) -> torch.nn.Module:
    """torch.compile; `mode` only means something to inductor (other backends refuse it)."""
    backend = backend or COMPILE_BACKEND
    return torch.compile(model, backend=backend, **({"mode": mode} if backend == "inductor" else {}))


def strip_compile_prefix(state: dict) -> dict:
    """A state_dict saved from a compiled wrapper, as the plain module's (keys without "_orig_mod.")."""
    if not isinstance(state, dict) or not any(isinstance(k, str) and k.startswith(COMPILE_PREFIX) for k in state):
        return state  # plain already, or not a state_dict at all (load_state_dict says so in its own words)
    state = copy.copy(state)  # keeps an OrderedDict's _metadata (module versions)
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, COMPILE_PREFIX)
    return state


# ---------------------------------------------------------------------------------------------- CUDA graphs


def capture_module(model: torch.nn.Module, sample: torch.Tensor, device: torch.device,
                   dtype: torch.dtype | None) -> None:
    """Graph model's training-mode forward + backward in place (model.forward replays the graph in training
    mode; eval mode keeps the eager forward). make_graphed_callables runs 3 warm-up passes, which move the
    BatchNorm running stats and the CUDA generator: both are restored, so graphing does not change the run."""
    buffers = [b.detach().clone() for b in model.buffers()]
    rng = torch.cuda.get_rng_state(device)
    try:
        # Autocast's weight-cast cache cannot live across graph replays: capture with the cache off.
        amp = (torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype is not None
               else contextlib.nullcontext())
        with amp:
            torch.cuda.make_graphed_callables(model, (sample.detach().clone(),))
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        torch.cuda.set_rng_state(rng, device)


class LazyCapture:
    """The step's `prepare` hook for module graphs: captures at the first batch (its shape and dtype are the
    static ones; training drops the ragged last batch, so every training batch has them)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None,
                 warn: Callable[[str], object]):
        self.model, self.device, self.dtype, self.warn = model, device, dtype, warn
        self.state: Literal["pending", "captured", "failed"] = "pending"

    def __call__(self, x: torch.Tensor) -> None:
        if self.state != "pending":
            return
        try:
            capture_module(self.model, x, self.device, self.dtype)
            self.state = "captured"
        except (RuntimeError, AssertionError) as e:  # an op that cannot be captured: eager is still correct
            self.state = "failed"
            self.warn(f"train.cuda_graphs: capture failed ({first_line(e)}); training without CUDA graphs")


def mark_compiler_step(_x: torch.Tensor) -> None:
    """The step's `prepare` hook with the compiler's graphs: a new iteration begins, so the graph outputs of
    the last one may be overwritten (cudagraph trees otherwise guess the boundary)."""
    torch.compiler.cudagraph_mark_step_begin()


# ---------------------------------------------------------------------------------------------- weight EMA


class WeightEMA:
    """Exponential moving average of a model's weights, on the model's device, updated after every optimizer step:
    E_0 = W_0, E_t = decay * E_{t-1} + (1 - decay) * W_t, one foreach lerp (no host read). Buffers (BatchNorm
    running stats, batch counts) are copied, not averaged: they describe activations of the current weights.

    Not torch.optim.swa_utils.AveragedModel: its update_parameters reads `n_averaged` on the host twice per call
    (bool(n_averaged == 0), n_averaged > 0), a GPU sync every step.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model)
        self.module.eval().requires_grad_(False)
        self._src = list(model.parameters())
        self._dst = list(self.module.parameters())
        self._src_buf = list(model.buffers())
        self._dst_buf = list(self.module.buffers())

    @torch.no_grad()
    def update(self) -> None:
        if self._dst:
            torch._foreach_lerp_(self._dst, self._src, 1.0 - self.decay)
        if self._dst_buf:
            torch._foreach_copy_(self._dst_buf, self._src_buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- TTA

# (dy, dx, flip, weight) per view; a view is x shifted by (dy, dx) pixels (reflect-filled), then mirrored.
# flip_translate is airbench94's level-2 TTA: 1/2 on the image pair (x, mirror) and 1/2 spread over the pairs
# of the two diagonal 1-pixel shifts: 1/4 + 1/4 + 4 x 1/8 = 1.
TTA_VIEWS: dict[str, tuple[tuple[int, int, bool, float], ...]] = {
    "none": ((0, 0, False, 1.0),),
    "flip": ((0, 0, False, 0.5), (0, 0, True, 0.5)),
    "flip_translate": ((0, 0, False, 0.25), (0, 0, True, 0.25),
                       (1, 1, False, 0.125), (1, 1, True, 0.125),
                       (-1, -1, False, 0.125), (-1, -1, True, 0.125)),
    # Hiverge's TTA (cifar10-speedrun @ 5cd49b1): the same six views, each weighted 1/6.
    "flip_translate_mean": tuple((dy, dx, flip, 1 / 6) for dy, dx in ((0, 0), (1, 1), (-1, -1))
                                 for flip in (False, True)),
}


def tta_view(x: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """x (B, C, H, W) moved down dy and right dx pixels (|d| <= 1, reflect fill at the border), then mirrored."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    if dy or dx:
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        x = padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
    if flip:
        x = x.flip(-1)
    return x.contiguous(memory_format=fmt)


def select_least_confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the int(N * fraction) rows whose softmax maximum is lowest (Hiverge's selective TTA picks the
    25 % least confident test images this way), in no particular order."""
    k = int(len(logits) * fraction)
    confidence = logits.float().softmax(1).amax(1)
    return torch.topk(confidence, k, largest=False, sorted=False).indices


def tta_logits(model: torch.nn.Module, x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Weighted mean of the logits over TTA_VIEWS[mode], float32, in a fresh tensor (a graphed or
    cudagraph-compiled model reuses its output buffer on the next call)."""
    views = TTA_VIEWS[mode]
    out = None
    for dy, dx, flip, weight in views:
        logits = model(tta_view(x, dy, dx, flip) if (dy or dx or flip) else x).float()
        out = logits * weight if out is None else out.add_(logits, alpha=weight)
    return out


# ---------------------------------------------------------------------------------------------- warm-up clock


class StepClock:
    """Splits an epoch's step time into warm-up and steady state.

    Rule: the first `warmup` steps a trainer runs after it is built (a fresh run's first epoch, or the first
    epoch trained after a resume, since a new process compiles again) are warm-up. Their wall time, from the
    epoch start to the end of the last warm-up step (device synchronised there, once), is compile_time_s, and
    neither that time nor those steps' images enter img_per_s. Everything after is steady-state time.
    """

    def __init__(self, warmup: int, sync_fn: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.perf_counter):
        self.warmup_left, self._sync, self._clock = warmup, sync_fn, clock
        self.warmup_s = self.steady_s = 0.0
        self.warmup_images = self.steady_images = 0
        self._t = 0.0

    def start(self) -> None:
        self._t = self._clock()

    def step_done(self, images: int) -> None:
        if self.warmup_left <= 0:
            self.steady_images += images
            return
        self.warmup_left -= 1
        self.warmup_images += images
        if self.warmup_left == 0:
            self._sync()  # the warm-up step's device work belongs to the warm-up
            now = self._clock()
            self.warmup_s += now - self._t
            self._t = now

    def stop(self) -> None:
        now = self._clock()
        if self.warmup_left > 0:
            self.warmup_s += now - self._t
        else:
            self.steady_s += now - self._t
        self._t = now


def images_per_second(seen: int, seconds: float, warmup_seen: int, warmup_s: float) -> float:
    """Steady-state throughput of an epoch; an epoch that was all warm-up reports its plain wall rate."""
    if seen > warmup_seen and seconds > 0:
        return (seen - warmup_seen) / seconds
    return seen / max(seconds + warmup_s, 1e-9)


# ---------------------------------------------------------------------------------------------- assembly


@dataclass
class Engine:
    plan: EnginePlan
    net: torch.nn.Module  # what the train step calls: the model, compiled or graphed
    eval_net: torch.nn.Module  # what validation calls: the EMA weights when on, else `net`
    ema: WeightEMA | None
    prepare: Callable[[torch.Tensor], None] | None  # run by the step with each batch before the forward

    def summary(self, optimizer: torch.optim.Optimizer) -> dict:
        """What actually ran, for result.json (a failed capture shows as graphs "off (failed)")."""
        d = optimizer.defaults
        kernel = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "default"
        graphs = self.plan.graphs
        if isinstance(self.prepare, LazyCapture) and self.prepare.state != "captured":
            graphs = f"off ({self.prepare.state})"
        return {**self.plan.as_dict(), "graphs": graphs, "optimizer_kernel": kernel,
                "ema_decay": self.ema.decay if self.ema is not None else 0.0}


def build_engine(model: torch.nn.Module, recipe: Recipe, device: torch.device, dtype: torch.dtype | None,
                 warn: Callable[[str], object]) -> Engine:
    """Wrap `model` (kept plain: its state_dict is what checkpoints hold) for the train step and validation;
    `warn` gets one line for each engine setting that cannot apply here."""
    plan = plan_engine(recipe, device)
    for note in plan.notes:
        warn(note)
    # The EMA copy is taken before graphing replaces model.forward, so it stays a plain eager module.
    ema = WeightEMA(model, recipe.train.ema_decay) if recipe.train.ema_decay > 0 else None
    net = compile_model(model, plan.compile_mode) if plan.compile else model
    eval_net = net
    if ema is not None:
        eval_net = compile_model(ema.module, plan.compile_mode) if plan.compile else ema.module
    prepare: Callable[[torch.Tensor], None] | None = None
    if plan.graphs == "module":
        prepare = LazyCapture(model, device, dtype, warn)
    elif plan.graphs == "compiler":
        prepare = mark_compiler_step
    return Engine(plan, net, eval_net, ema, prepare)
