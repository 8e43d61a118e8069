"""The device-tensor loader: the split's uint8 images live on the training device as one tensor; each epoch
draws a permutation from a seeded generator on that device and gathers batches by index. No worker processes
and no per-image Python, so the same code is the fast path on CPU, CUDA and MPS.

The loader's position inside an epoch (its permutation and the next batch) is part of its state, so a run
stopped mid-epoch resumes on exactly the batch it would have trained next.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from fastcifar.augment.pipeline import Mixer, Transform


@runtime_checkable
class TrainLoader(Protocol):
    """What the fold loop, the checkpoint codec and the figures use of a training loader. DeviceLoader and every
    backend's loader (fastcifar.backends: torchvision, DALI, FFCV) meet it; evaluation uses DeviceLoader."""

    @property
    def batch_size(self) -> int: ...

    @property
    def images(self) -> torch.Tensor:
        """The uint8 (N, H, W, 3) rows (the data-dependent init and the figures read them)."""

    @property
    def labels(self) -> torch.Tensor: ...

    @property
    def num_images(self) -> int:
        """Images this process trains on per epoch."""

    @property
    def position(self) -> int:
        """Batches of the current epoch already handed out (0 between epochs)."""

    def __len__(self) -> int: ...  # batches per epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]:
        """Its resume point; "pos" holds `position` (TrainState.steps_done reads it)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def gather_images(train_images: np.ndarray, test_images: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows of [train ; test] by global index, read from the memory-mapped store without concatenating it."""
    n_train = len(train_images)
    is_train = idx < n_train
    out = np.empty((len(idx),) + train_images.shape[1:], dtype=train_images.dtype)
    out[is_train] = train_images[idx[is_train]]
    out[~is_train] = test_images[idx[~is_train] - n_train]
    return out


class DeviceLoader:
    """Batches of (augmented float images NCHW channels-last, targets), all on `device`.

    Targets are int64 class indices, or float class probabilities (B, K) when a mixer (MixUp / CutMix) is set.
    On CUDA the next batch is prepared on a side stream while the caller trains on the current one, so the
    augmentation overlaps the step instead of adding to it.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, transform: Transform,
                 device: torch.device, *, shuffle: bool, seed: int = 0, mixer: Mixer | None = None):
        # A read-only memory map (the eval path) is copied once: torch tensors must own writable memory.
        images = np.ascontiguousarray(images) if images.flags.writeable else np.array(images)
        self.images = torch.from_numpy(images).to(device)  # (N, H, W, C) uint8
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        self.batch_size = min(batch_size, len(self.labels))
        self.transform, self.mixer = transform, mixer
        self.shuffle = shuffle
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.epoch = 0  # epochs completed (the alternating flip reads it)
        # (rank, world size) under DDP: every rank draws and augments the same global batch from the same
        # generator, then keeps its 1/world slice, so W ranks see exactly the images and augmentations of one
        # process at the global batch, and the generator state (the resume point) is the same on every rank.
        self.shard: tuple[int, int] | None = None
        self._order: torch.Tensor | None = None  # this epoch's permutation while an epoch is in progress
        self._pos = 0  # index of the next batch of the epoch in progress
        self._gen_state: torch.Tensor | None = None  # generator state before the batch at _pos was drawn
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __len__(self) -> int:
        n = len(self.labels)
        # Training drops the ragged last batch: a batch of 1 breaks BatchNorm and skews the step size.
        return n // self.batch_size if self.shuffle else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        """Images this process trains on (or evaluates) per epoch."""
        world = self.shard[1] if self.shard else 1
        return len(self) * self.batch_size // world if self.shuffle else len(self.labels)

    @property
    def position(self) -> int:
        """Batches of the current epoch already handed out (0 between epochs)."""
        return self._pos

    def _make(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._order[pos * self.batch_size:(pos + 1) * self.batch_size]
        x, y = self.transform(self.images, idx, self.generator, self.epoch), self.labels[idx]
        if self.mixer is not None:
            x, y = self.mixer(x, y, self.generator)
        if self.shard is not None:
            rank, world = self.shard
            per = len(idx) // world  # fastcifar.distributed refuses a batch_size not divisible by world
            x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        return x, y

    def _prefetch(self, pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if pos >= len(self):
            return None
        if self._stream is None:
            return self._make(pos)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the permutation / prior writes
        with torch.cuda.stream(self._stream):
            return self._make(pos)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._order is None:
            n = len(self.labels)
            self._order = (torch.randperm(n, generator=self.generator, device=self.device) if self.shuffle
                           else torch.arange(n, device=self.device))
        nxt = self._prefetch(self._pos)
        while nxt is not None:
            x, y = nxt
            if self._stream is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_stream(self._stream)
                x.record_stream(main)
                y.record_stream(main)
            self._pos += 1
            # The following batch is drawn before this one is handed out (on CUDA it runs beside the step); a
            # checkpoint taken meanwhile must save the state before that draw, so resume redraws the same batch.
            self._gen_state = self.generator.get_state()
            nxt = self._prefetch(self._pos)
            yield x, y
        self._order, self._pos, self._gen_state = None, 0, None
        self.epoch += 1

    def state_dict(self) -> dict:
        order = self._order.cpu() if self._order is not None else None
        gen = self._gen_state if self._gen_state is not None else self.generator.get_state()
        return {"generator": gen, "order": order, "pos": self._pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        order = state.get("order")
        self._order = order.to(self.device) if order is not None else None
        self._pos = int(state.get("pos", 0))
        self.epoch = int(state.get("epoch", 0))
        self._gen_state = None
