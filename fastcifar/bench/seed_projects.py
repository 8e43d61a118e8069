"""The seed projects' input pipeline, as the baseline the device loader is measured against: a Dataset that hands out
one PIL image at a time, per-image torchvision.transforms.v2, a torch DataLoader with worker processes, and a
copy of each collated batch to the training device.

fastcifar.backends.torchvision (the `loader = "torchvision"` fallback) implements the same thing for training;
when it is installed the bench uses it, so both measure one implementation. `seed_project_loader` is the one switch.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastcifar.recipe import AugmentCfg

BACKEND = "fastcifar.backends.torchvision"


def seed_project_transform(cfg: AugmentCfg, mean, std, image_size: int):
    """The recipe's augment section as the seed projects wrote it: per-image v2 ops on a PIL image."""
    from torchvision.transforms import v2

    ops: list = []
    if cfg.crop_padding:
        ops.append(v2.RandomCrop(image_size, padding=cfg.crop_padding, padding_mode=cfg.crop_padding_mode))
    if cfg.flip:
        ops.append(v2.RandomHorizontalFlip())
    if cfg.randaugment:
        ops.append(v2.RandAugment(cfg.randaugment_num_ops, cfg.randaugment_magnitude, cfg.randaugment_num_bins))
    if cfg.resize:
        ops.append(v2.Resize(cfg.resize, antialias=True))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if cfg.erasing_p:
        value = {"random": "random", "zero": 0}.get(cfg.erasing_value, list(cfg.erasing_constant))
        ops.append(v2.RandomErasing(cfg.erasing_p, cfg.erasing_scale, cfg.erasing_ratio, value=value))
    return v2.Compose(ops)


class PilImages(Dataset):
    """uint8 NHWC rows as PIL images through a per-image transform (what torchvision.datasets.CIFAR10 does)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class OnDevice:
    """A DataLoader whose batches are copied to `device` (non-blocking from pinned memory on CUDA)."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def make_seed_project_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, cfg: AugmentCfg, mean, std,
                             *, train: bool = True, workers: int = 4, seed: int = 0,
                             device: torch.device | None = None) -> OnDevice:
    device = device or torch.device("cpu")
    gen = torch.Generator()
    gen.manual_seed(seed)
    ds = PilImages(images, np.asarray(labels, dtype=np.int64), seed_project_transform(cfg, mean, std, images.shape[1]))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0, generator=gen)
    return OnDevice(loader, device)


def seed_project_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, cfg: AugmentCfg, mean, std, *,
                        workers: int, seed: int, device: torch.device) -> tuple[object, str]:
    """(an iterable of (x, y) on `device`, the implementation's name): the training backend when present."""
    if importlib.util.find_spec(BACKEND) is None:
        return make_seed_project_loader(images, labels, batch_size, cfg, mean, std, train=True, workers=workers,
                                        seed=seed, device=device), __name__
    from fastcifar.backends.torchvision import make_torchvision_loader

    kwargs = dict(train=True, workers=workers, seed=seed)
    if "device" in inspect.signature(make_torchvision_loader).parameters:
        kwargs["device"] = device
        return make_torchvision_loader(images, labels, batch_size, cfg, mean, std, **kwargs), BACKEND
    return OnDevice(make_torchvision_loader(images, labels, batch_size, cfg, mean, std, **kwargs), device), BACKEND
