"""Where a result came from: the git commit of the code that produced it, and the software and machine a run
trained on (env.json). The benchmarks record more of the machine (fastcifar.bench.env.bench_environment)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


def git_commit(where: Path | None = None) -> str | None:
    """HEAD of the git checkout holding `where` (default: this package); None off git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where or Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_environment(device: torch.device) -> dict[str, Any]:
    """env.json's versions, machine and commit (fastcifar.run.start_run adds the store and the world size)."""
    import torchvision

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "numpy": np.__version__, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(device), "git_commit": git_commit(),
           "cwd": os.getcwd()}  # where relative paths of the run's recipe (data.store) started from
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env
