"""The other input pipelines (fastcifar.backends): torchvision DataLoader, NVIDIA DALI, FFCV.

Each must meet DeviceLoader's batch contract; the torchvision loader must hand the model exactly the device
loader's eval tensors; missing extras fail through `fastcifar train` in one line. DALI and FFCV tests run where
the library imports (e.g. PYTHONPATH=/tmp/dali) and are skipped with the reason otherwise.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import weakref

import numpy as np
import pytest
import torch

import fastcifar.backends.dali as dali_mod
import fastcifar.backends.ffcv as ffcv_mod
from fastcifar.augment import alternating_flip, build_eval_transform
from fastcifar.backends.torchvision import Cutout, build_pil_transform, make_torchvision_loader
from fastcifar.cli import main
from fastcifar.data import open_store
from fastcifar.errors import DataError, RecipeError
from fastcifar.loader import DeviceLoader, gather_images
from fastcifar.recipe import AugmentCfg, recipe_to_toml
from resume import full_and_resumed

CPU = torch.device("cpu")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
PLAIN = AugmentCfg(flip=False, crop_padding=0)  # augmentation off
EVERY_OP = AugmentCfg(crop_padding=4, translate=2, rotation=15.0, color_jitter=(0.3, 0.3, 0.3, 0.05),
                      randaugment=True, resize=40, erasing_p=0.5, erasing_value="constant",
                      erasing_constant=(0.5, 0.0, -0.5), cutout=8, mixup_alpha=0.2, cutmix_alpha=1.0, mix_p=0.8)
needs_dali = pytest.mark.skipif(not dali_mod.dali_available(),
                                reason="NVIDIA DALI not installed (pip install 'fastcifar[dali]')")
needs_ffcv = pytest.mark.skipif(not ffcv_mod.ffcv_available(), reason="FFCV not installed (pip install "
                                "'fastcifar[ffcv]'; needs apt libopencv-dev libturbojpeg0-dev pkg-config)")


@pytest.fixture(scope="module")
def rows(store):
    s = open_store(store)
    idx = np.arange(len(s.train_labels) + len(s.test_labels))
    labels = np.concatenate([s.train_labels, s.test_labels])
    return gather_images(s.train_images, s.test_images, idx), labels


def _device_eval(images, labels, batch, cfg=PLAIN) -> DeviceLoader:
    return DeviceLoader(images, labels, batch, build_eval_transform(cfg, MEAN, STD), CPU, shuffle=False)


def _assert_contract(loader, n: int, batch: int, *, soft: int = 0, size: int = 32) -> None:
    assert len(loader) == n // batch and loader.num_images == n // batch * batch and loader.batch_size == batch
    seen = 0
    for i, (x, y) in enumerate(loader):
        assert loader.position == i + 1
        assert x.shape == (batch, 3, size, size) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert x.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(x).all()
        if soft:
            assert y.shape == (batch, soft) and y.dtype == torch.float32
            assert torch.allclose(y.sum(1), torch.ones(batch)) and (y >= 0).all()
        else:
            assert y.shape == (batch,) and y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
        seen += len(x)
    assert seen == loader.num_images and loader.position == 0 and loader.epoch == 1


# --- the loader interface ------------------------------------------------------------------------------------


def _declared(cls) -> set[str]:
    """Names a loader class declares: methods and properties, and attributes annotated on it or a base."""
    return set(dir(cls)) | {k for c in cls.__mro__ for k in getattr(c, "__annotations__", {})}


def test_every_training_loader_meets_the_train_loader_protocol(rows):
    """FoldData.train is typed TrainLoader: the device loader and each backend's loader have all of it (DALI's
    and FFCV's are checked by what their classes declare, as their libraries need not be installed here)."""
    import typing

    from fastcifar.backends import BACKENDS
    from fastcifar.loader import TrainLoader

    images, labels = rows
    device = DeviceLoader(images, labels, 16, build_eval_transform(PLAIN, MEAN, STD), CPU, shuffle=True)
    made = BACKENDS["torchvision"].make(images, labels, 16, PLAIN, MEAN, STD, train=True, workers=0, seed=0,
                                        device=CPU)
    assert isinstance(device, TrainLoader) and isinstance(made, TrainLoader)
    members = set((getattr(typing, "get_protocol_members", None) or typing._get_protocol_attrs)(TrainLoader))
    for cls in (dali_mod.DaliLoader, ffcv_mod.FfcvLoader):
        assert members <= _declared(cls), (cls.__name__, members - _declared(cls))
    assert set(BACKENDS) == {"torchvision", "dali", "ffcv"}


