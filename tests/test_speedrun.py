"""Record-class speed models (speedrun_net, resnet9), the speedrun94 recipe, and the airbench peer harness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from boxes import bench_script
from fastcifar.bench.airbench import airbench_arrays, airbench_loaders, write_airbench_data
from fastcifar.data import open_store
from fastcifar.models import create_model
from fastcifar.models.speedrun import ShiftBatchNorm, SpeedrunNet, patch_second_moment
from fastcifar.recipe import CIFAR_MEAN, CIFAR_STD, load_recipe
from fastcifar.splits import take_per_class

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "speedrun94.toml"


def _harness():
    return bench_script("peer_airbench")


def _correlated_images(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random images whose 2x2 patches are strongly correlated (eigenvalues spread ~100x): mixed channels,
    spatially smoothed, plus a little white noise."""
    mix = torch.tensor([[1.0, 0.8, 0.3], [0.2, 1.0, 0.5], [0.1, 0.4, 1.0]])
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(n, 3, 32, 32, generator=gen))
    return F.avg_pool2d(x, 3, 1, 1) * 3 + 0.3 * torch.randn(n, 3, 32, 32, generator=gen)


def _whitened_moment(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = F.conv2d(x.double(), weight.double()).permute(0, 2, 3, 1).reshape(-1, weight.shape[0])
    return out.T @ out / len(out)


# ---------------------------------------------------------------------------------------------- whitening


def test_whitening_makes_patch_covariance_identity() -> None:
    gen = torch.Generator().manual_seed(1)
    x = _correlated_images(64, gen)
    evals = torch.linalg.eigvalsh(patch_second_moment(x, 2))
    assert evals.max() / evals.min() > 50  # far from white to begin with
    model = SpeedrunNet(widths=(8, 16, 16))
    model.init_whitening(x)
    w = model.whiten.weight
    assert w.shape == (24, 3, 2, 2) and torch.equal(w[12:], -w[:12])  # each direction and its negation
    eye = torch.eye(12, dtype=torch.float64)
    # On the fitted data only eps = 5e-4 separates it from I: lambda / (lambda + eps), lambda_min ~0.11.
    assert (_whitened_moment(x, w[:12]) - eye).abs().max() < 1e-2
    assert (_whitened_moment(_correlated_images(64, gen), w[:12]) - eye).abs().max() < 0.06  # held-out draw


def test_init_whitening_from_uint8_store_rows() -> None:
    """uint8 NHWC as stored == the same rows normalised by hand; rows are evenly strided, not the first ones."""
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=gen)
    a, b = SpeedrunNet(widths=(8, 16, 16)), SpeedrunNet(widths=(8, 16, 16))
    a.init_whitening(images, CIFAR_MEAN, CIFAR_STD, max_images=5)
    rows = torch.tensor([0, 10, 20, 29, 39])  # linspace(0, 39, 5) rounded
    m, s = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    b.init_whitening((images[rows].permute(0, 3, 1, 2).float() / 255 - m) / s)
    torch.testing.assert_close(a.whiten.weight, b.whiten.weight, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="mean and std"):
        a.init_whitening(images)


def test_frozen_parts_do_not_train() -> None:
    """Whitening filters are a buffer and BN has no scale: a blanket requires_grad_(True) plus SGD with weight
    decay leaves them alone, while the whitening bias and BN shifts do move."""
    torch.manual_seed(0)
    model = SpeedrunNet(widths=(8, 16, 16))
    names = {n for n, _ in model.named_parameters()}
    assert "whiten.weight" not in names and not any(n.endswith("norm1.weight") for n in names)
    for p in model.parameters():
        p.requires_grad_(True)
    before = model.whiten.weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8)).backward()
    opt.step()
    assert torch.equal(model.whiten.weight, before)
    assert model.whiten.bias.abs().sum() > 0 and model.group1.norm1.bias.abs().sum() > 0


def test_shift_bn_bias_gain_is_a_learning_rate_multiplier() -> None:
    """One SGD step moves the effective shift bias_lr_scale times as far as an unscaled one."""
    x, up = torch.randn(16, 4, 5, 5), torch.randn(16, 4, 5, 5)
    moved = []
    for scale in (1.0, 64.0):
        bn = ShiftBatchNorm(4, bias_lr_scale=scale)
        (bn(x) * up).sum().backward()
        torch.optim.SGD(bn.parameters(), lr=1e-3).step()
        moved.append(bn.bias.detach() * bn.bias_gain)
    torch.testing.assert_close(moved[1], 64 * moved[0])


# ---------------------------------------------------------------------------------------------- models


