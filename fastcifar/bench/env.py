"""Where a figure was measured (device, driver, versions, CPU, commit, date) and the device's datasheet peaks.

Peaks are NVIDIA datasheet figures for dense math (no 2:4 sparsity): they turn img/s into a fraction of what the
part can do (MFU, HBM bandwidth use). A device not in the tables gets None, and no fraction is claimed for it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from fastcifar.device import cpu_model
from fastcifar.provenance import git_commit

# (dense bf16 tensor-core TFLOP/s, fp32 non-tensor-core TFLOP/s). H200 has the H100 SXM's compute.
DENSE_TFLOPS: dict[str, tuple[float, float]] = {
    "H100 SXM": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H200": (989.0, 67.0),
    "A100": (312.0, 19.5),
}
# HBM bandwidth, GB/s (1e9 bytes/s).
HBM_PEAK_GBS: dict[str, float] = {
    "H100 SXM": 3350.0,
    "H100 PCIe": 2000.0,
    "H200": 4800.0,
    "A100 80GB SXM": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100 40GB": 1555.0,
}


def gpu_family(name: str) -> str | None:
    """Table key of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "H100 SXM"), None when not tabled."""
    n = name.upper()
    if "H200" in n:
        return "H200"
    if "H100" in n:
        if "PCIE" in n:
            return "H100 PCIe"
        return "H100 SXM" if ("SXM" in n or "HBM3" in n) else None  # NVL and others: not in the table
    if "A100" in n:
        return "A100"
    return None


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak for the math a precision runs on: bf16/fp16 tensor cores, or fp32 (fp32 convolutions may run
    as TF32 when cuDNN allows it, so an fp32 MFU can exceed what the fp32 peak suggests; see environment.tf32)."""
    fam = gpu_family(device_name)
    if fam is None:
        return None
    low, fp32 = DENSE_TFLOPS[fam]
    return fp32 if precision == "fp32" else low


def peak_hbm_gbs(device_name: str) -> float | None:
    fam, n = gpu_family(device_name), device_name.upper()
    if fam == "A100":
        if "40GB" in n:
            return HBM_PEAK_GBS["A100 40GB"]
        return HBM_PEAK_GBS["A100 80GB PCIe" if "PCIE" in n else "A100 80GB SXM"]
    return HBM_PEAK_GBS.get(fam) if fam else None


def git_state(where: Path | None = None) -> tuple[str, bool | None]:
    """(commit of the checkout holding this package, whether it has uncommitted changes); 'unknown' off git."""
    where = where or Path(__file__).resolve().parent
    head = git_commit(where)  # the commit env.json records, read the same way
    if head is None:
        return "unknown", None
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return head, None
    return head, bool(status.stdout.strip()) if status.returncode == 0 else None


def slug(text: str) -> str:
    """A file-name piece: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def free_stem(out_dir: Path, stem: str, suffixes: tuple[str, ...] = (".json",)) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... : the first name none of whose files exist in out_dir. Benchmarks never
    overwrite an earlier result (a second run on the same day keeps the first one's file)."""
    n, name = 1, stem
    while any((out_dir / f"{name}{s}").exists() for s in suffixes):
        n += 1
        name = f"{stem}-{n}"
    return name


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"CPU: {cpu_model()}"


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # NVML missing or no driver: the field stays empty, never a crash
        return None


def bench_environment(device: torch.device) -> dict[str, Any]:
    """Where a benchmark figure was measured: device, driver, versions, CPU, load, commit, date, command."""
    import torchvision

    commit, dirty = git_state()
    cuda = device.type == "cuda"
    try:
        load = [round(v, 2) for v in os.getloadavg()]  # other jobs on a shared box show up here
    except OSError:
        load = None
    return {
        "device": device.type,
        "device_name": device_name(device),
        "gpu_family": gpu_family(device_name(device)) if cuda else None,
        "driver": _driver_version() if cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": load,
        "git_commit": commit,
        "git_dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "command": _command(),
    }


def _command() -> str:
    """The command line that produced the result, as typed (fastcifar ... or python bench/...)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "fastcifar":
        argv[0] = "fastcifar"
    elif argv and argv[0].endswith(".py"):
        argv = ["python", os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0]] + argv[1:]
    return shlex.join(argv)
