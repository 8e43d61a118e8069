"""Model registry: every model trains a step, custom class counts, and local-only pretrained loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastcifar.errors import CheckpointError, RecipeError
from fastcifar.models import create_model, model_entry, model_names

ALL = ["softmax", "mlp", "cnn", "cnn_bn", "resnet9", "resnet18", "resnet34",
       "tv_resnet18", "tv_resnet34", "efficientnet_b2", "speedrun_net", "speedrun_net95", "speedrun_net96"]
# ImageNet-stem models also run at the 224-px size they are meant for.
LARGE = ["tv_resnet18", "tv_resnet34", "efficientnet_b2"]
CASES = [(n, 32) for n in ALL] + [(n, 224) for n in LARGE]


def _first_weight(model: nn.Module) -> torch.Tensor:
    return next(m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_model_names_lists_all() -> None:
    assert model_names() == ALL


# What torch.func can stack as it is: convolutions, BatchNorm, linear, pooling and pointwise layers (plus the
# speedrun net's whitening conv, shift-only BatchNorm and logit scale, which are the same ops).
STACKABLE_LAYERS = ("Conv2d", "BatchNorm2d", "ShiftBatchNorm", "PatchWhitening", "Linear", "MaxPool2d",
                    "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "ReLU", "GELU", "SiLU", "Flatten", "Identity",
                    "Dropout", "Scale")


@pytest.mark.parametrize("name", ALL)
def test_registry_entry_says_what_the_model_is(name: str) -> None:
    """Each entry's claims hold for the model it builds, so the trainer and preflight can trust the entry."""
    entry = model_entry(name)
    model = create_model(name, num_classes=10, image_size=64 if name in LARGE else 32)
    leaves = {type(m).__name__ for m in model.modules() if not list(m.children())}
    norms = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert entry.stackable == leaves.issubset(STACKABLE_LAYERS), sorted(leaves - set(STACKABLE_LAYERS))
    assert entry.sync_bn == norms.issubset({nn.BatchNorm1d, nn.BatchNorm2d})  # what SyncBatchNorm rebuilds alike
    assert entry.whiten_bias == hasattr(model, "whiten")
    assert (entry.data_init is not None) == hasattr(model, "init_whitening")


def test_a_model_s_own_options_reach_its_layers_and_other_models_refuse_them() -> None:
    """ModelEntry.options: a recipe's non-default speedrun options reach the net's layers (build_model through
    models.model_options), the model stays what its entry claims (stackable); a model whose entry lacks a key
    refuses a non-default value of it, in the recipe and in create_model, naming the key."""
    from fastcifar.models import build_model, model_options
    from fastcifar.recipe import recipe_from_dict

    options = {"activation": "silu", "whiten_init": "svd", "bn_momentum": 0.5, "bias_lr_scale": 16.0}
    recipe = recipe_from_dict({"model": {"name": "speedrun_net", "width": 4, **options}})
    assert model_options(recipe.model) == options and set(options) == set(model_entry("speedrun_net").options)
    model = build_model(recipe, 10, 32, torch.device("cpu"))
    leaves = {type(m).__name__ for m in model.modules() if not list(m.children())}
    assert leaves.issubset(STACKABLE_LAYERS)
    acts = [type(m).__name__ for n, m in model.named_modules() if n.startswith("group") and ".act" in n]
    assert acts and set(acts) == {"SiLU"}  # the conv groups' (the whitening's stays GELU, as Hiverge's)
    assert model.whiten.method == "svd"
    norms = [m for m in model.modules() if type(m).__name__ == "ShiftBatchNorm"]
    assert norms and all(m.momentum == 0.5 and m.bias_gain == 4.0 for m in norms)
    assert model_options(recipe_from_dict({"model": {"name": "speedrun_net"}}).model) == {}
    with pytest.raises(RecipeError, match=r"^model\.activation: applies to speedrun_net, speedrun_net95, "
                                          r"speedrun_net96, not cnn_bn$"):
        recipe_from_dict({"model": {"name": "cnn_bn", "activation": "silu"}})
    with pytest.raises(RecipeError, match=r"^model\.whiten_init: cnn_bn has no such option$"):
        create_model("cnn_bn", whiten_init="svd")


@pytest.mark.parametrize(("name", "size"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_forward_backward(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, image_size=size).train()
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    out.square().mean().backward()  # a loss that depends on every logit
    grad = _first_weight(model).grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["softmax", "mlp", "cnn", "cnn_bn", "resnet9", "resnet18"])
def test_num_classes_and_width(name: str) -> None:
    width = 0 if name in ("softmax", "resnet18") else 16
    model = create_model(name, num_classes=7, width=width, dropout=0.1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_efficientnet_num_classes() -> None:
    model = create_model("efficientnet_b2", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_name() -> None:
    with pytest.raises(RecipeError, match=r"^model\.name: unknown model .nope. \(choose from softmax, mlp, .*speedrun_net96, or timm:<name>\)$"):
        create_model("nope")


def test_bad_width_and_dropout() -> None:
    with pytest.raises(RecipeError, match=r"^model\.width"):
        create_model("tv_resnet18", width=32)
    with pytest.raises(RecipeError, match=r"^model\.width"):
        create_model("cnn_bn", width=-1)
    with pytest.raises(RecipeError, match=r"^model\.dropout"):
        create_model("cnn_bn", dropout=1.5)


def test_pretrained_imagenet_head_is_replaced(tmp_path: Path) -> None:
    src = create_model("tv_resnet18", num_classes=1000)
    path = tmp_path / "imagenet.pt"
    torch.save(src.state_dict(), path)
    model = create_model("tv_resnet18", num_classes=10, pretrained=str(path))
    assert model.fc.weight.shape == (10, 512)
    for key, value in src.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key


def test_pretrained_same_head_and_wrapped_dict(tmp_path: Path) -> None:
    src = create_model("cnn_bn", num_classes=10)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)
    model = create_model("cnn_bn", pretrained=str(path))
    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_pretrained_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": os.system}, path)
    with pytest.raises(CheckpointError, match="refused by weights-only loading") as exc:
        create_model("cnn_bn", pretrained=str(path))
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_pretrained_other_architecture(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pt"
    torch.save(create_model("cnn").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit tv_resnet18 \(missing keys: ") as exc:
        create_model("tv_resnet18", pretrained=str(path))
    assert str(exc.value).startswith(f"{path}: ") and "\n" not in str(exc.value)


def test_pretrained_missing_and_not_state_dict(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt: not found$"):
        create_model("cnn_bn", pretrained=str(tmp_path / "nope.pt"))
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=r"list\.pt: not a state dict$"):
        create_model("cnn_bn", pretrained=str(path))
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"list\.pt: not a readable checkpoint"):
        create_model("cnn_bn", pretrained=str(path))
