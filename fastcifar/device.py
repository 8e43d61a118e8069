"""Device and precision choices, made explicitly by the caller (nothing is set at import time)."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

from fastcifar.errors import RecipeError


def resolve_device(name: str = "auto", key: str = "train.device") -> torch.device:
    """auto picks cuda > mps > cpu; a forced device that is missing is an error, not a silent fallback. `key`:
    what the user set, named in that error (the recipe key, or a command's --device flag)."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{key}: 'cuda' requested but torch sees no CUDA device")
    if name == "mps" and not has_mps:
        raise RecipeError(f"{key}: 'mps' requested but torch sees no MPS device")
    return torch.device(name)


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype, or None for fp32: bf16 where the device has it, else fp16 (CUDA pre-Ampere, MPS)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def recipe_amp_dtype(train_cfg, device: torch.device) -> torch.dtype | None:
    """The recipe's autocast dtype on `device`: train.amp (true or "auto") applies on accelerators; the CPU needs
    train.amp_cpu too, so one recipe is fast on a GPU and still fp32 on a laptop. Training with train.amp = "auto"
    on the CPU measures instead (fastcifar.precision.choose_cpu_precision); evaluation commands take this."""
    if device.type == "cpu":
        return amp_dtype(device, bool(train_cfg.amp) and train_cfg.amp_cpu)
    return amp_dtype(device, bool(train_cfg.amp))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for result files and the CPU precision cache's key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
