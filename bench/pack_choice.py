"""How to stack k models for packed training (train.pack): explicit grouped layers (fastcifar.pack.PackedNet) or
torch.func (stack_module_state-style stacked weights + vmap(functional_call)). Both keep each member's own
Parameters (stacked or concatenated in every forward, so gradients land in each member) and one packed buffer
for the BatchNorm statistics; both are timed over the same training step (forward, backward, each member's SGD
step) against the k members trained one after another, side by side in one process, and checked against the
members' solo step (first-step losses and gradients).

    python bench/pack_choice.py [--models cnn_bn speedrun_net] [--k 1 2 5] [--batch 32] [--seconds 4]

The README's "Packed k-fold" section quotes its output (the CPU of this project's machine).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from fastcifar.models import create_model
from fastcifar.pack import PackedNet, split_logits, stack_inputs

CL = torch.channels_last


def members(name: str, width: int, k: int) -> list[torch.nn.Module]:
    out = []
    for j in range(k):
        torch.manual_seed(j)
        m = create_model(name, num_classes=10, image_size=32, width=width).to(memory_format=CL)
        if hasattr(m, "init_whitening"):
            imgs = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(j))
            m.init_whitening(imgs, (0.5,) * 3, (0.25,) * 3)
        out.append(m)
    return out


class VmapNet:
    """k members through torch.func: weights stacked in every forward, buffers in one stacked tensor (k, ...)
    that each member's buffer views, vmap over the member dimension of a (k, B, C, H, W) input."""

    def __init__(self, ms: list[torch.nn.Module]):
        self.ms, self.base = ms, copy.deepcopy(ms[0])
        names = [n for n, _ in ms[0].named_buffers()]
        self.buffers = {}
        with torch.no_grad():
            for n in names:
                parts = [dict(m.named_buffers())[n] for m in ms]
                stacked = torch.stack(parts)
                for j, p in enumerate(parts):
                    p.data = stacked[j]
                self.buffers[n] = stacked
        self.fn = vmap(lambda p, b, x: functional_call(self.base, (p, b), (x,)))

    def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        params = {n: torch.stack([dict(m.named_parameters())[n] for m in self.ms]) for n, _ in
                  self.ms[0].named_parameters()}
        return list(self.fn(params, self.buffers, torch.stack(xs)).unbind(0))


def step_fn(kind: str, ms: list[torch.nn.Module], opts, xs, ys):
    """One training step of all k members the `kind` way; returns its losses."""
    for o in opts:
        o.zero_grad(set_to_none=True)
    if kind == "sequential":
        losses = []
        for m, o, x, y in zip(ms, opts, xs, ys):
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            losses.append(loss.detach())
    else:
        net = step_fn.nets[kind]
        outs = split_logits(net(stack_inputs(xs)), len(ms)) if kind == "grouped" else net(xs)
        losses = [F.cross_entropy(o.float(), y) for o, y in zip(outs, ys)]
        torch.stack(losses).sum().backward()
        losses = [loss.detach() for loss in losses]
    for o in opts:
        o.step()
    return losses


step_fn.nets = {}


def measure(kind: str, name: str, width: int, k: int, batch: int, seconds: float) -> tuple[float, list[float]]:
    ms = members(name, width, k)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, foreach=True) for m in ms]
    if kind == "grouped":
        net = PackedNet(ms)
        net.bind()
        net.train()
        step_fn.nets[kind] = net
    elif kind == "vmap":
        step_fn.nets[kind] = VmapNet(ms)
    for m in ms:
        m.train()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, 32, 32, generator=g).to(memory_format=CL) for _ in range(k)]
    ys = [torch.randint(0, 10, (batch,), generator=g) for _ in range(k)]
    first = [float(v) for v in step_fn(kind, ms, opts, xs, ys)]  # also the warm-up step
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        step_fn(kind, ms, opts, xs, ys)
        n += 1
    return n * k * batch / (time.perf_counter() - t0), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn_bn", "speedrun_net"])
    ap.add_argument("--width", type=int, default=0, help="model.width (0: the model's default)")
    ap.add_argument("--k", nargs="+", type=int, default=[1, 2, 5])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2, help="the three ways alternate this many times")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} per member, fp32, "
          "channels-last; img/s = all members' images per second (best of the rounds)")
    print("| model | k | sequential img/s | grouped img/s | vmap img/s | grouped / seq | vmap / seq | "
          "max rel. loss diff vs solo (grouped, vmap) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for k in args.k:
            best = {"sequential": 0.0, "grouped": 0.0, "vmap": 0.0}
            firsts = {}
            for _ in range(args.rounds):  # alternate: a loaded, shared CPU drifts; each way sees the same drift
                for kind in best:
                    rate, firsts[kind] = measure(kind, name, args.width, k, args.batch, args.seconds)
                    best[kind] = max(best[kind], rate)
            solo = firsts["sequential"]
            rel = {kind: max(abs(a - b) / abs(b) for a, b in zip(firsts[kind], solo)) for kind in ("grouped", "vmap")}
            s = best["sequential"]
            print(f"| {name} | {k} | {s:,.0f} | {best['grouped']:,.0f} | {best['vmap']:,.0f} | "
                  f"{best['grouped'] / s:.2f} | {best['vmap'] / s:.2f} | {rel['grouped']:.1e}, {rel['vmap']:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