def test_speedrun_net_shapes_and_params() -> None:
    def expected(w: int) -> int:  # trainable: whitening bias, 6 convs, 6 BN shifts, head (no biases)
        w2 = 4 * w
        convs = 9 * (24 * w + w * w + w * w2 + w2 * w2 + 2 * w2 * w2)
        return 24 + convs + 2 * (w + w2 + w2) + w2 * 10

    model = create_model("speedrun_net")
    assert sum(p.numel() for p in model.parameters()) == expected(64) == 1_971_352
    small = create_model("speedrun_net", num_classes=7, width=8)
    assert sum(p.numel() for p in small.parameters()) == expected(8) - 32 * 3  # 7 classes, not 10
    sizes = []
    for g in (small.group1, small.group2, small.group3):
        g.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    assert small.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert sizes == [15, 7, 3]  # 32 -> whiten 2x2 -> 31 -> pools
    x = torch.randn(2, 8, 6, 6)  # Dirac init: a square group conv starts as the identity
    torch.testing.assert_close(small.group1.conv2(x), x)


def test_resnet9_shapes_and_params() -> None:
    def expected(w: int) -> int:
        conv = lambda a, b: 9 * a * b + 2 * b  # noqa: E731  (conv without bias + BN weight and bias)
        return (conv(3, w) + conv(w, 2 * w) + 2 * conv(2 * w, 2 * w) + conv(2 * w, 4 * w) + conv(4 * w, 8 * w)
                + 2 * conv(8 * w, 8 * w) + 8 * w * 10)

    model = create_model("resnet9")
    assert sum(p.numel() for p in model.parameters()) == expected(64) == 6_573_120
    assert isinstance(model.pool, nn.AdaptiveMaxPool2d) and model.scale.factor == 0.125
    small = create_model("resnet9", width=8).eval()
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in small.parameters()) == expected(8)


# ---------------------------------------------------------------------------------------------- the recipe


def test_recipe_loads_as_published() -> None:
    r = load_recipe(RECIPE)
    assert (r.model.name, r.train.batch_size, r.train.label_smoothing) == ("speedrun_net", 1024, 0.2)
    assert r.optim.nesterov and r.augment.flip_mode == "alternate" and r.augment.crop_padding == 2
    assert (r.eval.tta, r.train.compile, r.train.amp, r.split.kind) == ("flip_translate", True, "auto", "official")


def test_recipe_trains_one_tiny_epoch(store: Path, tmp_path: Path) -> None:
    from fastcifar.cli import main

    out = tmp_path / "run"
    sets = [f'data.store="{store}"', "data.train_subset=8", "train.epochs=1", "train.batch_size=32",
            "model.width=8", "train.compile=false", "train.amp=false", "eval.batch_size=40"]
    argv = ["train", str(RECIPE), "--device", "cpu", "--out", str(out)]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["epochs_run"] == 1 and 0.0 <= result["test_acc"] <= 1.0
    assert 'name = "speedrun_net"' in (out / "recipe.toml").read_text()


def test_trainer_seam_fits_whitening(store: Path, tiny) -> None:
    """build_fold runs the registry's data-dependent init (ModelEntry.data_init: speedrun_net's whitening fit):
    the whitening filters are the ones fitted to exactly the fold's training images."""
    from rich.console import Console

    from fastcifar.context import Hooks, RunContext, RunPlan
    from fastcifar.fold_run import build_fold
    from fastcifar.preflight import resolve_stats
    from fastcifar.splits import make_folds
    from fastcifar.strategy import Solo

    s = open_store(store)
    recipe = resolve_stats(tiny(model={"name": "speedrun_net", "width": 8}, data={"train_subset": 8}), s)
    fold = make_folds(len(s.train_labels), np.concatenate([s.train_labels, s.test_labels]), recipe.split)[0]
    plan = RunPlan(recipe, s, torch.device("cpu"), Path("unused"), False, (fold,), None)
    ctx = RunContext(plan, Console(quiet=True), Solo(), Hooks(), None, False)
    run = build_fold(ctx, fold)
    want = SpeedrunNet(widths=(8, 32, 32))
    want.init_whitening(run.data.train.images, recipe.data.mean, recipe.data.std)
    torch.testing.assert_close(run.model.whiten.weight.contiguous(), want.whiten.weight)


# ---------------------------------------------------------------------------------------------- peer harness


