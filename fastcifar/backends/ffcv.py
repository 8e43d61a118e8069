"""loader = "ffcv": batches read from an FFCV .beton (extra [ffcv]: pip install 'fastcifar[ffcv]'; building FFCV
needs the apt packages libopencv-dev, libturbojpeg0-dev and pkg-config).

`fastcifar prepare --format beton` writes every row of a prepared store, train then test (the store's global
index order, so a fold's rows select the same images), as raw RGB (no JPEG loss) plus int labels, with a
sidecar <beton>.json naming the store it came from. Training reads it with FFCV's Loader: its compiled (numba)
stage decodes, shuffles and does the ops FFCV has (padded crop with zero fill, random flip); everything else in
the augment section then runs as the device pipeline on the uint8 batch on the training device.

Resume is best-effort: FFCV's order for an epoch is a function of (seed, epoch), so a resumed epoch replays the
same order and skips the batches already trained (they are decoded again and dropped); FFCV's own flip / crop
draws and the device stage's draws differ from an uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from fastcifar.atomic import current_umask, write_json
from fastcifar.augment import build_eval_transform, build_train_transform
from fastcifar.backends.torchvision import EpochState, StateLoader, build_batch_mixer
from fastcifar.errors import DataError, FastCifarError, RecipeError
from fastcifar.recipe import AugmentCfg

if TYPE_CHECKING:
    from fastcifar.data.store import Store

MISSING = ("train.loader: \"ffcv\" needs FFCV, which is not installed: pip install 'fastcifar[ffcv]' (building it "
           "needs apt packages libopencv-dev libturbojpeg0-dev pkg-config)")


def ffcv_available() -> bool:
    return importlib.util.find_spec("ffcv") is not None


def require_ffcv(context: str = "") -> None:
    """One-line error naming the extra (and what building it needs) when FFCV is not importable; `context`
    names the command asking when it is not train.loader."""
    if not ffcv_available():
        if context:
            raise FastCifarError(f"{context} needs FFCV, which is not installed:{MISSING.split('installed:')[1]}")
        raise RecipeError(MISSING)


def default_beton(store_dir: str | os.PathLike) -> Path:
    """Where `prepare --format beton` puts a store's .beton by default and loader = "ffcv" looks for it: beside
    the store directory, wherever that lives (data/cifar10 -> data/cifar10.beton)."""
    p = Path(store_dir).expanduser()
    return p.with_name(p.name + ".beton")


def write_rows(path: Path, images_of, labels: np.ndarray, workers: int, guard=None) -> None:
    """Write rows images_of(i), labels[i] to `path` via a temp file beside it (a crash leaves no half file);
    `guard()` runs just before the rename (atomic_path's guard: may `path` still be replaced?)."""
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField

    from fastcifar.backends.forked import run_with_watched_workers

    class Rows:
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int):
            return np.ascontiguousarray(images_of(i)), int(labels[i])

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # raw: the exact uint8 pixels (JPEG would change them); 60k 32x32 images make ~200 MB.
        def write() -> None:
            fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
            ffcv.writer.DatasetWriter(tmp, fields, num_workers=max(1, workers)).from_indexed_dataset(Rows())

        run_with_watched_workers(write, ffcv.writer, f"writing {path}")
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file a plain open()'s mode
        if guard is not None:
            guard()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_beton(store_dir: str | os.PathLike, out: str | os.PathLike, *, workers: int = 1, log_fn=print) -> Path:
    """Write the store's train + test rows (global index order) to `out` as an FFCV .beton, and the sidecar
    `out`.json that ties it to the store's hashes."""
    from fastcifar.data import open_store

    require_ffcv("prepare --format beton")
    from fastcifar.lifecycle import writer_lock

    out = Path(out).expanduser()
    check_beton_out(out)
    store = open_store(Path(store_dir).expanduser(), verify=True)
    n_train = len(store.train_labels)
    labels = store.labels

    def image(i: int) -> np.ndarray:
        return store.train_images[i] if i < n_train else store.test_images[i - n_train]

    with writer_lock(out, "another fastcifar .beton write"):  # one writer: a .beton and its sidecar are a pair
        log_fn(f"writing {out}: {len(labels)} images from {store.path}")
        # Checked again at each rename: a user's file may have appeared there while the rows were written.
        write_rows(out, image, labels, workers, lambda: check_beton_out(out))
        write_json(_sidecar(out), {"store": str(store.path), "sha256": store.meta["sha256"], "count": len(labels)},
                   lambda: _check_sidecar_out(out))
        log_fn(f"wrote {out} ({out.stat().st_size / 2 ** 20:.0f} MB)")
    return out


def _our_sidecar(d: dict) -> bool:
    return isinstance(d.get("sha256"), dict) and "store" in d


def check_beton_out(out: Path) -> None:
    """A .beton (and its sidecar) may replace only an earlier one that fastcifar wrote (its sidecar says so)."""
    from fastcifar.ownership import check_output_file, json_ours

    _check_sidecar_out(out)
    check_output_file(out, "FFCV .beton", lambda p: json_ours(_our_sidecar)(_sidecar(out)))


def _check_sidecar_out(out: Path) -> None:
    from fastcifar.ownership import check_output_file, json_ours

    check_output_file(_sidecar(out), "FFCV sidecar", json_ours(_our_sidecar))


def _sidecar(beton: Path) -> Path:
    return beton.with_name(beton.name + ".json")


