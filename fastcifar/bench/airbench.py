"""airbench's side of the peer harness (bench/peer_airbench.py): our store as airbench's input files, and
airbench94's own training and evaluation run unchanged, on a GPU or, in fp32, on a CPU.

Data: airbench's CifarLoader reads `<dir>/train.pt` / `test.pt` and only downloads CIFAR-10 through torchvision
when they are missing, so write_airbench_data writes those files from the store (the format torchvision's
CIFAR10 gives it: uint8 NHWC images, int64 labels, class names). No network is needed.

airbench is written for CUDA (make_net94 calls .half().cuda(), its train() times with torch.cuda.Event); on a
CPU, airbench_on_cpu() keeps .half()/.cuda() on the CPU and stands in CPU timers for the CUDA events while
airbench trains, never editing airbench.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from fastcifar.atomic import write_with
from fastcifar.bench.timing import Clock
from fastcifar.errors import FastCifarError
from fastcifar.splits import take_per_class

if TYPE_CHECKING:
    from fastcifar.data.store import Store

# airbench94's published settings (airbench 0.1.8): 9.9 epochs of batch 1024, flip + 2-px translate, TTA level 2.
AB_HYP = {"epochs": 9.9, "batch_size": 1024, "aug": {"flip": True, "translate": 2}, "tta_level": 2}


def airbench_arrays(store: Store, train_per_class: int = 0) -> dict[str, dict[str, Any]]:
    """{'train': ..., 'test': ...}, each {'images': uint8 (N, 32, 32, 3), 'labels': int64 (N,), 'classes':
    [names]}: what airbench's CifarLoader caches from torchvision (dset.data, dset.targets, dset.classes).
    train_per_class > 0 keeps the first n images of each class, the rows our data.train_subset trains on.

    The training rows go out in a fixed pseudo-random order (seed 0): airbench fits its whitening layer to the
    first 5000 rows, and our store is sorted by class, so in store order it would whiten airplanes only
    (torchvision's order is mixed). airbench reshuffles every epoch, so nothing else depends on the order."""
    h, w = store.train_images.shape[1:3]
    if (h, w) != (32, 32) or len(store.classes) != 10:
        # airbench hard-codes 32-px crops in its TTA and a 10-way head.
        raise FastCifarError(f"{store.path}: airbench needs 32x32 images and 10 classes, got {h}x{w} and "
                             f"{len(store.classes)}")
    idx = np.arange(len(store.train_labels))
    if train_per_class:
        idx = take_per_class(idx, store.train_labels, train_per_class)
    idx = idx[np.random.default_rng(0).permutation(len(idx))]
    out = {}
    for split, images, labels in (("train", store.train_images[idx], store.train_labels[idx]),
                                  ("test", store.test_images, store.test_labels)):
        out[split] = {"images": torch.from_numpy(np.array(images)),  # a writable copy of the memory map
                      "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)),
                      "classes": list(store.classes)}
    return out


def write_airbench_data(store: Store, out_dir: Path, train_per_class: int = 0) -> Path:
    """Write out_dir/train.pt and test.pt for airbench.CifarLoader(out_dir, ...); returns out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, obj in airbench_arrays(store, train_per_class).items():
        write_with(out_dir / f"{split}.pt", lambda f, o=obj: torch.save(o, f))
    return out_dir


@contextlib.contextmanager
def _prebuilt_test_loader(ab_utils, test_loader) -> Iterator[None]:
    """airbench's train() always builds CifarLoader('cifar10', train=False) relative to the CWD (a download
    when missing, and a 30 MB load inside its timed region); hand it the loader built beforehand instead."""
    original = ab_utils.CifarLoader

    def factory(path, train=True, *args, **kwargs):
        return original(path, train, *args, **kwargs) if train else test_loader

    ab_utils.CifarLoader = factory
    try:
        yield
    finally:
        ab_utils.CifarLoader = original


def airbench_loaders(ab, data_dir: Path, device: torch.device, batch_size: int):
    gpu: int | str = (device.index or 0) if device.type == "cuda" else "cpu"  # CifarLoader's map_location
    train = ab.CifarLoader(str(data_dir), train=True, batch_size=batch_size, aug=AB_HYP["aug"], altflip=True,
                           gpu=gpu)
    test = ab.CifarLoader(str(data_dir), train=False, batch_size=2000, gpu=gpu)
    if device.type != "cuda":  # fp16 convolutions are GPU-only: airbench's fp32 twin on the CPU
        train.images, test.images = train.images.float(), test.images.float()
    return train, test


class _CpuEvent:
    """torch.cuda.Event's timing interface over perf_counter, for airbench's train() on a CPU."""

    def __init__(self, enable_timing: bool = False):
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_CpuEvent") -> float:
        return 1000.0 * (end.t - self.t)


@contextlib.contextmanager
def airbench_on_cpu() -> Iterator[None]:
    """airbench's own training on a CPU, airbench untouched: while active, Module.half() and .cuda() return the
    module as it is (make_net94 builds fp16 on CUDA), and torch.cuda.Event / synchronize are CPU stand-ins."""
    saved = (torch.nn.Module.half, torch.nn.Module.cuda, torch.cuda.Event, torch.cuda.synchronize)
    torch.nn.Module.half = torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.Event, torch.cuda.synchronize = _CpuEvent, lambda *a, **k: None
    try:
        yield
    finally:
        torch.nn.Module.half, torch.nn.Module.cuda, torch.cuda.Event, torch.cuda.synchronize = saved


def run_airbench(ab, data_dir: Path, device: torch.device, epochs: float, batch_size: int,
                 seed: int = 0) -> dict[str, float]:
    """One timed airbench94 run (its own train94 and evaluate, untouched but for the test loader; on a CPU in
    fp32 under airbench_on_cpu). airbench draws from torch's global generator: seeded here per run."""
    ab_utils = importlib.import_module("airbench.utils")
    train_loader, test_loader = airbench_loaders(ab, data_dir, device, batch_size)  # data prep: not timed
    clock = Clock(device)
    torch.manual_seed(seed)
    with _prebuilt_test_loader(ab_utils, test_loader), \
            (airbench_on_cpu() if device.type != "cuda" else contextlib.nullcontext()):
        t0 = clock.mark()
        model = ab.train94(train_loader, epochs=epochs, verbose=False)
        t1 = clock.mark()
        acc = ab.evaluate(model, test_loader, tta_level=AB_HYP["tta_level"])
        t2 = clock.mark()
        plain = ab.evaluate(model, test_loader, tta_level=0)  # untimed: the accuracy without TTA
    return {"acc": float(acc), "acc_no_tta": float(plain), "train_s": clock.seconds(t0, t1),
            "eval_s": clock.seconds(t1, t2)}
