"""loader = "torchvision": the seed projects' input pipeline. A Dataset yields one PIL image at a time, per-image
torchvision.transforms.v2 ops run in DataLoader worker processes, and MixUp / CutMix run on the whole batch.

It is the fallback where the device loader is not wanted and the baseline the bench measures the device loader
against. Same batch contract as fastcifar.loader.DeviceLoader: (float NCHW channels-last normalised images,
int64 labels, or float (B, K) class probabilities when mixing) on the training device.

Resume is best-effort: the image order and the MixUp / CutMix draws of an epoch are functions of the loader's
generator, so a resumed run continues the same permutation from the next batch; the per-image augmentation draws
come from the workers' own RNGs, which a checkpoint does not hold, so they differ after a resume.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from fastcifar.augment import basic as B
from fastcifar.errors import RecipeError
from fastcifar.recipe import AugmentCfg

log = logging.getLogger(__name__)

BatchMixer = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class NormalizeLikeDevice(v2.Transform):
    """uint8 image -> float32 (x / 255 - mean) / std, by the device loader's own `normalize`.

    Why not v2.ToDtype(float32, scale=True) + v2.Normalize: ToDtype multiplies by 1/255, which differs from
    dividing by 255 in the last bit for 126 of the 256 byte values, so the two loaders would hand the model
    different tensors for the same image. Using one function keeps them bit-identical.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        out = B.normalize(inpt.as_subclass(torch.Tensor)[None], self.mean, self.std)[0]
        return tv_tensors.Image(out)


class Cutout(v2.Transform):
    """Cutout (DeVries & Taylor 2017): one size x size square at a uniform centre, clipped at the border, set to
    0 on the normalised image (the dataset mean), as fastcifar.augment.basic.cutout does on a batch; inside=True
    keeps the whole square inside the image (augment.cutout_mode = "inside")."""

    def __init__(self, size: int, inside: bool = False):
        super().__init__()
        self.size, self.inside = size, inside

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        # the batched ops' box (one sample), drawn from torch's global generator as v2 transforms do
        top, left, ch, cw = (int(t) for t in B.cutout_boxes(1, h, w, self.size, None, "cpu", self.inside))
        return {"rows": slice(top, top + ch), "cols": slice(left, left + cw)}

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        out = inpt.clone()
        out[..., params["rows"], params["cols"]] = 0
        return out


def _geometric(cfg: AugmentCfg, size: int) -> list:
    ops: list = []
    if cfg.crop_padding:
        ops.append(v2.RandomCrop(size, padding=cfg.crop_padding, padding_mode=cfg.crop_padding_mode))
    if cfg.translate:
        ops.append(v2.RandomAffine(degrees=0, translate=(cfg.translate / size, cfg.translate / size)))
    if cfg.flip:
        if cfg.flip_mode == "alternate":
            raise RecipeError('augment.flip_mode: "alternate" has no per-image torchvision equivalent (it needs '
                              'the image index and epoch); use flip_mode = "random" or train.loader = "device"')
        ops.append(v2.RandomHorizontalFlip(0.5))
    if cfg.rotation:
        ops.append(v2.RandomRotation(cfg.rotation, interpolation=InterpolationMode.NEAREST, fill=0))
    return ops


def _photometric(cfg: AugmentCfg) -> list:
    ops: list = []
    if any(cfg.color_jitter):
        ops.append(v2.ColorJitter(*(v or None for v in cfg.color_jitter)))
    if cfg.randaugment:
        ops.append(v2.RandAugment(cfg.randaugment_num_ops, cfg.randaugment_magnitude, cfg.randaugment_num_bins))
    elif cfg.trivialaugment:
        ops.append(v2.TrivialAugmentWide())
    return ops


def _erase(cfg: AugmentCfg) -> list:
    ops: list = []
    if cfg.erasing_p > 0:
        value = {"random": "random", "zero": 0.0}.get(cfg.erasing_value, list(cfg.erasing_constant))
        ops.append(v2.RandomErasing(cfg.erasing_p, cfg.erasing_scale, cfg.erasing_ratio, value=value))
    if cfg.cutout:
        ops.append(Cutout(cfg.cutout, cfg.cutout_mode == "inside"))
    return ops


