"""The device-tensor loader: the split's uint8 images live on the training device as one tensor; each epoch
draws a permutation from a seeded generator on that device and gathers batches by index. No worker processes
and no per-image Python, so the same code is the fast path on CPU, CUDA and MPS.

The loader's position inside an epoch (its permutation and the next batch) is part of its state, so a run
stopped mid-epoch resumes on exactly the batch it would have trained next.
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
        self._order: torch.Tensor | None = None  # this epoch's permutation while an epoch is in progress
        self._pos = 0  # index of the next batch of the epoch in progress

    def __len__(self) -> int:
        n = len(self.labels)
        # Training drops the ragged last batch: a batch of 1 breaks BatchNorm and skews the step size.
        return n // self.batch_size if self.shuffle else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self) * self.batch_size if self.shuffle else len(self.labels)

    @property
    def position(self) -> int:
        """Batches of the current epoch already handed out (0 between epochs)."""
        return self._pos

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._order is None:
            n = len(self.labels)
            self._order = (torch.randperm(n, generator=self.generator, device=self.device) if self.shuffle
                           else torch.arange(n, device=self.device))
        while self._pos < len(self):
            idx = self._order[self._pos * self.batch_size:(self._pos + 1) * self.batch_size]
            x = self.images[idx].permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels-last
            batch = self.transform(x, self.generator), self.labels[idx]
            self._pos += 1
            yield batch
        self._order, self._pos = None, 0

    def state_dict(self) -> dict:
        order = self._order.cpu() if self._order is not None else None
        return {"generator": self.generator.get_state(), "order": order, "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        order = state.get("order")
        self._order = order.to(self.device) if order is not None else None
        self._pos = int(state.get("pos", 0))
