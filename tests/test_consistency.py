"""A number is never computed on data it does not describe: resumes and evaluations on other data are refused,
16-bit and transparent images are converted faithfully, and an archive member that appears twice is refused."""

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from conftest import tiny_table
from fastcifar.cli import main
from fastcifar.data import open_store, prepare_store
from fastcifar.errors import DataError
from fastcifar.recipe import recipe_from_dict, recipe_to_toml
from fastcifar.run import run_training
from synth import make_image_folder, make_store, png16

QUIET = Console(quiet=True)


def quiet(*_):
    pass


def _train(store, run, **sections):
    table = tiny_table(store, train={"epochs": 1, "batch_size": 8}, data={"train_subset": 4},
                       model={"name": "cnn_bn", "width": 4})
    for k, v in sections.items():
        table[k] = {**table.get(k, {}), **v}
    return run_training(recipe_from_dict(table), run, QUIET)


def _files(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change", ["classes", "content", "size"])
def test_resume_on_a_re_prepared_store_is_refused_naming_both_sides(tmp_path, change):
    store = make_store(tmp_path / "store", 8, 2, num_classes=3)
    run = tmp_path / "run"
    _train(store, run, train={"epochs": 2})
    (run / "result.json").unlink()  # as if stopped before the end: a resume would train on
    kept = _files(run)
    if change == "classes":
        make_store(store, 8, 2, num_classes=4)
    elif change == "content":
        make_store(store, 8, 2, num_classes=3, seed=7)
    else:
        src = tmp_path / "src16"
        make_image_folder(src, 8, 2, "png", classes=("class00", "class01", "class02"), size=16)
        prepare_store(src, store, force=True, log=quiet)
    table = tiny_table(store, train={"epochs": 2, "batch_size": 8}, data={"train_subset": 4},
                       model={"name": "cnn_bn", "width": 4})
    with pytest.raises(DataError) as e:
        run_training(recipe_from_dict(table), run, QUIET, resume=True)
    msg = str(e.value)
    assert msg.startswith(f"data.store: {store} holds ") and f"but {run} was trained on" in msg and "\n" not in msg
    want = {"classes": ("4 classes", "3 classes"), "content": ("_images.npy with sha256",) * 2,
            "size": ("16x16x3 images", "32x32x3 images")}[change]
    assert msg.index(want[0]) < msg.index("trained on") < msg.rindex(want[1])
    assert _files(run) == kept  # refused before anything in the run changed


def test_a_run_from_before_data_json_is_checked_by_its_env_json(tmp_path):
    store = make_store(tmp_path / "store", 8, 2, num_classes=3)
    run = tmp_path / "run"
    _train(store, run, train={"epochs": 2})
    (run / "data.json").unlink()
    (run / ".fastcifar-run").unlink()  # a legacy run: recipe.toml + env.json only
    make_store(store, 8, 2, num_classes=3, seed=7)
    table = tiny_table(store, train={"epochs": 2, "batch_size": 8}, data={"train_subset": 4},
                       model={"name": "cnn_bn", "width": 4})
    with pytest.raises(DataError, match="_images.npy with sha256"):
        run_training(recipe_from_dict(table), run, QUIET, resume=True)


@pytest.mark.parametrize("file, damage, line", [
    ("fold0/result.json", {"val_acc": "0.9"}, "fold0/result.json: val_acc is '0.9', expected a number; delete "
                                              "the file and resume to evaluate fold 0 again"),
    ("fold1/result.json", {"fold": 0}, "fold1/result.json: fold is 0, expected 1;"),
    ("fold0/result.json", {"train_time_s": None}, "fold0/result.json: train_time_s is None, expected a number"),
    ("fold0/result.json", {"test_acc": 3.5}, "fold0/result.json: test_acc is 3.5, expected an accuracy in [0, 1]"),
    ("data.json", {"classes": 5}, "data.json: classes is 5, expected a list of str"),
    ("data.json", {"sha256": ["x"]}, "data.json: sha256 is ['x'], expected a dict of str"),
])
def test_a_resume_reads_its_own_files_as_untrusted(store, tmp_path, capsys, file, damage, line):
    """Finished folds' result.json and data.json are read back on --resume: a value of the wrong type is one
    line naming the file and key (it raised ValueError / TypeError in the fold table or the data check)."""
    run, recipe = tmp_path / "run", tmp_path / "r.toml"
    table = tiny_table(store, train={"epochs": 1, "batch_size": 8}, data={"train_subset": 4},
                       model={"name": "cnn_bn", "width": 4}, split={"kind": "kfold", "k": 2})
    recipe.write_text(recipe_to_toml(recipe_from_dict(table)))
    run_training(recipe_from_dict(table), run, QUIET)
    obj = json.loads((run / file).read_text())
    (run / file).write_text(json.dumps({**obj, **damage}))
    assert main(["train", str(recipe), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastcifar: error: {run}/{line}") and err.count("\n") == 1, err


def test_eval_on_a_store_of_another_image_size_is_refused(store, tmp_path, capsys):
    _train(store, tmp_path / "run")
    src = tmp_path / "src16"
    classes = tuple(json.loads((store / "meta.json").read_text())["classes"])
    make_image_folder(src, 1, 1, "png", classes=classes, size=16)
    prepare_store(src, tmp_path / "small", log=quiet)
    assert main(["eval", str(tmp_path / "run" / "checkpoints" / "best.pt"), "--data", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert "trained on 32x32 images, but" in err and "holds 16x16 images" in err and "accuracy" not in err


# --- conversion ----------------------------------------------------------------------------------------------------


def _folder(tmp_path, images: dict[str, bytes]):
    """train/ and test/ with classes a, b; `images` maps a relative path to its bytes, the rest is filler."""
    filler = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(filler, format="PNG")
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "src" / split / c).mkdir(parents=True, exist_ok=True)
            (tmp_path / "src" / split / c / "z.png").write_bytes(filler.getvalue())
    for rel, data in images.items():
        (tmp_path / "src" / rel).write_bytes(data)
    return tmp_path / "src"


def _big(a: np.ndarray) -> np.ndarray:
    """A 2x2 pattern as an 8x8 image (prepare refuses images under 8x8): each value a 4x4 block."""
    return a.repeat(4, axis=0).repeat(4, axis=1)


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    grey = _big(np.array([[0, 257], [32896, 65535]], np.uint16))
    rgb = np.zeros((8, 8, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 257 * 100, 0
    src = _folder(tmp_path, {"train/a/g.png": png16(grey), "train/a/rgb.png": png16(rgb)})
    prepare_store(src, tmp_path / "store", log=quiet)
    images = open_store(tmp_path / "store").train_images  # train/a: g.png, rgb.png, z.png
    assert images[0][::4, ::4, 0].tolist() == [[0, 1], [128, 255]]  # PIL's convert("RGB") clips 257 up to 255
    assert (images[0][..., 0] == images[0][..., 2]).all()
    assert images[1][0, 0].tolist() == [255, 100, 0]  # PIL's own convert("RGB") would give 255 for 257


def test_transparency_is_composited_onto_black_and_said(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (200, 100, 50), _big(np.array([[255, 128], [0, 255]], np.uint8))
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    opaque = rgba.copy()
    opaque[..., 3] = 255
    buf2 = io.BytesIO()
    Image.fromarray(opaque).save(buf2, format="PNG")
    src = _folder(tmp_path, {"train/a/t.png": buf.getvalue(), "train/a/o.png": buf2.getvalue()})
    logs: list[str] = []
    prepare_store(src, tmp_path / "store", log=logs.append)
    images = open_store(tmp_path / "store").train_images  # train/a: o.png, t.png, z.png
    assert (images[0] == [200, 100, 50]).all()  # fully opaque: unchanged
    assert images[1][::4, ::4].tolist() == [[[200, 100, 50], [100, 50, 25]], [[0, 0, 0], [200, 100, 50]]]
    assert any(line.startswith("1 images had transparency and were composited onto black") and "t.png" in line
               for line in logs)


def _tar_with_duplicate(path):
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    with tarfile.open(path, "w:gz") as tf:
        for name in ("train/a/1.png", "train/b/1.png", "test/a/1.png", "test/b/1.png", "train/a/1.png"):
            info = tarfile.TarInfo(name)
            info.size = len(png.getvalue())
            tf.addfile(info, io.BytesIO(png.getvalue()))


def test_a_member_that_appears_twice_is_refused(tmp_path):
    _tar_with_duplicate(tmp_path / "dup.tar.gz")
    with pytest.raises(DataError, match=r"dup.tar.gz: member 'train/a/1.png' appears twice"):
        prepare_store(tmp_path / "dup.tar.gz", tmp_path / "store", log=quiet)
    with zipfile.ZipFile(tmp_path / "dup.zip", "w") as zf:  # "./x" and "x" are one file once normalised
        for name in ("train/a/1.png", "test/a/1.png", "./train/a/1.png"):
            zf.writestr(name, b"x")
    with pytest.raises(DataError, match=r"dup.zip: member 'train/a/1.png' appears twice"):
        prepare_store(tmp_path / "dup.zip", tmp_path / "store", log=quiet)
    assert not (tmp_path / "store").exists()
