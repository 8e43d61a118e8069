"""Figures (valid, non-trivial PNGs) and Grad-CAM (shape, range, localisation, hook hygiene)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcifar import figures
from fastcifar.errors import RecipeError
from fastcifar.gradcam import find_target_layer, get_layer, grad_cam
from fastcifar.models import MODELS, create_model
from synth import CIFAR_CLASSES, class_images

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = list(CIFAR_CLASSES)


def _check_png(path: Path, aspect: tuple[float, float] | None = None) -> np.ndarray:
    """The file is a PNG that decodes to more than one colour; optionally width/height within `aspect`."""
    import matplotlib.image as mpimg

    assert Path(path).read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert np.ptp(img[..., :3]) > 0.3, "single-colour image"
    if aspect is not None:
        ratio = img.shape[1] / img.shape[0]
        assert aspect[0] <= ratio <= aspect[1], ratio
    return img


@pytest.fixture(scope="module")
def data() -> dict:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 6)
    images = class_images(labels, 10, rng)
    logits = rng.normal(0, 1, (len(labels), 10))
    logits[np.arange(len(labels)), labels] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return {"images": images, "labels": labels, "probs": probs, "preds": probs.argmax(1)}


def _history(n: int = 12) -> list[dict]:
    return [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 1 - 0.8 / e, "val_loss": 2.2 / e + 0.05,
             "val_acc": 1 - 0.9 / e, "lr": 0.1 * 0.6 ** e} for e in range(1, n + 1)]


def test_curves(tmp_path: Path) -> None:
    p = figures.plot_curves(_history(), tmp_path / "curves.png", stage_boundary=8)
    assert p == tmp_path / "curves.png"
    _check_png(p, (2.5, 5.0))  # three panels side by side
    _check_png(figures.plot_curves(_history(1), tmp_path / "one.png"))  # a single epoch still plots


def test_confusion(tmp_path: Path, data: dict) -> None:
    cm = np.zeros((10, 10), dtype=int)
    np.add.at(cm, (data["labels"], data["preds"]), 1)
    cm[3] = 0  # a class with no samples must not produce NaNs
    _check_png(figures.plot_confusion(cm.tolist(), CLASSES, tmp_path / "confusion.png"), (1.6, 3.0))


def test_image_grids(tmp_path: Path, data: dict) -> None:
    img, y, probs, preds = data["images"], data["labels"], data["probs"], data["preds"]
    _check_png(figures.plot_samples(img, y, CLASSES, tmp_path / "samples.png", per_class=4), (0.3, 1.0))
    _check_png(figures.plot_predictions(img, y, preds, probs, CLASSES, tmp_path / "predictions.png", n=16))
    _check_png(figures.plot_mistakes(img, y, probs, CLASSES, tmp_path / "mistakes.png", n=8))
    cams = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (4, 32, 1))
    _check_png(figures.plot_gradcam(img[:4], cams, y[:4], preds[:4], CLASSES, tmp_path / "gradcam.png"))


def test_no_mistakes(tmp_path: Path, data: dict) -> None:
    y = data["labels"]
    perfect = np.eye(10)[y]
    p = figures.plot_mistakes(data["images"], y, perfect, CLASSES, tmp_path / "mistakes.png")
    _check_png(p)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file behind


def test_no_mistakes_text(tmp_path: Path, data: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = figures.save_png

    def spy(fig, path):
        seen.extend(t.get_text() for t in fig.texts)
        return real(fig, path)

    monkeypatch.setattr(figures, "save_png", spy)
    figures.plot_mistakes(data["images"], data["labels"], np.eye(10)[data["labels"]], CLASSES, tmp_path / "m.png")
    assert "no mistakes" in seen


# --- Grad-CAM ---------------------------------------------------------------------------------------------------


class LeftRight(nn.Module):
    """Class 0 reads only left-half positions, class 1 only right-half ones.

    Grad-CAM weights channels by their mean gradient, so localisation must show in the hooked layer's activations:
    the last conv (1x1, two groups, positive weights) sees left-masked features in group 0 and right-masked ones
    in group 1, and each logit pools one group.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 1, groups=2, bias=False)
        with torch.no_grad():
            self.conv.weight.abs_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.features(x))
        left = torch.zeros_like(f[:1, :1])
        left[..., : f.shape[-1] // 2] = 1.0
        g = torch.relu(self.conv(torch.cat([f * left, f * (1 - left)], dim=1)))
        return torch.stack([g[:, :4].mean(dim=(1, 2, 3)), g[:, 4:].mean(dim=(1, 2, 3))], dim=1)


def test_gradcam_localises_by_class() -> None:
    torch.manual_seed(0)
    model = LeftRight()
    assert find_target_layer(model) is model.conv
    x = torch.rand(3, 3, 16, 16)
    for target, half in ((0, slice(0, 8)), (1, slice(8, 16))):
        cam = grad_cam(model, x, target=target)
        assert cam.shape == (3, 16, 16)
        mass = cam.sum(dim=(1, 2))
        assert (mass > 0).all()
        assert ((cam[:, :, half].sum(dim=(1, 2)) / mass) > 0.9).all(), target
    assert len(model.conv._forward_hooks) == 0


def test_gradcam_cnn_bn_shape_mode_and_hooks() -> None:
    torch.manual_seed(0)
    model = create_model("cnn_bn", width=8).to(memory_format=torch.channels_last)
    model.train()
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    cam = grad_cam(model, x)
    assert cam.shape == (4, 32, 32)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    assert torch.isfinite(cam).all() and cam.amax(dim=(1, 2)).max() == pytest.approx(1.0)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    layer = find_target_layer(model)
    assert len(layer._forward_hooks) == 0 and len(layer._backward_hooks) == 0


def test_gradcam_flat_map_is_zero() -> None:
    class Const(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean(dim=(2, 3)) * 0.0  # no gradient signal: the map is all zero

    cam = grad_cam(Const(), torch.rand(2, 3, 8, 8))
    assert torch.equal(cam, torch.zeros(2, 8, 8))


@pytest.mark.parametrize("name", list(MODELS))
def test_find_target_layer_every_model(name: str) -> None:
    model = create_model(name)
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):  # softmax / mlp: nothing to explain
        with pytest.raises(RecipeError, match="no Conv2d"):
            find_target_layer(model)
        return
    assert isinstance(find_target_layer(model), nn.Conv2d)


def test_get_layer() -> None:
    model = create_model("resnet18")
    assert get_layer(model, "layer4.1.conv2") is model.layer4[1].conv2
    want = r"eval.gradcam_layer: 'layer9\.conv' not found in ResNet \(conv layers: .*layer4\.1\.conv2"
    with pytest.raises(RecipeError, match=want):
        get_layer(model, "layer9.conv")