# --- torchvision ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resize", [0, 40])
def test_torchvision_eval_batches_equal_device_loader_exactly(rows, resize):
    images, labels = rows
    cfg = AugmentCfg(resize=resize)
    tv = make_torchvision_loader(images, labels, 64, cfg, MEAN, STD, train=False, workers=0, seed=0, device=CPU)
    ref = _device_eval(images, labels, 64, cfg)
    assert len(tv) == len(ref) == 5 and tv.num_images == ref.num_images == len(labels)  # ragged last batch kept
    pairs = list(zip(tv, ref))
    assert len(pairs) == 5
    for (x, y), (rx, ry) in pairs:
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_torchvision_train_epoch_is_a_permutation_of_the_normalised_rows(rows):
    images, labels = rows
    ref = torch.cat([x for x, _ in _device_eval(images, labels, 320)])
    tv = make_torchvision_loader(images, labels, 32, PLAIN, MEAN, STD, train=True, workers=1, seed=3, device=CPU)
    for epoch in range(2):
        got_x, got_y = zip(*tv)
        x, y = torch.cat(got_x), torch.cat(got_y)
        # each yielded image is one stored row, normalised exactly, with its own label, none twice
        hit = (x.flatten(1)[:, None, :] == ref.flatten(1)[None, :, :]).all(-1).float().argmax(1)
        assert torch.equal(x, ref[hit]) and torch.equal(y, torch.as_tensor(labels)[hit])
        assert len(set(hit.tolist())) == len(hit) == 320
        assert tv.epoch == epoch + 1
    _assert_contract(make_torchvision_loader(images, labels, 48, AugmentCfg(), MEAN, STD, train=True, workers=0,
                                             seed=0, device=CPU), 320, 48)


def test_torchvision_every_op_composes_and_yields_the_contract(rows):
    images, labels = rows
    names = [type(t).__name__ for t in build_pil_transform(EVERY_OP, MEAN, STD, train=True).transforms]
    assert names == ["RandomCrop", "RandomAffine", "RandomHorizontalFlip", "RandomRotation", "ColorJitter",
                     "RandAugment", "ToImage", "Resize", "NormalizeLikeDevice", "RandomErasing", "Cutout"]
    _assert_contract(make_torchvision_loader(images, labels, 32, EVERY_OP, MEAN, STD, train=True, workers=0,
                                             seed=0, device=CPU), 320, 32, soft=10, size=40)
    other = AugmentCfg(trivialaugment=True, erasing_p=1.0, erasing_value="random", crop_padding_mode="constant",
                       cutmix_alpha=1.0)
    assert "TrivialAugmentWide" in [type(t).__name__ for t in build_pil_transform(other, MEAN, STD, True).transforms]
    _assert_contract(make_torchvision_loader(images, labels, 32, other, MEAN, STD, train=True, workers=0, seed=0,
                                             device=CPU), 320, 32, soft=10)


def test_cutout_zeroes_one_clipped_square():
    from torchvision import tv_tensors

    img = tv_tensors.Image(torch.ones(3, 32, 32))
    torch.manual_seed(0)
    for _ in range(20):
        zeroed = (Cutout(8)(img) == 0).all(0)
        rows, cols = zeroed.any(1).nonzero().flatten(), zeroed.any(0).nonzero().flatten()
        assert 4 <= len(rows) <= 8 and 4 <= len(cols) <= 8
        assert zeroed.sum() == len(rows) * len(cols)  # one rectangle
    assert (img == 1).all()  # the input is not modified
    corners = set()
    for _ in range(200):  # cutout_mode = "inside": always the whole square
        zeroed = (Cutout(8, inside=True)(img) == 0).all(0)
        assert zeroed.sum() == 64
        corners.add(tuple(zeroed.nonzero()[0].tolist()))
    rows = {r for r, _ in corners}
    assert min(rows) == 0 and max(rows) == 24  # every top row from 0 to 32 - 8 is reachable


