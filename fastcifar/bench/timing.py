"""Timing that asynchronous devices cannot fool.

Throughput: a few warm-up steps (kernel selection, allocator growth, DataLoader worker start-up, torch.compile),
then >= 3 repeats of a fixed time budget; each repeat is timed on the device (CUDA events around the queued work,
read after a synchronize) or, on CPU / MPS, by perf_counter after a synchronize. Latency: every call is timed
alone (the device drained after each), which is what one request sees.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from fastcifar.engine import sync


class Interval:
    """Seconds of device work between start() and stop(): CUDA events on CUDA, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self._events = device.type == "cuda"

    def start(self) -> None:
        if self._events:
            self._e0 = torch.cuda.Event(enable_timing=True)
            self._e0.record()
        else:
            sync(self.device)
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self._events:
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record()
            e1.synchronize()
            return self._e0.elapsed_time(e1) / 1000.0
        sync(self.device)
        return time.perf_counter() - self._t0


class Clock:
    """Marks on the device timeline: CUDA events on a GPU (no host sync per mark, unlike Interval), perf_counter
    elsewhere; for a run cut into many timed pieces (the peer harness)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


class Probe(Protocol):
    """Something sampled over the measured repeats only (NVML power and utilisation)."""

    def start(self) -> None: ...

    def stop(self, images: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Rate:
    """Images per second over `repeats` timed repeats; spread = half the range of the repeats' rates."""

    mean: float
    lo: float
    hi: float
    repeats: int
    images: int  # measured images, warm-up excluded
    seconds: float  # measured device seconds
    warmup_s: float  # wall seconds of the warm-up (compile, worker start-up)
    first_s: float  # wall seconds of the first warm-up step alone (the compile when compiling)
    probe: dict[str, Any] | None = None

    @property
    def spread(self) -> float:
        return (self.hi - self.lo) / 2

    def fields(self, prefix: str) -> dict[str, float | int]:
        return {f"{prefix}": self.mean, f"{prefix}_spread": self.spread, f"{prefix}_repeats": self.repeats,
                f"{prefix}_images": self.images}


def measure_rate(step: Callable[[], int], device: torch.device, *, seconds: float, repeats: int = 3,
                 warmup: int = 3, warmup_cap_s: float | None = None, probe: Probe | None = None) -> Rate:
    """Run `step` (returns the images it processed) through warm-up, then `repeats` slices of seconds/repeats.

    Each repeat runs at least one step. Warm-up runs `warmup` steps, stopping early (after >= 1) once it has
    taken `warmup_cap_s`: a slow pipeline's warm-up must not eat a global time budget.
    """
    if repeats < 1 or seconds <= 0:
        raise ValueError("measure_rate needs repeats >= 1 and seconds > 0")
    t0 = time.perf_counter()
    first_s = 0.0
    for i in range(max(warmup, 1)):
        step()
        if i == 0:
            sync(device)
            first_s = time.perf_counter() - t0
        if warmup_cap_s is not None and time.perf_counter() - t0 >= warmup_cap_s:
            break
    sync(device)
    warmup_s = time.perf_counter() - t0
    if probe is not None:
        probe.start()
    rates, images, total = [], 0, 0.0
    slice_s = seconds / repeats
    for _ in range(repeats):
        interval = Interval(device)
        interval.start()
        n, host0 = 0, time.perf_counter()
        while True:  # on CUDA the host may run ahead; the events still time the device work
            n += step()
            if time.perf_counter() - host0 >= slice_s:
                break
        secs = max(interval.stop(), 1e-9)
        rates.append(n / secs)
        images, total = images + n, total + secs
    probed = probe.stop(images) if probe is not None else None
    return Rate(images / total, min(rates), max(rates), repeats, images, total, warmup_s, first_s, probed)


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    calls: int
    warmup_s: float
    first_s: float

    def fields(self, prefix: str) -> dict[str, float | int]:
        return {f"{prefix}_p50_ms": self.p50_ms, f"{prefix}_p99_ms": self.p99_ms, f"{prefix}_calls": self.calls}


def measure_latency(call: Callable[[], Any], device: torch.device, *, seconds: float, warmup: int = 3,
                    min_calls: int = 20, max_calls: int = 5000) -> Latency:
    """Per-call latency percentiles: each call timed alone (the device drained after it), >= min_calls calls."""
    t0 = time.perf_counter()
    first_s = 0.0
    for i in range(max(warmup, 1)):
        call()
        sync(device)
        if i == 0:
            first_s = time.perf_counter() - t0
    warmup_s = time.perf_counter() - t0
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_calls and (len(samples) < min_calls or time.perf_counter() - start < seconds):
        interval = Interval(device)
        interval.start()
        call()
        samples.append(interval.stop() * 1000.0)
    p50, p99 = np.percentile(np.asarray(samples), [50, 99])
    return Latency(float(p50), float(p99), len(samples), warmup_s, first_s)


@contextlib.contextmanager
def quiet_workers() -> Iterator[None]:
    """Silence torch's "DataLoader will create N worker processes ... suggested max" warning: the seed projects' 4
    workers are the setting being measured, and the tables note when they exceed the usable cores."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"This DataLoader will create")
        yield


def cycle(batches: Iterable) -> Iterator:
    """Endless batches: re-iterating a loader starts its next epoch (a DataLoader keeps persistent workers)."""
    while True:
        empty = True
        for item in batches:
            empty = False
            yield item
        if empty:
            raise ValueError("the loader yielded no batches (batch larger than the data with drop_last?)")