def build_pil_transform(cfg: AugmentCfg, mean, std, train: bool, image_size: int = 32) -> v2.Compose:
    """The recipe's augment section as per-image v2 ops on a PIL image, in AugmentCfg's order: geometric and
    colour ops on the uint8 image, resize (uint8, as the device pipeline does on the CPU and the seed projects' PIL
    Resize did), normalise, erasing / cutout. MixUp / CutMix need the batch: see build_batch_mixer. Raises
    RecipeError for flip_mode = "alternate" (train only)."""
    ops: list = _geometric(cfg, image_size) + _photometric(cfg) if train else []
    ops.append(v2.ToImage())
    if cfg.resize:
        ops.append(v2.Resize(cfg.resize, antialias=True))
    ops.append(NormalizeLikeDevice(mean, std))
    if train:
        ops += _erase(cfg)
    return v2.Compose(ops)


def build_batch_mixer(cfg: AugmentCfg, num_classes: int) -> BatchMixer | None:
    """MixUp / CutMix on a batch with v2.MixUp, v2.CutMix and v2.RandomChoice, or None when both are off.

    mixer(x, y, seed) -> (x, soft targets (B, K) float). The v2 ops draw from torch's global CPU RNG; the mixer
    forks it and seeds it with `seed`, so a batch's mix is a function of that seed alone (resume redraws it).
    """
    if not (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0):
        return None
    mixup = v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes) if cfg.mixup_alpha > 0 else None
    cutmix = v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes) if cfg.cutmix_alpha > 0 else None
    both = mixup is not None and cutmix is not None
    op = v2.RandomChoice([cutmix, mixup], p=[cfg.mix_switch_p, 1 - cfg.mix_switch_p]) if both else (mixup or cutmix)

    def mixer(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if float(torch.rand(())) >= cfg.mix_p:
                return x, torch.nn.functional.one_hot(y, num_classes).float()
            x, y = op(x, y)
        return x.as_subclass(torch.Tensor), y.float()

    return mixer


class PILDataset(Dataset):
    """Rows of a uint8 (N, H, W, 3) array as PIL images through a per-image transform (the seed projects' way)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(np.asarray(self.images[i]))), int(self.labels[i])


class EpochBatches(Sampler[list[int]]):
    """Batches of the current epoch's order from batch `start` on. The loader sets order and start before each
    pass; the sampler is iterated in the main process, so persistent workers see the change."""

    def __init__(self, n: int, batch_size: int, drop_last: bool):
        self.batch_size = batch_size
        # Training drops the ragged last batch: a batch of 1 breaks BatchNorm and skews the step size.
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)
        self.order: torch.Tensor = torch.arange(n)
        self.start = 0

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.num_batches):
            yield self.order[b * self.batch_size:(b + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.num_batches - self.start


class EpochState:
    """The part of a loader's state that is a function of its generator: the epoch's permutation, a per-epoch
    mix seed, the epoch count and the position inside the epoch. Shared by the torchvision and DALI loaders."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int):
        self.n, self.shuffle = n, shuffle
        self.batch_size = min(batch_size, n)
        self.num_batches = n // self.batch_size if shuffle else -(-n // self.batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0
        self.order: torch.Tensor | None = None
        self.mix_seed = 0
        self._start_state: torch.Tensor | None = None  # generator state before this epoch's draws

    def begin(self) -> torch.Tensor:
        """This epoch's order (drawn once per epoch; a resumed epoch redraws the same one)."""
        if self.order is None:
            self._start_state = self.generator.get_state()
            self.order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
            self.mix_seed = int(torch.randint(2 ** 62, (), generator=self.generator))
        return self.order

    def batch_seed(self, pos: int, stream: int = 0) -> int:
        """A seed for batch `pos` of this epoch, one stream per use (0: mixing, 1: DALI's per-sample params):
        draws made from it are redrawn identically when a run resumes at that batch."""
        return (self.mix_seed + 0x9E3779B97F4A7C15 * (2 * pos + stream + 1)) % 2 ** 63

    def end(self) -> None:
        self.order, self.pos, self._start_state = None, 0, None
        self.epoch += 1

    def state_dict(self) -> dict:
        gen = self._start_state if self._start_state is not None else self.generator.get_state()
        return {"generator": gen, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self._start_state = None, None
        self.pos, self.epoch = int(state.get("pos", 0)), int(state.get("epoch", 0))


class StateLoader:
    """fastcifar.loader.TrainLoader (len, num_images, position, images, state_dict, ...) for loaders whose
    position lives in an EpochState; subclasses set _images, labels, state and batch_size, and yield batches."""

    kind = "?"
    _images: np.ndarray
    labels: torch.Tensor
    state: EpochState
    batch_size: int

    @property
    def images(self) -> torch.Tensor:
        """The uint8 (N, H, W, 3) rows on the CPU (the figures read them)."""
        arr = self._images if self._images.flags.writeable else np.array(self._images)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def __len__(self) -> int:
        return self.state.num_batches

    @property
    def num_images(self) -> int:
        return len(self) * self.state.batch_size if self.state.shuffle else len(self.labels)

    @property
    def position(self) -> int:
        return self.state.pos

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def state_dict(self) -> dict:
        return {"kind": self.kind, **self.state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)
        note = self.resume_differs()
        if self.state.pos and note:
            log.warning(f"loader={self.kind}: resumed at batch {self.state.pos} of epoch {self.state.epoch + 1}; "
                        f"{note}")

    def resume_differs(self) -> str:
        """What a mid-epoch resume does not redraw exactly ("" when it redraws everything)."""
        return ""


class TorchvisionLoader(StateLoader):
    """A torch DataLoader over PILDataset with the device loader's interface (len, num_images, position,
    batch_size, epoch, images, labels, state_dict / load_state_dict)."""

    kind = "torchvision"

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, transform: Callable,
                 device: torch.device, *, shuffle: bool, seed: int, workers: int, mixer: BatchMixer | None = None):
        self._images, self.device, self.mixer = images, device, mixer
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.state = EpochState(len(self.labels), batch_size, shuffle, seed)
        self.batch_size = self.state.batch_size
        self.sampler = EpochBatches(len(self.labels), self.batch_size, drop_last=shuffle)
        self.pin = device.type == "cuda"
        self.dataloader = DataLoader(
            PILDataset(images, labels, transform), batch_sampler=self.sampler, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=self.pin,
            generator=torch.Generator().manual_seed(seed))  # the workers' base seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.order, self.sampler.start = self.state.begin(), self.state.pos
        for x, y in self.dataloader:
            x = x.as_subclass(torch.Tensor).to(self.device, non_blocking=self.pin)
            x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(self.device, non_blocking=self.pin)
            if self.mixer is not None:
                x, y = self.mixer(x, y, self.state.batch_seed(self.state.pos))
            self.state.pos += 1
            yield x, y
        self.state.end()

    def resume_differs(self) -> str:
        return ("same image order; per-image augmentation draws differ from an uninterrupted run (DataLoader "
                "workers' RNG is not checkpointed)")


def make_torchvision_loader(images_nhwc_uint8: np.ndarray, labels: np.ndarray, batch_size: int, cfg: AugmentCfg,
                            mean, std, *, train: bool, workers: int, seed: int, device: torch.device,
                            num_classes: int = 10) -> TorchvisionLoader:
    """The seed projects' DataLoader pipeline over uint8 NHWC rows: shuffled, augmented and drop_last when `train`,
    else in order and normalised only. RecipeError for an augment section it cannot express."""
    tf = build_pil_transform(cfg, mean, std, train, image_size=int(images_nhwc_uint8.shape[1]))
    mixer = build_batch_mixer(cfg, num_classes) if train else None
    return TorchvisionLoader(images_nhwc_uint8, labels, batch_size, tf, device, shuffle=train, seed=seed,
                             workers=workers, mixer=mixer)
