"""Whole runs on a CUDA device: CUDA graphs train like eager, and a bf16 channels-last run goes through the fused
Triton data path. Skipped without a GPU; bench/device_suite.sh runs every `cuda`-marked test at full size.
Their CPU twins: test_engine.py (graph planning and the eager fallback), test_kernels.py (the kernel under
TRITON_INTERPRET=1 against the reference)."""

import csv
import json

import pytest
import torch
from rich.console import Console

from fastcifar.run import run_training

QUIET = Console(quiet=True)
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on a lent GPU)")]


def _train_losses(run) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(row["train_loss"]) for row in csv.DictReader(f)]


def test_cuda_graphs_train_like_eager(tiny, tmp_path):
    results = {}
    for graphs in (False, True):
        recipe = tiny(train={"device": "cuda", "cuda_graphs": graphs, "epochs": 2})
        run_training(recipe, tmp_path / f"graphs-{graphs}", QUIET)
        result = json.loads((tmp_path / f"graphs-{graphs}" / "result.json").read_text())
        results[graphs] = (result["engine"]["graphs"], _train_losses(tmp_path / f"graphs-{graphs}"))
    assert results[True][0] == "module" and results[False][0] == "off"
    # The same kernels, replayed: only cuDNN's non-deterministic backward separates the two runs.
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-3)


def test_bf16_channels_last_run_uses_the_fused_kernel(tiny, tmp_path, monkeypatch):
    import fastcifar.kernels.crop_flip as kernel

    calls = []
    real = kernel.crop_flip_erase_triton

    def counted(*args, **kwargs):
        calls.append(args[0].device.type)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "crop_flip_erase_triton", counted)
    recipe = tiny(train={"device": "cuda", "amp": True, "channels_last": True, "epochs": 3},
                  augment={"erasing_p": 0.25})
    summary = run_training(recipe, tmp_path / "bf16", QUIET)
    assert calls and set(calls) == {"cuda"}
    result = json.loads((tmp_path / "bf16" / "result.json").read_text())
    assert result["engine"]["channels_last"] is True
    assert summary["test_acc_mean"] > 0.5  # ten learnable synthetic classes: chance is 0.1
