"""GPU utilisation, power, memory and energy from NVML (nvidia-ml-py), sampled on a background thread.

Sampling every 50 ms: NVML's utilisation counter itself averages over 1/6 s to 1 s, so faster polling adds
cost, not information. Energy comes from the board's cumulative energy counter (Volta and newer) read at the
ends of the measured interval; where that counter is missing it is the mean sampled power x the interval.
On CPU / MPS every field is None and `nvml_note` says why.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from fastcifar.errors import first_line

FIELDS = ("gpu_util_pct", "power_w", "nvml_mem_used_mb", "energy_j_per_1k_img")


def _nvml_index(device: torch.device) -> int:
    """NVML counts all GPUs; CUDA counts the visible ones: map through CUDA_VISIBLE_DEVICES when torch can."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return int(torch.cuda._get_nvml_device_index(index))  # private, so guarded: falls back to the index
    except Exception:
        return index


def empty(reason: str) -> dict[str, Any]:
    return {**{k: None for k in FIELDS}, "nvml_samples": 0, "nvml_note": reason}


class NvmlProbe:
    """start() before the measured repeats, stop(images) after: mean utilisation and power, max memory used,
    energy per 1000 images. Unavailable NVML (no CUDA, no driver, no package) gives empty fields + a reason."""

    def __init__(self, device: torch.device, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.reason: str | None = None
        self._handle = None
        if device.type != "cuda":
            self.reason = f"NVML is CUDA-only (device is {device.type})"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(device))
        except Exception as e:  # ImportError, NVMLError (no driver, no permission)
            self.reason = f"NVML unavailable ({first_line(e)})"

    def _energy_mj(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:  # pre-Volta boards and some vGPUs have no energy counter
            return None

    def _sample(self) -> None:
        nv, h = self._nvml, self._handle
        while not self._stop.is_set():
            try:
                self._util.append(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                self._power.append(nv.nvmlDeviceGetPowerUsage(h) / 1000.0)  # mW -> W
                self._mem.append(nv.nvmlDeviceGetMemoryInfo(h).used / 2**20)
            except Exception:
                pass
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self._handle is None:
            return
        self._util, self._power, self._mem = [], [], []
        self._stop = threading.Event()
        self._e0, self._t0 = self._energy_mj(), time.perf_counter()
        self._thread = threading.Thread(target=self._sample, name="nvml-probe", daemon=True)
        self._thread.start()

    def stop(self, images: int) -> dict[str, Any]:
        if self._handle is None:
            return empty(self.reason or "NVML unavailable")
        self._stop.set()
        self._thread.join()
        seconds = time.perf_counter() - self._t0
        e1 = self._energy_mj()
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        power = mean(self._power)
        if self._e0 is not None and e1 is not None:
            joules, how = (e1 - self._e0) / 1000.0, "energy counter"
        else:
            joules, how = (power * seconds if power is not None else None), "mean power x time"
        per_1k = joules / images * 1000 if joules is not None and images else None
        return {"gpu_util_pct": mean(self._util), "power_w": power,
                "nvml_mem_used_mb": max(self._mem) if self._mem else None, "energy_j_per_1k_img": per_1k,
                "nvml_samples": len(self._util), "nvml_note": f"sampled every {self.interval_s * 1000:.0f} ms; "
                                                             f"energy from the {how}"}