def check_beton(beton: str | os.PathLike, store: Store) -> Path:
    """DataError unless `beton` exists and was written from this store (same array hashes)."""
    beton = Path(beton)
    fix = f"run `fastcifar prepare --format beton --source {store.path} --out {beton}`"
    if not beton.is_file():
        raise DataError(f"{beton}: no FFCV file for train.loader = \"ffcv\"; {fix}")
    try:
        meta = json.loads(_sidecar(beton).read_text())
    except (OSError, ValueError):
        raise DataError(f"{_sidecar(beton)}: missing or unreadable; {fix}") from None
    if not isinstance(meta, dict) or meta.get("sha256") != store.meta["sha256"]:
        raise DataError(f"{beton}: was written from another store than {store.path}; {fix}")
    return beton


def _ffcv_pipelines(cfg: AugmentCfg, train: bool, device: torch.device) -> tuple[dict, AugmentCfg]:
    """FFCV pipelines, and the part of `cfg` left for the device stage.

    Order matters (libffcv/ffcv#396: the Loader hangs when a pipeline goes compiled op -> torch op -> compiled
    op): every compiled (numba) op comes first, then ToTensor / ToDevice, and no compiled op after them; the
    device stage runs on the yielded batch, outside FFCV's pipeline.
    """
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor

    compiled: list = [SimpleRGBImageDecoder()]
    rest = cfg
    if train and cfg.crop_padding and cfg.crop_padding_mode == "constant":
        # RandomTranslate(p, fill=0) = v2.RandomCrop(size, padding=p, fill=0): offsets uniform in [0, 2p]
        compiled.append(RandomTranslate(padding=cfg.crop_padding, fill=(0, 0, 0)))
        rest = replace(rest, crop_padding=0)
    if train and cfg.flip and cfg.flip_mode == "random" and rest.crop_padding == 0 and not cfg.translate:
        compiled.append(RandomHorizontalFlip(0.5))  # after the crop, as the device pipeline orders them
        rest = replace(rest, flip=False)
    non_blocking = device.type == "cuda"
    pipelines = {"image": [*compiled, ToTensor(), ToDevice(device, non_blocking=non_blocking)],
                 "label": [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=non_blocking), Squeeze(1)]}
    return pipelines, rest


def refuse_alternating_flip(cfg: AugmentCfg) -> None:
    if cfg.flip and cfg.flip_mode == "alternate":
        raise RecipeError('augment.flip_mode: "alternate" needs each image\'s index, which FFCV batches do not '
                          'carry; use flip_mode = "random" or train.loader = "device"')


class FfcvLoader(StateLoader):
    """Batches from an FFCV Loader with the device loader's interface (len, num_images, position, batch_size,
    epoch, images, labels, state_dict / load_state_dict)."""

    kind = "ffcv"

    def __init__(self, beton: Path, indices: np.ndarray, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 cfg: AugmentCfg, mean, std, device: torch.device, *, train: bool, workers: int, seed: int,
                 num_classes: int):
        from ffcv.loader import Loader, OrderOption

        if train:
            refuse_alternating_flip(cfg)
        self._images, self.device, self.train = images, device, train
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.state = EpochState(len(self.labels), batch_size, train, seed)
        self.batch_size = self.state.batch_size
        pipelines, rest = _ffcv_pipelines(cfg, train, device)
        self.transform = (build_train_transform(rest, mean, std) if train
                          else build_eval_transform(cfg, mean, std))
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.mixer = build_batch_mixer(cfg, num_classes) if train else None
        self.loader = Loader(str(beton), batch_size=self.batch_size, num_workers=max(1, workers),
                             order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, seed=seed,
                             indices=np.asarray(indices, dtype=np.int64), pipelines=pipelines, drop_last=train)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.state.begin()
        self.loader.next_epoch = self.state.epoch  # FFCV's order for an epoch is a function of (seed, epoch)
        skip = self.state.pos
        for i, (x, y) in enumerate(self.loader):
            if i < skip:  # a resumed epoch: these batches were trained before the interruption
                continue
            rows = torch.arange(len(y), device=x.device)
            x = self.transform(x, rows, self.generator, self.state.epoch)
            if self.mixer is not None:
                x, y = self.mixer(x, y, self.state.batch_seed(self.state.pos))
            self.state.pos += 1
            yield x, y
        self.state.end()

    def state_dict(self) -> dict:
        return {"kind": self.kind, **self.state.state_dict(), "device_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "device_generator" in state:
            self.generator.set_state(state["device_generator"])
        super().load_state_dict(state)

    def resume_differs(self) -> str:
        return "same order; FFCV's flip / crop draws differ from an uninterrupted run (its RNG is not checkpointed)"


def make_ffcv_loader(images_nhwc_uint8: np.ndarray, labels: np.ndarray, batch_size: int, cfg: AugmentCfg, mean,
                     std, *, train: bool, workers: int, seed: int, device: torch.device, num_classes: int = 10,
                     beton: str | os.PathLike | None = None, indices: np.ndarray | None = None) -> FfcvLoader:
    """An FFCV loader over rows `indices` of `beton` (whose rows are `images_nhwc_uint8`, `labels`). With no
    beton, the rows are first written to a temporary one that lives as long as the loader (the bench's way)."""
    require_ffcv()
    tmpdir = None
    if beton is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="fastcifar-ffcv-")
        beton = Path(tmpdir.name) / "rows.beton"
        write_rows(beton, lambda i: images_nhwc_uint8[i], np.asarray(labels), workers)
        indices = np.arange(len(labels))
    idx = np.arange(len(labels)) if indices is None else np.asarray(indices)
    loader = FfcvLoader(Path(beton), idx, images_nhwc_uint8, labels, batch_size, cfg, mean, std, device,
                        train=train, workers=workers, seed=seed, num_classes=num_classes)
    loader._tmpdir = tmpdir  # keeps the temporary beton alive with the loader
    return loader
