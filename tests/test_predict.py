"""predict: top-k classes of image files under a checkpoint, preprocessed exactly like evaluation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcifar.augment import normalize
from fastcifar.checkpoint import save_checkpoint
from fastcifar.errors import CheckpointError, DataError
from fastcifar.models import create_model
from fastcifar.predict import predict, print_predictions
from fastcifar.recipe import CIFAR_MEAN, CIFAR_STD, recipe_from_dict

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _checkpoint(path: Path, recipe_name: str = "cnn_bn", model_name: str = "cnn_bn", width: int = 8) -> Path:
    torch.manual_seed(0)
    model = create_model(model_name, width=width)
    # A run's checkpoint records the numbers it normalised with (data.mean / data.std "auto" resolved).
    recipe = recipe_from_dict({"model": {"name": recipe_name, "width": width},
                               "data": {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}}).to_dict()
    save_checkpoint(path, {"recipe": recipe, "classes": CLASSES, "fold": 0, "model": model.state_dict(),
                           "epoch": 1, "metrics": {}, "image_size": 32})
    return path


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return _checkpoint(tmp_path / "best.pt")


@pytest.fixture
def images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for name, (w, h) in [("a.png", (32, 32)), ("b.jpg", (100, 60)), ("c.png", (100, 60)), ("d.jpeg", (32, 32))]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / name)
        out.append(tmp_path / name)
    return out


def test_topk_sorted_and_valid(ckpt, images):
    results = predict(ckpt, images, top_k=3, device_name="cpu")
    assert [r["image"] for r in results] == [str(p) for p in images]
    for r in results:
        probs = [p for _, p in r["top"]]
        assert len(r["top"]) == 3
        assert all(c in CLASSES for c, _ in r["top"])
        assert len({c for c, _ in r["top"]}) == 3
        assert probs == sorted(probs, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-6


def test_top_k_larger_than_classes_gives_all(ckpt, images):
    (r,) = predict(ckpt, images[:1], top_k=50, device_name="cpu")
    assert sorted(c for c, _ in r["top"]) == sorted(CLASSES)
    assert sum(p for _, p in r["top"]) == pytest.approx(1.0, abs=1e-5)


def test_matches_manual_forward_pass(ckpt, images):
    results = predict(ckpt, images, top_k=10, device_name="cpu")
    assert predict(ckpt, images, top_k=10, device_name="cpu") == results  # deterministic
    torch.manual_seed(0)
    model = create_model("cnn_bn", width=8)  # same seed -> same weights as the saved checkpoint
    model.eval()
    mean, std = CIFAR_MEAN, CIFAR_STD
    for path, r in zip(images, results):
        # shorter side to 32, centre crop: the centred min(W, H) square resampled (PIL reads the filter's reach
        # around the box, as resizing the whole image and cropping would), never the whole image squashed
        im = Image.open(path).convert("RGB")
        side = min(im.size)
        x0, y0 = (im.size[0] - side) / 2, (im.size[1] - side) / 2
        im = im.resize((32, 32), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            probs = torch.softmax(model(normalize(x, mean, std)), 1)[0]
        expected = {CLASSES[i]: float(p) for i, p in enumerate(probs)}
        for name, p in r["top"]:
            assert p == pytest.approx(expected[name], abs=1e-5)
        assert r["top"][0][0] == CLASSES[int(probs.argmax())]


def test_text_file_named_png_is_refused_before_output(ckpt, images, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    with pytest.raises(DataError, match="notes.png") as e:
        predict(ckpt, [images[0], bad], device_name="cpu")
    assert "\n" not in str(e.value)


def test_missing_image(ckpt, tmp_path):
    with pytest.raises(DataError, match="nope.png"):
        predict(ckpt, [tmp_path / "nope.png"], device_name="cpu")


def test_checkpoint_of_another_model(tmp_path, images):
    # The recipe says resnet9 but the weights are a cnn_bn's: the state dict does not fit.
    path = _checkpoint(tmp_path / "other.pt", recipe_name="resnet9", width=8)
    with pytest.raises(CheckpointError, match="other.pt") as e:
        predict(path, images, device_name="cpu")
    assert "\n" not in str(e.value)


def test_corrupt_and_foreign_checkpoints(tmp_path, images):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="junk.pt"):
        predict(junk, images, device_name="cpu")
    no_recipe = tmp_path / "norecipe.pt"
    save_checkpoint(no_recipe, {"classes": CLASSES, "model": {}})
    with pytest.raises(CheckpointError, match="norecipe.pt"):
        predict(no_recipe, images, device_name="cpu")
    bad_model = tmp_path / "badmodel.pt"
    save_checkpoint(bad_model, {"recipe": {"model": {"name": "vgg99"}}, "classes": CLASSES, "model": {}})
    with pytest.raises(CheckpointError, match="badmodel.pt"):
        predict(bad_model, images, device_name="cpu")


def test_print_predictions(ckpt, images):
    from rich.console import Console

    console = Console(record=True, width=200)
    print_predictions(predict(ckpt, images, top_k=2, device_name="cpu"), console)
    text = console.export_text()
    assert "#1" in text and "#2" in text and "b.jpg" in text and "%" in text


def test_predict_applies_the_recipes_tta(tiny, store, tmp_path):
    # eval.tta = "flip": the probabilities are the softmax of the mean logits of the image and its mirror.
    from fastcifar.engine import tta_logits
    from fastcifar.evaluate import load_trained_model
    from rich.console import Console

    from fastcifar.predict import preprocess, read_image
    from fastcifar.run import run_training

    run_training(tiny(train={"epochs": 1}, eval={"tta": "flip"}), tmp_path / "r", Console(quiet=True))
    ckpt = tmp_path / "r" / "checkpoints" / "best.pt"
    png = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png)
    got = predict(ckpt, [png], top_k=1, device_name="cpu")[0]["top"][0]
    model, recipe, classes, size = load_trained_model(ckpt, torch.device("cpu"))
    with torch.no_grad():
        x = preprocess(read_image(png, size)[None], recipe)
        mean_logits = (model(x) + model(x.flip(-1))) / 2
        want = torch.softmax(mean_logits, 1)[0]
    assert torch.allclose(torch.softmax(tta_logits(model, x, "flip"), 1)[0], want, atol=1e-6)
    assert got[0] == classes[int(want.argmax())] and abs(got[1] - float(want.max())) < 1e-5


def test_a_folder_gives_its_images_in_path_order(ckpt, images, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "z.png").write_bytes(images[0].read_bytes())
    (folder / "b.JPG").write_bytes(images[1].read_bytes())
    (folder / "notes.txt").write_text("not an image\n")  # skipped, as prepare skips non-image members
    by_folder = predict(ckpt, [folder, images[3]], device_name="cpu")
    assert [r["image"] for r in by_folder] == [str(folder / "b.JPG"), str(folder / "sub" / "z.png"), str(images[3])]
    by_file = predict(ckpt, [images[1], images[0], images[3]], device_name="cpu")
    assert [r["top"] for r in by_folder] == [r["top"] for r in by_file]


def test_a_folder_without_images_is_one_line(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x\n")
    with pytest.raises(DataError, match=r"empty: folder holds no image files \(\.png, \.jpg, \.jpeg\)"):
        predict(ckpt, [tmp_path / "empty"], device_name="cpu")
