"""train.compile_step: the whole training step - forward, loss, gradients and the optimizer update - as one
function compiled into one graph with no graph break (fullgraph=True; tests/test_record.py checks it with
torch._dynamo.explain). Hiverge compiles its forward and loss in one function and steps its optimizer outside;
here the update is inside the graph too, so the compiler sees (and fuses) the whole step.

How it stays one graph:
- gradients come from torch.autograd.grad(loss, trainable parameters) with dynamo's trace_autograd_ops on (a
  .backward() call is a graph break); the trainable set is read from requires_grad, so freezing the whitening
  bias mid-run (model.whiten_bias_epochs) recompiles once, it does not break the graph;
- the optimizer update is our own foreach arithmetic on the optimizer's own state tensors (its momentum buffers,
  created up front), so checkpoints and resume see the same optimizer as an eager run: torch.optim.SGD's rule
  (g += wd p; buf = m buf + g; u = g + m buf with Nesterov, else buf; p -= lr u) and BatchedMuon's;
- the per-step learning rates and momenta enter as 0-d tensors filled from the param groups before each call
  (the schedulers keep writing Python floats there), so a new value is data, not a recompile.
What it covers: optim.name "sgd", or "muon" with optim.muon_impl = "batched" (recipe validation refuses the
rest), no gradient clipping, no GradScaler (fp16), on_nonfinite = "stop" (the loss is still polled lazily).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from fastcifar.device import autocast
from fastcifar.typed_toml import check
from fastcifar.muon import BatchedMuon


def check_recipe(recipe) -> None:
    """What the one-graph step does not do, refused by key (Recipe.validate calls it for train.compile_step)."""
    o, t = recipe.optim, recipe.train
    check(o.name == "sgd" or (o.name == "muon" and o.muon_impl == "batched"), "train.compile_step",
          f'needs optim.name = "sgd", or "muon" with optim.muon_impl = "batched", got {o.name!r}'
          + (f" with muon_impl {o.muon_impl!r}" if o.name == "muon" else ""))
    for key, bad in (("train.grad_clip", t.grad_clip > 0), ("train.on_nonfinite", t.on_nonfinite != "stop"),
                     ("train.oom_retry", t.oom_retry), ("train.cuda_graphs", t.cuda_graphs),
                     ("finetune.head_epochs", recipe.finetune.head_epochs > 0)):
        check(not bad, key, "cannot be used with train.compile_step (the step is one compiled graph)")


class FusedStep:
    """(x, y) -> (loss, correct) after one whole training step of `model` with `optimizer`, compiled once."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 dtype: torch.dtype | None, label_smoothing: float, backend: str, mode: str | None = None):
        self.model, self.device, self.dtype, self.smoothing = model, device, dtype, label_smoothing
        self.optimizer = optimizer
        self._bind()
        self.lr = [torch.zeros((), device=device) for _ in self.groups]
        self.momentum = [torch.zeros((), device=device) for _ in self.groups]
        kwargs = {"mode": mode} if backend == "inductor" and mode else {}
        # dynamo keeps its compiled graphs on the function's code object and stops compiling it after
        # recompile_limit (8) entries, falling back to eager with a warning. Every FusedStep's guards differ (its
        # own parameters and buffers), so on one shared code object a run's later folds (a compile each, one more
        # when the whitening bias freezes, one on resume) ran eagerly. Each step compiles its own copy of the code.
        own = types.FunctionType(FusedStep._step.__code__.replace(), FusedStep._step.__globals__, "_step")
        self.fn = torch.compile(types.MethodType(own, self), backend=backend, fullgraph=True, **kwargs)

    def _bind(self) -> None:
        """Take the optimizer's current param groups and momentum buffers (load_state_dict, on resume, replaces
        both: the step then rebinds, and recompiles once)."""
        self.muon: BatchedMuon | None = getattr(self.optimizer, "muon", None)
        owned = {id(p) for p in self.model.parameters()}
        self.groups = []  # (param group, [(param, momentum buffer or None)]) in param_groups order
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if id(p) in owned]  # not MuonFilters' empty placeholder
            if self.muon is not None and group is self.muon.param_groups[0]:
                bufs = self.muon.buffers(params)
            else:
                bufs = [self._sgd_buffer(self.optimizer, p, group) for p in params]
            self.groups.append((group, list(zip(params, bufs))))
        self._bound = self._binding()

    def _binding(self) -> tuple[int, ...]:
        """Identities of the param groups and momentum buffers the compiled step was bound to."""
        states = [o.state for o in (self.muon, getattr(self.optimizer, "sgd", self.optimizer)) if o is not None]
        return (tuple(map(id, self.optimizer.param_groups))
                + tuple(id(s.get("momentum_buffer")) for st in states for s in st.values()))

    @staticmethod
    def _sgd_buffer(optimizer, p: torch.Tensor, group: dict) -> torch.Tensor | None:
        """torch.optim.SGD's momentum buffer of p, made up front as zeros (SGD's first step would clone the
        gradient into it: the same as m * 0 + g)."""
        if not group["momentum"]:
            return None
        sgd = getattr(optimizer, "sgd", optimizer)  # MuonFilters keeps its SGD inside
        state = sgd.state[p]
        if "momentum_buffer" not in state or state["momentum_buffer"] is None:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._binding() != self._bound:
            self._bind()
        for (group, _), lr, m in zip(self.groups, self.lr, self.momentum):
            lr.fill_(group["lr"])
            m.fill_(group["momentum"])
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            out = self.fn(x, y)
        # This call is the optimizer's step: torch's LRScheduler checks this flag (set by optimizer.step()) to warn
        # about a scheduler stepped first.
        self.optimizer._opt_called = True
        return out

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        entries = [(i, p, b) for i, (_, pairs) in enumerate(self.groups) for p, b in pairs if p.requires_grad]
        with autocast(self.device, self.dtype):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.smoothing)
        grads = torch.autograd.grad(loss, [p for _, p, _ in entries])
        with torch.no_grad():
            renorm = self.muon.advance() if self.muon is not None else False
            for i, (group, _) in enumerate(self.groups):
                mine = [(p, b, g) for (j, p, b), g in zip(entries, grads) if j == i]
                if not mine:
                    continue
                params, bufs, gs = (list(t) for t in zip(*mine))
                if self.muon is not None and group is self.muon.param_groups[0]:
                    self.muon._update(group, params, gs, self.lr[i], renorm, self.momentum[i])
                else:
                    _sgd(params, gs, bufs, group, self.lr[i], self.momentum[i])
        hard = y.argmax(1) if y.is_floating_point() else y  # a mixed batch counts its dominant class
        return loss.detach(), (logits.detach().argmax(1) == hard).sum()


def _sgd(params, grads, bufs, group: dict, lr: torch.Tensor, m: torch.Tensor) -> None:
    """torch.optim.SGD's update (dampening 0) with tensor lr and momentum."""
    if group["weight_decay"]:
        grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
    if bufs[0] is not None:
        torch._foreach_mul_(bufs, m)
        torch._foreach_add_(bufs, grads)
        grads = torch._foreach_add(grads, torch._foreach_mul(bufs, m)) if group["nesterov"] else bufs
    torch._foreach_sub_(params, torch._foreach_mul(grads, lr))