def test_airbench_adapter_format(store: Path, tmp_path: Path) -> None:
    """train.pt / test.pt as airbench's CifarLoader caches them from torchvision: uint8 NHWC, int64, names;
    exactly the images (and labels) our data.train_subset trains on, the training rows not sorted by class."""
    s = open_store(store)
    write_airbench_data(s, tmp_path, train_per_class=5)
    rows = take_per_class(np.arange(len(s.train_labels)), s.train_labels, 5)  # what data.train_subset=5 keeps
    for split, images, labels in (("train", s.train_images[rows], s.train_labels[rows]),
                                  ("test", s.test_images, s.test_labels)):
        obj = torch.load(tmp_path / f"{split}.pt", weights_only=True)
        assert set(obj) == {"images", "labels", "classes"}
        assert obj["images"].dtype == torch.uint8 and obj["images"].shape == (len(labels), 32, 32, 3)
        assert obj["labels"].dtype == torch.int64 and obj["classes"] == list(s.classes)
        got = sorted(zip((im.tobytes() for im in obj["images"].numpy()), obj["labels"].tolist()))
        assert got == sorted(zip((im.tobytes() for im in images), labels.tolist()))  # same (image, label) pairs
        if split == "train":  # airbench whitens its first rows: they must not all be one class
            assert len(np.unique(obj["labels"][:25].numpy())) >= 5


def test_airbench_adapter_refuses_other_shapes(tmp_path: Path) -> None:
    from synth import make_store

    from fastcifar.errors import FastCifarError

    s = open_store(make_store(tmp_path / "three", 2, 1, num_classes=3))
    with pytest.raises(FastCifarError, match="32x32 images and 10 classes"):
        airbench_arrays(s)


def test_airbench_own_loader_reads_adapted_data(store: Path, tmp_path: Path) -> None:
    pa = _harness()
    ab = pa.import_airbench()
    if ab is None:
        pytest.skip("airbench is not installed and bench/wheels/ holds no airbench wheel (see the harness doc)")
    write_airbench_data(open_store(store), tmp_path)
    train, test = airbench_loaders(ab, tmp_path, torch.device("cpu"), batch_size=50)
    x, y = next(iter(train))  # one batch through airbench's own augmentation
    assert (len(train.images), len(test.images), list(x.shape)) == (240, 80, [50, 3, 32, 32])
    assert (x.dtype, y.dtype) == (torch.float32, torch.int64)  # fp32 on the CPU: fp16 convolutions are GPU-only


def test_peer_harness_tiny_on_cpu(store: Path, tmp_path: Path, monkeypatch) -> None:
    originals = (torch.cuda.Event, torch.cuda.synchronize, torch.nn.Module.half, torch.nn.Module.cuda)
    harness = _harness()
    seen = []  # the environment (its git commit) is read before the runs, not after hours of them
    real_compare, real_env = harness.compare, harness.bench_environment
    monkeypatch.setattr(harness, "bench_environment", lambda device: seen.append("environment") or real_env(device))
    monkeypatch.setattr(harness, "compare", lambda *a: seen.append("compare") or real_compare(*a))
    out = harness.main(["--tiny", "--device", "cpu", "--store", str(store), "--out-dir", str(tmp_path),
                        "--set", "model.width=8", "--set", "data.train_subset=8"])
    assert out.parent == tmp_path and out.name.endswith("-cpu-speedrun-tiny.json")
    assert seen == ["environment", "compare"]
    res = json.loads(out.read_text())
    assert len(res["environment"]["load_avg_end"]) == 3
    assert (res["device"], res["n"], res["timer"], res["tiny"]) == ("cpu", 1, "perf_counter", True)
    ours = res["ours"]
    assert ours["status"] == "ok" and len(ours["runs"]) == 1 and 0.0 <= ours["acc_mean"] <= 1.0
    assert ours["train_s_mean"] > 0 and ours["eval_s_mean"] > 0 and ours["acc_std"] == 0.0
    assert res["recipe"]["resolved"]["model"]["name"] == "speedrun_net"
    assert 0.0 <= ours["acc_no_tta_mean"] <= 1.0
    if _harness().import_airbench() is None:
        assert res["airbench"]["status"].startswith("not run: airbench not installed")
        return
    ab = res["airbench"]  # airbench's own training, fp32 on the CPU, at the same epochs and data
    assert ab["status"] == "ok" and ab["mode"].startswith("fp32 on the CPU") and len(ab["runs"]) == 1
    assert 0.0 <= ab["acc_mean"] <= 1.0 and 0.0 <= ab["acc_no_tta_mean"] <= 1.0 and ab["train_s_mean"] > 0
    assert res["epoch_time_ratio"] > 0 and "acc_no_tta_delta_ours_minus_airbench" in res
    assert (torch.cuda.Event, torch.cuda.synchronize, torch.nn.Module.half, torch.nn.Module.cuda) == originals
