"""timm models through `model.name = "timm:<name>"`, and `fastcifar export` to ONNX / TorchScript with its parity
check; `fastcifar predict` reads the exported files and agrees with the checkpoint."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_table
from fastcifar.cli import main
import fastcifar.predict as predict_module
from fastcifar.predict import predict
from fastcifar.recipe import recipe_to_toml, recipe_from_dict

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")


def _train(store, tmp_path, model: dict, name: str = "run", **sections) -> tuple:
    table = tiny_table(store, model=model, train={"epochs": 1}, eval={"figures": True, "tta": "flip"}, **sections)
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(recipe_to_toml(recipe_from_dict(table)))
    assert main(["train", str(recipe), "--out", str(tmp_path / name)]) == 0
    return tmp_path / name, json.loads((tmp_path / name / "result.json").read_text())


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_byobnet"])
def test_timm_models_train_a_tiny_epoch_with_figures(store, tmp_path, capsys, arch):
    run, result = _train(store, tmp_path, {"name": f"timm:{arch}", "width": 0})
    out = capsys.readouterr().out
    assert "fold 0 epoch   1/1" in out and 0.0 <= result["test_acc"] <= 1.0
    assert "figures/gradcam.png" in result["figures"]  # Grad-CAM found the model's last conv layer
    assert result["engine"]["channels_last"] is True


def test_timm_refusals_are_one_line(store, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    for model, why in (({"name": "timm:no_such_net", "width": 0}, "timm 1."), ({"name": "timm:test_vit", "width": 8},
                                                                    "model.width: timm models have a fixed width")):
        recipe.write_text(recipe_to_toml(recipe_from_dict(tiny_table(store, model=model))))
        assert main(["train", str(recipe), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1 and not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """Two trained runs (our CNN with flip TTA, a timm net) whose checkpoints the export tests share."""
    root = tmp_path_factory.mktemp("export")
    return {name: _train(store, root, model, name)[0] / "checkpoints" / "best.pt"
            for name, model in (("cnn_bn", {"name": "cnn_bn", "width": 8}),
                                ("timm", {"name": "timm:test_efficientnet", "width": 0}))}


@pytest.mark.parametrize("model", ["cnn_bn", "timm"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity_and_predict_from_the_export(trained, tmp_path, capsys, monkeypatch, model, fmt):
    ckpt = trained[model]
    out = tmp_path / f"m.{fmt}"
    assert main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    diff = float(printed.split("max |logit difference| ")[1].split()[0])
    assert "input uint8 NHWC (batch, 32, 32, 3)" in printed and "parity on 8 images" in printed and diff <= 1e-3
    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate([(32, 32), (50, 40)]):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images[-1])
    a = predict(ckpt, images, top_k=3, device_name="cpu")
    loads = []
    runner = predict_module.exported_runner
    monkeypatch.setattr(predict_module, "BATCH", 1)  # two batches: the export is still loaded once
    monkeypatch.setattr(predict_module, "exported_runner", lambda path: loads.append(path) or runner(path))
    b = predict(out, images, top_k=3, device_name="cpu")
    assert loads == [out]
    for x, y in zip(a, b):
        assert [c for c, _ in x["top"]] == [c for c, _ in y["top"]]
        assert [p for _, p in x["top"]] == pytest.approx([p for _, p in y["top"]], abs=1e-4)


def test_export_refusals_are_one_line(trained, tmp_path, capsys):
    mine = tmp_path / "model.onnx"
    mine.write_bytes(b"my own model")
    assert main(["export", str(trained["cnn_bn"]), "--out", str(mine)]) == 2
    assert "not a onnx export fastcifar wrote" in capsys.readouterr().err and mine.read_bytes() == b"my own model"
    assert main(["export", str(trained["cnn_bn"]), "--opset", "1", "--out", str(tmp_path / "old.onnx")]) == 2
    err = capsys.readouterr().err
    assert "--opset: the ONNX exporter writes opsets 18 to" in err and err.count("\n") == 1
    assert not list(tmp_path.glob(".old.onnx.*"))  # nothing half-written


def test_a_failed_parity_check_leaves_nothing_and_keeps_an_earlier_export(trained, tmp_path, capsys, monkeypatch):
    import fastcifar.export as export_module

    out = tmp_path / "m.torchscript"
    assert main(["export", str(trained["cnn_bn"]), "--format", "torchscript", "--out", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(export_module, "run_exported", lambda path, images: np.full((len(images), 10), 9.0))
    assert main(["export", str(trained["cnn_bn"]), "--format", "torchscript", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "parity check failed" in err and err.count("\n") == 1
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.torchscript"]