def test_alternating_flip_is_refused_in_one_line(tiny, tmp_path, capsys):
    with pytest.raises(RecipeError, match=r"^augment\.flip_mode: .*alternate") as e:
        build_pil_transform(AugmentCfg(flip_mode="alternate"), MEAN, STD, train=True)
    assert "\n" not in str(e.value)
    build_pil_transform(AugmentCfg(flip_mode="alternate"), MEAN, STD, train=False)  # eval has no flip: fine
    path = tmp_path / "alt.toml"
    path.write_text(recipe_to_toml(tiny(train={"loader": "torchvision"}, augment={"flip_mode": "alternate"})))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastcifar: error: augment.flip_mode") and "\n" not in err
    assert not (tmp_path / "run").exists()


def _cut_and_resume(make, n: int):
    """(an uninterrupted epoch's batches, the first n batches of a second loader, a third loader resumed from
    the second's state after those n batches)."""
    ref = list(make())
    cut = make()
    it = iter(cut)
    head = [next(it) for _ in range(n)]
    resumed = make()
    resumed.load_state_dict(cut.state_dict())
    return ref, head, resumed


def test_torchvision_mid_epoch_resume_continues_the_same_order_and_mixes(rows, caplog):
    images, labels = rows
    cfg = AugmentCfg(flip=False, crop_padding=0, mixup_alpha=0.4, cutmix_alpha=1.0)
    make = lambda: make_torchvision_loader(images, labels, 32, cfg, MEAN, STD, train=True, workers=0,  # noqa
                                           seed=5, device=CPU)
    with caplog.at_level(logging.WARNING):
        ref, head, resumed = _cut_and_resume(make, 4)
    assert resumed.position == 4 and "resumed at batch 4" in caplog.text and "\n" not in caplog.text.strip()
    tail = list(resumed)
    assert len(head) + len(tail) == len(ref) == 10 and resumed.epoch == 1
    for (x, y), (rx, ry) in zip(head + tail, ref):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_train_with_torchvision_loader_resumes_mid_epoch_to_identical_weights(tiny, tmp_path):
    recipe = tiny(train={"loader": "torchvision", "workers": 0, "epochs": 2}, augment={"flip": False,
                                                                                          "crop_padding": 0})
    _, _, summary = full_and_resumed(recipe, tmp_path, 1, 2)  # asserts identical weights
    assert summary["test_acc_mean"] > 0.2


# --- missing extras ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, module, flag", [("dali", dali_mod, "dali_available"),
                                                ("ffcv", ffcv_mod, "ffcv_available")])
def test_missing_extra_fails_train_early_in_one_line(tiny, tmp_path, capsys, monkeypatch, kind, module, flag):
    monkeypatch.setattr(module, flag, lambda: False)
    path = tmp_path / "r.toml"
    path.write_text(recipe_to_toml(tiny(train={"loader": kind})))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"pip install 'fastcifar[{kind}]'" in err and err.startswith("fastcifar: error: ")
    assert not (tmp_path / "run").exists()


def test_prepare_beton_without_ffcv_names_the_extra(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ffcv_mod, "ffcv_available", lambda: False)
    assert main(["prepare", "--format", "beton", "--source", str(store), "--out", str(tmp_path / "x.beton")]) == 2
    err = capsys.readouterr().err.strip()
    assert "fastcifar[ffcv]" in err and "libturbojpeg0-dev" in err and "\n" not in err


def test_default_beton_sits_beside_the_store_wherever_it_lives(tmp_path):
    assert ffcv_mod.default_beton(tmp_path / "deep" / "cifar10") == tmp_path / "deep" / "cifar10.beton"
    assert ffcv_mod.default_beton("data/cifar10/").as_posix() == "data/cifar10.beton"


# --- DALI (CPU pipelines) ------------------------------------------------------------------------------------


