"""loader = "dali": an NVIDIA DALI pipeline fed from the store (extra [dali]: pip install 'fastcifar[dali]').

The uint8 rows of each batch enter through fn.external_source together with the batch's per-sample parameters
(crop and translate anchors, flip flags, angles, jitter factors, erase boxes). The parameters are drawn in Python
from a seed that is a function of (loader seed, epoch, batch) with the same helpers the device pipeline uses, so
they follow torchvision.v2 semantics and are redrawn exactly on resume; the pixels are moved by DALI ops (slice,
flip, rotate, color_twist, auto_aug, crop_mirror_normalize, resize, erase), on the GPU when training on CUDA and
on the CPU (device_id=None) otherwise. Only RandAugment / TrivialAugmentWide and erasing noise draw from DALI's
own RNG, which a checkpoint does not hold.

Known differences from the device loader: DALI's color_twist applies brightness, contrast, saturation and hue in
one fixed order (v2.ColorJitter permutes them), and normalises as (x - 255 mean) / (255 std).
"""

from __future__ import annotations

import importlib.util
import weakref
from typing import Iterator

import numpy as np
import torch

from fastcifar.augment import basic as B
from fastcifar.backends.torchvision import EpochState, StateLoader, build_batch_mixer
from fastcifar.errors import RecipeError
from fastcifar.recipe import AugmentCfg

MISSING = "train.loader: \"dali\" needs NVIDIA DALI, which is not installed: pip install 'fastcifar[dali]'"


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no `nvidia` namespace at all
        return False


def refuse_inexact_draws(cfg: AugmentCfg) -> None:
    """DALI draws RandAugment / TrivialAugmentWide from its own RNG, which no checkpoint can hold: a resumed run
    could not redraw them, so such a recipe is refused before it starts (the device loader redraws exactly)."""
    for key, on in (("randaugment", cfg.randaugment), ("trivialaugment", cfg.trivialaugment)):
        if on:
            raise RecipeError(f'augment.{key}: train.loader = "dali" draws it from DALI\'s own RNG, which a '
                              'checkpoint cannot hold (a resumed run would not redraw it); use train.loader = '
                              '"device"')


def require_dali() -> None:
    """One-line RecipeError naming the extra when DALI is not importable."""
    if not dali_available():
        raise RecipeError(MISSING)


def _draw_params(cfg: AugmentCfg, idx: torch.Tensor, epoch: int, out_size: int, gen: torch.Generator) -> dict:
    """Per-sample parameters of one batch (numpy, one row per sample), in a fixed draw order."""
    b, p = len(idx), {}
    if cfg.crop_padding:
        p["crop"] = torch.randint(0, 2 * cfg.crop_padding + 1, (b, 2), generator=gen).int()
    if cfg.translate:
        dx, dy = B.translate_offsets(b, cfg.translate, gen, "cpu")
        p["shift"] = torch.stack([-dy, -dx], 1).int()  # out[r] = in[r - dy]: a slice anchored at -dy
    if cfg.flip:
        if cfg.flip_mode == "alternate":  # the device pipeline's own rule, read off a 2-pixel probe image
            probe = B.alternating_flip(torch.arange(2).view(1, 1, 1, 2).expand(b, 1, 1, 2), idx, epoch)
            p["flip"] = (probe[:, 0, 0, 0] == 1).int()
        else:
            p["flip"] = (torch.rand(b, generator=gen) < 0.5).int()
    if cfg.rotation:
        p["angle"] = (torch.rand(b, generator=gen) * 2 - 1) * cfg.rotation
    if any(cfg.color_jitter):
        bri, con, sat, hue = cfg.color_jitter
        u = torch.rand(b, 4, generator=gen)
        lo_hi = torch.tensor([[max(0.0, 1 - v), 1 + v] for v in (bri, con, sat)] + [[-hue, hue]])
        p["jitter"] = lo_hi[:, 0] + u * (lo_hi[:, 1] - lo_hi[:, 0])
        p["jitter"][:, 3] *= 360.0  # v2 hue is a fraction of the colour wheel, DALI's is in degrees
    if cfg.erasing_p > 0:
        apply = torch.rand(b, generator=gen) < cfg.erasing_p
        top, left, eh, ew, found = B.erasing_boxes(b, out_size, out_size, cfg.erasing_scale, cfg.erasing_ratio,
                                                   gen, "cpu")
        keep = (apply & found).long()[:, None]  # a 0 x 0 box erases nothing
        p["erase_at"], p["erase_hw"] = torch.stack([top, left], 1).float(), (torch.stack([eh, ew], 1) * keep).float()
    if cfg.cutout:
        top, left, ch, cw = B.cutout_boxes(b, out_size, out_size, cfg.cutout, gen, "cpu",
                                           inside=cfg.cutout_mode == "inside")
        p["cut_at"], p["cut_hw"] = torch.stack([top, left], 1).float(), torch.stack([ch, cw], 1).float()
    return {k: np.ascontiguousarray(v.numpy()) for k, v in p.items()}


