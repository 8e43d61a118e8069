"""The device-tensor loader: the split's uint8 images live on the training device as one tensor; each epoch
draws a permutation from a seeded generator on that device and gathers batches by index. No worker processes
and no per-image Python, so the same code is the fast path on CPU, CUDA and MPS.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def gather_images(train_images: np.ndarray, test_images: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows of [train ; test] by global index, read from the memory-mapped store without concatenating it."""
    n_train = len(train_images)
    is_train = idx < n_train
    out = np.empty((len(idx),) + train_images.shape[1:], dtype=train_images.dtype)
    out[is_train] = train_images[idx[is_train]]
    out[~is_train] = test_images[idx[~is_train] - n_train]
    return out


class DeviceLoader:
    """Batches of (augmented float images NCHW channels-last, int64 labels), all on `device`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, transform: Transform,
                 device: torch.device, *, shuffle: bool, seed: int = 0):
        # A read-only memory map (the eval path) is copied once: torch tensors must own writable memory.
        images = np.ascontiguousarray(images) if images.flags.writeable else np.array(images)
        self.images = torch.from_numpy(images).to(device)  # (N, H, W, C) uint8
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        self.batch_size = min(batch_size, len(self.labels))
        self.transform = transform
        self.shuffle = shuffle
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        # Training drops the ragged last batch: a batch of 1 breaks BatchNorm and skews the step size.
        return n // self.batch_size if self.shuffle else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self) * self.batch_size if self.shuffle else len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx].permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels-last
            yield self.transform(x, self.generator), self.labels[idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