@needs_dali
def test_dali_eval_matches_device_loader_and_train_meets_contract(rows):
    images, labels = rows
    ev = dali_mod.make_dali_loader(images, labels, 64, PLAIN, MEAN, STD, train=False, workers=1, seed=0, device=CPU)
    got = list(ev)
    ref = list(_device_eval(images, labels, 64))
    assert len(got) == len(ref) == len(ev) == 5
    for (x, y), (rx, ry) in zip(got, ref):
        assert x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x, rx, rtol=0, atol=1e-5)  # DALI: (x - 255 m) / (255 s)
        assert torch.equal(y, ry)
    cfg = AugmentCfg(translate=2, rotation=10.0, color_jitter=(0.2, 0.2, 0.2, 0.02), erasing_p=0.5, cutout=6,
                     mixup_alpha=0.2)
    _assert_contract(dali_mod.make_dali_loader(images, labels, 32, cfg, MEAN, STD, train=True, workers=1, seed=0,
                                               device=CPU), 320, 32, soft=10)


@needs_dali
def test_dali_alternating_flip_follows_the_device_rule(rows):
    images, labels = rows
    cfg = AugmentCfg(crop_padding=0, flip_mode="alternate")
    loader = dali_mod.make_dali_loader(images, labels, 32, cfg, MEAN, STD, train=True, workers=1, seed=1,
                                       device=CPU)
    ref = torch.cat([x for x, _ in _device_eval(images, labels, 320)])
    for epoch in range(2):
        order = loader.state.begin().clone()
        x = torch.cat([b for b, _ in loader])
        want = alternating_flip(ref[order[:len(x)]], order[:len(x)], epoch)
        torch.testing.assert_close(x, want, rtol=0, atol=1e-5)


@needs_dali
def test_dali_resume_mid_epoch_redraws_the_same_batches(rows):
    images, labels = rows
    cfg = AugmentCfg(translate=2, cutout=8, erasing_p=0.7, erasing_value="zero")
    make = lambda: dali_mod.make_dali_loader(images, labels, 32, cfg, MEAN, STD, train=True, workers=1,  # noqa
                                             seed=2, device=CPU)
    ref, head, resumed = _cut_and_resume(make, 3)
    for (x, y), (rx, ry) in zip(head + list(resumed), ref):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@needs_dali
def test_dali_pipeline_dies_with_its_loader_without_the_cyclic_gc(rows):
    """A loader stopped mid-epoch frees its pipeline at once: left in a cycle, it waited for the cyclic GC, which
    ran it in FFCV's forked writer worker in CI (DALI's Shutdown() there segfaulted; the suite hung)."""
    images, labels = rows
    gc.disable()
    try:
        loader = dali_mod.make_dali_loader(images, labels, 32, AugmentCfg(), MEAN, STD, train=True, workers=1,
                                           seed=0, device=CPU)
        batches = iter(loader)
        next(batches)
        pipe = weakref.ref(loader._pipe)
        del batches, loader
        assert pipe() is None
    finally:
        gc.enable()


# --- FFCV ------------------------------------------------------------------------------------------------------


@needs_ffcv
def test_ffcv_beton_from_cli_reads_back_exactly_and_trains(store, rows, tmp_path):
    images, labels = rows
    beton = tmp_path / "s.beton"
    assert main(["prepare", "--format", "beton", "--source", str(store), "--out", str(beton)]) == 0
    s = open_store(store)
    assert ffcv_mod.check_beton(beton, s) == beton
    idx = np.arange(20, 300)
    ev = ffcv_mod.make_ffcv_loader(images[idx], labels[idx], 64, PLAIN, MEAN, STD, train=False, workers=1, seed=0,
                                   device=CPU, beton=beton, indices=idx)
    for (x, y), (rx, ry) in zip(ev, _device_eval(images[idx], labels[idx], 64)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    cfg = AugmentCfg(crop_padding_mode="constant", mixup_alpha=0.2)  # crop + flip run in FFCV's compiled stage
    _assert_contract(ffcv_mod.make_ffcv_loader(images[idx], labels[idx], 32, cfg, MEAN, STD, train=True, workers=1,
                                               seed=0, device=CPU, beton=beton, indices=idx), 280, 32, soft=10)
    other = dataclasses.replace(s, meta={**s.meta, "sha256": {}})
    with pytest.raises(DataError, match="another store"):
        ffcv_mod.check_beton(beton, other)
