"""The device call's first seconds (bench/device_suite.sh's "preflight" stage): what the box is, and whether the
rest can run on it. Not fastcifar.preflight, which checks a training run before it starts.

    python -m fastcifar.bench.device_check --out OUT/preflight.json [--quick]

Records the GPU, driver, versions, C compiler, Python headers and free disk, and fails in one line (exit 2)
when something the later stages need is missing: a CUDA device (not in --quick, the CPU rehearsal), a C
compiler and Python's headers (Triton and inductor compile their kernels with them), 2 GiB of free disk.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

MIN_FREE_GIB = 2.0  # the prepared store is 184 MB; inductor's cache and Triton's builds take a few hundred more


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def facts() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        **{name: _version(name) for name in ("torchvision", "triton", "numpy", "timm", "nvidia-ml-py")},
        "cuda_available": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "driver": _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "cc": cc, "cc_version": _first_line([cc, "--version"]) if cc else None,
        "python_headers": str(headers) if headers.is_file() else None,
        "free_disk_gib": round(shutil.disk_usage(".").free / 2**30, 1),
    }


def problems(f: dict[str, Any], quick: bool) -> list[str]:
    found = []
    if not f["cuda_available"] and not quick:
        found.append("no CUDA device (torch.cuda.is_available() is False)")
    if not f["cc"]:
        found.append("no C compiler (Triton and inductor compile with cc)")
    if not f["python_headers"]:
        found.append(f"no Python.h in {sysconfig.get_paths()['include']} (Triton builds need the Python headers)")
    if f["free_disk_gib"] < MIN_FREE_GIB:
        found.append(f"{f['free_disk_gib']} GiB free disk, under {MIN_FREE_GIB}")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcifar.bench.device_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write the facts to")
    p.add_argument("--quick", action="store_true", help="the CPU rehearsal: a missing GPU is not a problem")
    args = p.parse_args(argv)
    from fastcifar.atomic import write_json

    f = facts()
    found = problems(f, args.quick)
    write_json(args.out, {"kind": "fastcifar-device-preflight", "version": 1, "quick": args.quick, "facts": f,
                          "problems": found})
    print(f"preflight: {f['gpu'] or 'no GPU'}, driver {f['driver']}, python {f['python']}, torch {f['torch']}, "
          f"triton {f['triton']}, cc {'yes' if f['cc'] else 'no'}, {f['free_disk_gib']} GiB free")
    if found:
        print(f"preflight: error: {'; '.join(found)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