def _graph(cfg: AugmentCfg, inputs: dict, size: int, mean, std, train: bool, gpu: bool):
    """The DALI op graph from the external_source nodes in `inputs` (images + parameter names)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    x = inputs["images"].gpu() if gpu else inputs["images"]
    if train and "crop" in inputs:  # rows arrive pre-padded by crop_padding (numpy: reflect or constant)
        x = fn.slice(x, start=inputs["crop"], shape=[size, size], axis_names="HW")
    if train and "shift" in inputs:
        x = fn.slice(x, start=inputs["shift"], shape=[size, size], axis_names="HW", out_of_bounds_policy="pad",
                     fill_values=0)
    if train and "flip" in inputs:
        x = fn.flip(x, horizontal=inputs["flip"])
    if train and "angle" in inputs:
        x = fn.rotate(x, angle=inputs["angle"], keep_size=True, fill_value=0, interp_type=types.INTERP_NN)
    if train and "jitter" in inputs:
        j = inputs["jitter"]
        x = fn.color_twist(x, brightness=j[0], contrast=j[1], saturation=j[2], hue=j[3])
    if train and cfg.randaugment:
        from nvidia.dali.auto_aug import rand_augment

        x = rand_augment.rand_augment(x, n=cfg.randaugment_num_ops, m=cfg.randaugment_magnitude,
                                      num_magnitude_bins=cfg.randaugment_num_bins, fill_value=0)
    elif train and cfg.trivialaugment:
        from nvidia.dali.auto_aug import trivial_augment

        x = trivial_augment.trivial_augment_wide(x, fill_value=0)
    x = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="HWC", mean=[255 * m for m in mean],
                                 std=[255 * s for s in std])
    if cfg.resize:
        x = fn.resize(x, size=[cfg.resize, cfg.resize], antialias=True, interp_type=types.INTERP_LINEAR)
    return _erase(cfg, x, inputs) if train else x


def _erase(cfg: AugmentCfg, x, inputs: dict):
    import nvidia.dali.fn as fn

    if "erase_at" in inputs:
        at, hw = inputs["erase_at"], inputs["erase_hw"]
        if cfg.erasing_value == "random":  # fn.erase fills a constant: blend standard normal noise in by a mask
            keep = fn.erase(fn.ones_like(x), anchor=at, shape=hw, axis_names="HW", fill_value=0.0)
            x = x * keep + fn.random.normal(x) * (1.0 - keep)
        else:
            fill = [0.0] if cfg.erasing_value == "zero" else list(cfg.erasing_constant)
            x = fn.erase(x, anchor=at, shape=hw, axis_names="HW", fill_value=fill)
    if "cut_at" in inputs:
        x = fn.erase(x, anchor=inputs["cut_at"], shape=inputs["cut_hw"], axis_names="HW", fill_value=0.0)
    return x


class DaliLoader(StateLoader):
    """Batches from a DALI pipeline with the device loader's interface (len, num_images, position, batch_size,
    epoch, images, labels, state_dict / load_state_dict)."""

    kind = "dali"

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, cfg: AugmentCfg, mean, std,
                 device: torch.device, *, train: bool, seed: int, threads: int, num_classes: int):
        require_dali()
        self._images = images if images.flags.writeable else np.array(images)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.cfg, self.mean, self.std, self.device, self.train = cfg, mean, std, device, train
        self.size = int(images.shape[1])
        self.state = EpochState(len(self.labels), batch_size, train, seed)
        self.batch_size, self.seed, self.threads = self.state.batch_size, seed, max(1, threads)
        self.mixer = build_batch_mixer(cfg, num_classes) if train else None
        self.param_names = list(_draw_params(cfg, torch.arange(1), 0, cfg.resize or self.size,
                                             torch.Generator()) if train else {})
        self._pipe = None
        self._start = 0  # the batch the pipeline's iteration 0 stands for (a resumed epoch starts mid-way)

    def _source(self, info) -> tuple[np.ndarray, ...]:
        """external_source callback: batch `_start + iteration` of the current epoch, or StopIteration."""
        batch = self._start + info.iteration
        if batch >= self.state.num_batches:
            raise StopIteration
        idx = self.state.begin()[batch * self.batch_size:(batch + 1) * self.batch_size]
        rows = self._images[idx.numpy()]
        if not self.train:
            return (rows,)
        pad = self.cfg.crop_padding
        if pad:
            mode = "reflect" if self.cfg.crop_padding_mode == "reflect" else "constant"
            rows = np.pad(rows, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
        gen = torch.Generator().manual_seed(self.state.batch_seed(batch, 1))
        params = _draw_params(self.cfg, idx, self.state.epoch, self.cfg.resize or self.size, gen)
        return (rows, *(params[k] for k in self.param_names))

    def _build(self):
        import nvidia.dali.fn as fn
        from nvidia.dali import pipeline_def

        gpu = self.device.type == "cuda"
        auto_aug = self.train and (self.cfg.randaugment or self.cfg.trivialaugment)

        # The pipeline reaches this loader only through a weak reference: a cycle (loader -> pipeline -> bound
        # method -> loader) left the pipeline to the cyclic GC, which may run it in a forked child (FFCV's writer,
        # DataLoader workers) where DALI's Shutdown() joins threads that do not exist there: a segfault in CI.
        ref = weakref.ref(self)

        def source(info):
            return ref()._source(info)

        @pipeline_def(enable_conditionals=auto_aug)
        def pipe():
            names = ["images", *self.param_names]
            nodes = fn.external_source(source=source, num_outputs=len(names), batch=True, batch_info=True,
                                       layout=["HWC"] + [""] * len(self.param_names))
            return _graph(self.cfg, dict(zip(names, nodes)), self.size, self.mean, self.std, self.train, gpu)

        p = pipe(batch_size=self.batch_size, num_threads=self.threads, seed=self.seed + self.state.epoch,
                 device_id=(self.device.index or 0) if gpu else None, prefetch_queue_depth=2)
        p.build()
        return p

    def _to_torch(self, out) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = out.as_tensor()
        dst = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, dst, cuda_stream=stream)
        return dst.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW = channels-last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.state.begin()
        if self._pipe is None or self._start != self.state.pos:
            self._start, self._pipe = self.state.pos, None
            self._pipe = self._build()
        while True:
            try:
                (out,) = self._pipe.run()
            except StopIteration:
                break
            pos = self.state.pos
            x = self._to_torch(out)
            y = self.labels[order[pos * self.batch_size:(pos + 1) * self.batch_size]].to(self.device)
            if self.mixer is not None:
                x, y = self.mixer(x, y, self.state.batch_seed(pos))
            self.state.pos += 1
            yield x, y
        self._pipe.reset()
        self._start = 0
        self.state.end()

    def load_state_dict(self, state: dict) -> None:
        self._pipe = None  # batches it prefetched belong to the old position
        super().load_state_dict(state)

    def resume_differs(self) -> str:
        if self.train and (self.cfg.randaugment or self.cfg.trivialaugment or self.cfg.erasing_value == "random"):
            return ("RandAugment / TrivialAugment / erasing-noise draws differ from an uninterrupted run (DALI's RNG "
                    "is not checkpointed)")
        return ""


def make_dali_loader(images_nhwc_uint8: np.ndarray, labels: np.ndarray, batch_size: int, cfg: AugmentCfg,
                     mean, std, *, train: bool, workers: int, seed: int, device: torch.device,
                     num_classes: int = 10) -> DaliLoader:
    """A DALI pipeline over uint8 NHWC rows (GPU ops on CUDA, CPU ops elsewhere); `workers` DALI threads.
    RecipeError naming the extra when DALI is missing."""
    return DaliLoader(images_nhwc_uint8, labels, batch_size, cfg, mean, std, device, train=train, seed=seed,
                      threads=workers, num_classes=num_classes)
