"""Data in and out, under hostile or odd input (issue 23): one preprocessing for an image file; sources whose
shapes, classes or names would train or score nonsense; pickles of other protocols; absurd checkpoint and export
fields; full disks and SIGTERM while writing. Each case is one line on stderr, a non-zero exit, nothing left."""

import errno
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcifar.checkpoint import load_checkpoint, save_checkpoint
from fastcifar.cli import MAX_ERROR, main
from fastcifar.data import open_store
from fastcifar.data.images import PREPROCESS
from fastcifar.models import create_model
from fastcifar.predict import predict
from fastcifar.recipe import recipe_from_dict
from synth import dumps_batch, make_archive, make_image_folder, write_cifar100, write_cifar_batches
from test_faults import small_disk  # noqa: F401 - the fixture: a real 8 MiB tmpfs (root only)

CLI = [sys.executable, "-m", "fastcifar"]


def one_line(capsys, code: int = 2) -> str:
    """The last command exited `code` with one short 'fastcifar: error:' line and no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastcifar: error: ") and "\n" not in err and len(err) < MAX_ERROR + 40, err
    assert "Traceback" not in err
    return err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


# --- 2.1: one preprocessing for an image file (prepare --size, predict, the export) -------------------------------


def _wide(path: Path, centre: int) -> None:
    """A 96 x 32 PNG: the centre 32 x 32 in colour channel `centre` (0 red, 2 blue), the sides in the other."""
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, :, 2 - centre] = 200
    arr[:, 32:64] = 0
    arr[:, 32:64, centre] = 200
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _colour_checkpoint(path: Path, store: Path) -> Path:
    """softmax regression that answers by colour: class a by the mean red, class b by the mean blue."""
    model = create_model("softmax", num_classes=2, image_size=32)
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
        model[2].weight.view(2, 3, 32 * 32)[0, 0] = 1 / 1024  # logical NCHW flattening: channel-major
        model[2].weight.view(2, 3, 32 * 32)[1, 2] = 1 / 1024
    recipe = recipe_from_dict({"model": {"name": "softmax"}, "augment": {"flip": False, "crop_padding": 0},
                               "data": {"store": str(store), "mean": [0.5] * 3, "std": [0.5] * 3}}).to_dict()
    save_checkpoint(path, {"recipe": recipe, "classes": ["a", "b"], "fold": 0, "model": model.state_dict(),
                           "epoch": 1, "metrics": {}, "image_size": 32, "preprocess": PREPROCESS})
    return path


def test_predict_and_the_export_see_a_file_as_prepare_stored_it(tmp_path, capsys):
    # Class a: red in the middle third, blue at the sides; b the other way round. prepare --size 32 keeps the
    # middle (shorter side, centre crop); squashing the whole 96 x 32 image shows mostly the other colour.
    src = tmp_path / "src"
    for split in ("train", "test"):
        for i in range(2):
            _wide(src / split / "a" / f"{i}.png", centre=0)
            _wide(src / split / "b" / f"{i}.png", centre=2)
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "store"), "--size", "32"]) == 0
    assert open_store(tmp_path / "store").meta["preprocess"] == PREPROCESS
    ckpt = _colour_checkpoint(tmp_path / "best.pt", tmp_path / "store")
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "store")]) == 0
    assert "test accuracy 100.00%" in " ".join(capsys.readouterr().out.split())
    files = sorted((src / "test").rglob("*.png"))
    assert [r["top"][0][0] for r in predict(ckpt, files, top_k=1, device_name="cpu")] == ["a", "a", "b", "b"]
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.torchscript.pt")]) == 0
    exported = predict(tmp_path / "m.torchscript.pt", files, top_k=1, device_name="cpu")
    assert [r["top"][0][0] for r in exported] == ["a", "a", "b", "b"]
    with zipfile.ZipFile(tmp_path / "m.torchscript.pt") as zf:
        meta = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith("extra/fastcifar.json"))))
    assert meta["preprocess"] == PREPROCESS and "centre crop to 32x32" in meta["image_files"]


def test_a_run_records_the_preprocessing_in_its_checkpoints(tiny, tmp_path):
    from rich.console import Console

    from fastcifar.run import run_training

    run_training(tiny(train={"epochs": 1}), tmp_path / "r", Console(quiet=True))
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(tmp_path / "r" / "checkpoints" / name)["preprocess"] == PREPROCESS


# --- 2.2 / 2.3 / 5.2e: what every kind of source must satisfy --------------------------------------------------


def _svhn(folder: Path, shapes: dict[str, tuple[int, int]], digits: dict[str, np.ndarray] | None = None) -> Path:
    import scipy.io

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in shapes.items():
        d = (digits or {}).get(name, np.arange(20) % 10)
        x = rng.integers(0, 256, (h, w, 3, len(d)), dtype=np.uint8)
        scipy.io.savemat(folder / f"{name}_32x32.mat", {"X": x, "y": np.where(d == 0, 10, d).reshape(-1, 1)})
    return folder


@pytest.mark.parametrize("shapes, extra, expect", [
    ({"train": (32, 40), "test": (32, 40)}, False, "train_32x32.mat: images are 40x32, not square"),
    ({"train": (32, 32), "test": (40, 40)}, False, "test_32x32.mat: test images are 40x40 but"),
    ({"train": (32, 32), "test": (32, 32), "extra": (40, 40)}, True,
     "extra_32x32.mat: X holds 40x40 images but"),
], ids=["non-square", "train-vs-test", "extra"])
def test_svhn_of_odd_shapes_is_refused_at_prepare(tmp_path, capsys, shapes, extra, expect):
    src = _svhn(tmp_path / "svhn", shapes)
    args = ["prepare", "--source", str(src), "--out", str(tmp_path / "store")] + (["--extra"] if extra else [])
    assert main(args) == 2
    assert expect in one_line(capsys)
    assert not (tmp_path / "store").exists() and not leftovers(tmp_path)


def _cifar100_with_fine_labels(folder: Path, used: int) -> Path:
    """write_cifar100's 6 fine classes, but every image labelled with one of the first `used`."""
    write_cifar100(folder, n_per_class=2)
    for split in ("train", "test"):
        batch = pickle.loads((folder / split).read_bytes(), encoding="bytes")
        batch[b"fine_labels"] = [v % used for v in batch[b"fine_labels"]]
        (folder / split).write_bytes(dumps_batch(batch))
    return folder


@pytest.mark.parametrize("kind", ["cifar100", "svhn-one-digit", "cifar10-train"])
def test_a_class_without_images_is_refused_for_every_kind_of_source(tmp_path, capsys, kind):
    if kind == "cifar100":  # 3 of the 6 classes used: a report would show three at 0.00 %
        src, expect = _cifar100_with_fine_labels(tmp_path / "c100", used=3), "c100/train: class 'fine03' (and 2 more"
    elif kind == "svhn-one-digit":  # every label the digit 1: it would score 100 %
        src = _svhn(tmp_path / "svhn", {"train": (32, 32), "test": (32, 32)},
                    {"train": np.ones(20, np.int64), "test": np.ones(20, np.int64)})
        expect = "train_32x32.mat: class '0' (and 8 more of the 10) has no train images"
    else:  # CIFAR-10 batches where no training image is a truck (the test batch has trucks)
        expected = write_cifar_batches(tmp_path / "c10", 1)
        for i in range(1, 6):
            batch = pickle.loads((tmp_path / "c10" / f"data_batch_{i}").read_bytes(), encoding="bytes")
            batch[b"labels"] = [v if v != 9 else 8 for v in batch[b"labels"]]
            (tmp_path / "c10" / f"data_batch_{i}").write_bytes(dumps_batch(batch))
        src, expect = tmp_path / "c10", "data_batch_1 to 5: class 'truck' has no train images"
        assert len(expected["classes"]) == 10
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "store")]) == 2
    assert expect in one_line(capsys)
    assert not (tmp_path / "store").exists()


NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


@pytest.mark.parametrize("names", [(NFC, NFD), ("cat", "cat "), ("dog", " dog")],
                         ids=["nfc-nfd", "trailing", "leading"])
@pytest.mark.parametrize("kind", ["folder", "zip", "pickle"])
def test_class_names_that_print_alike_are_refused_for_every_kind_of_source(tmp_path, capsys, names, kind):
    if kind == "pickle":
        write_cifar_batches(tmp_path / "src", 1, classes=("a", "b", names[0], "c", names[1], "d", "e", "f", "g", "h"))
        src = tmp_path / "src"
    else:
        make_image_folder(tmp_path / "src", 1, 1, classes=("x", *names))
        src = tmp_path / "src" if kind == "folder" else make_archive(tmp_path / "src", tmp_path / "src.zip")
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "store")]) == 2
    err = one_line(capsys)
    assert "print the same" in err and ascii(names[0]) in err and ascii(names[1]) in err
    assert not (tmp_path / "store").exists()


def test_a_train_class_and_its_nfd_twin_in_test_are_named_as_such(tmp_path, capsys):
    make_image_folder(tmp_path / "src", 1, 1, classes=("x", NFC))
    (tmp_path / "src" / "test" / NFC).rename(tmp_path / "src" / "test" / NFD)
    assert main(["prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "store")]) == 2
    assert "print the same" in one_line(capsys)


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_a_class_folder_whose_name_is_not_utf8_is_one_line(tmp_path, capsys, kind):
    make_image_folder(tmp_path / "src", 1, 1, classes=("a", "b"))
    for split in ("train", "test"):  # b"b\xff": Python names it 'b\udcff', which cannot be encoded back to UTF-8
        os.rename(os.fsencode(tmp_path / "src" / split / "b"), os.fsencode(tmp_path / "src" / split) + b"/b\xff")
    src = tmp_path / "src" if kind == "folder" else make_archive(tmp_path / "src", tmp_path / "src.tar")
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "store")]) == 2  # was a raw traceback
    assert "class name 'b\\udcff' is not valid UTF-8; rename it" in one_line(capsys)


# --- 5.1 / 5.2d: CIFAR pickles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2])
def test_cifar_pickles_of_python3_protocols_0_to_2_are_read(tmp_path, capsys, protocol):
    # numpy arrays pickled by Python 3 below protocol 3 hold their bytes as _codecs.encode(text, "latin1")
    expected = write_cifar_batches(tmp_path / "c10", 2, protocol=protocol)
    assert b"_codecs\nencode" in (tmp_path / "c10" / "data_batch_1").read_bytes()
    assert main(["prepare", "--source", str(tmp_path / "c10"), "--out", str(tmp_path / "store")]) == 0
    store = open_store(tmp_path / "store", verify=True)
    np.testing.assert_array_equal(store.train_images, expected["train_images"])
    np.testing.assert_array_equal(store.test_labels, expected["test_labels"])


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload, call", [
    (_Reduce(__import__("codecs").encode, ("text", "rot13")), "encode(str, str)"),
    (_Reduce(__import__("codecs").encode, (b"\x00", "hex")), "encode(bytes, str)"),
    (_Reduce(bytes, (10**12,)), "bytes(int)"),
], ids=["rot13", "bytes-arg", "huge-bytes"])
def test_codecs_encode_is_admitted_only_as_latin1_text(tmp_path, capsys, payload, call):
    write_cifar_batches(tmp_path / "c10", 1, overrides={"data_batch_2": pickle.dumps({b"data": payload}, protocol=2)})
    assert main(["prepare", "--source", str(tmp_path / "c10"), "--out", str(tmp_path / "store")]) == 2
    assert f"data_batch_2: refusing pickle call {call}" in one_line(capsys)


@pytest.mark.parametrize("batch, expect", [
    ({b"data": np.zeros((2, 3072), np.uint8), b"coarse_labels": [0, 1]}, "train: no 'fine_labels' key"),
    ({b"data": np.zeros((0, 3072), np.uint8), b"fine_labels": []}, "train: holds no images ('data' is (0, 3072))"),
    ({b"fine_labels": [0]}, "train: no 'data' key"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1.5]},
     "'fine_labels' must be a list of 2 ints (one per row of 'data'), got a list of 2 items (one a float)"),
], ids=["missing-labels", "empty", "missing-data", "float-label"])
def test_a_cifar100_batch_without_its_keys_is_named(tmp_path, capsys, batch, expect):
    write_cifar100(tmp_path / "c100", overrides={"train": dumps_batch(batch)})
    assert main(["prepare", "--source", str(tmp_path / "c100"), "--out", str(tmp_path / "store")]) == 2
    err = one_line(capsys)
    assert expect in err and "float64" not in err


# --- 3.3: absurd fields in a checkpoint or an export ---------------------------------------------------------------


def _checkpoint(path: Path, **fields) -> Path:
    torch.manual_seed(0)
    model = create_model("cnn_bn", width=8)
    recipe = recipe_from_dict({"model": {"name": "cnn_bn", "width": 8},
                               "data": {"mean": [0.5] * 3, "std": [0.5] * 3}}).to_dict()
    payload = {"recipe": recipe, "classes": [f"c{i}" for i in range(10)], "fold": 0, "model": model.state_dict(),
               "epoch": 1, "metrics": {}, "image_size": 32}
    save_checkpoint(path, {**payload, **fields})
    return path


@pytest.mark.parametrize("fields, expect", [
    ({"image_size": 100000}, "image_size: must be an integer in [8, 1024], got 100000"),
    ({"image_size": 3}, "image_size: must be an integer in [8, 1024], got 3"),
    ({"image_size": -5}, "image_size: must be an integer in [8, 1024], got -5"),
    ({"image_size": 32.5}, "image_size: must be an integer in [8, 1024], got 32.5"),
    ({"classes": "airplane"}, "classes: must be a list of 2 to 100,000 class names, got 'airplane'"),
    ({"classes": [1, 2]}, "classes: must hold class names as strings"),
    ({"classes": ["a"] * 10}, "classes: holds a class name twice"),
    ({"preprocess": "squash"}, "preprocess: must be 'shorter-side-centre-crop-bicubic'"),
    ({"fold": -1}, "fold: must be an integer in [0, 1000], got -1"),
    ({"model": {"w": [1.0]}}, "model: must map parameter names to tensors"),
], ids=["huge", "tiny", "negative", "float", "str-classes", "int-classes", "dup-classes", "preprocess", "fold",
        "weights"])
@pytest.mark.parametrize("command", ["predict", "export", "eval"])
def test_absurd_checkpoint_fields_are_one_line_naming_the_field(tmp_path, capsys, fields, expect, command):
    ckpt = _checkpoint(tmp_path / "best.pt", **fields)
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    args = {"predict": [str(png)], "export": ["--format", "torchscript"], "eval": ["--data", str(tmp_path)]}[command]
    assert main([command, str(ckpt), *args]) == 2
    assert f"best.pt: {expect}" in one_line(capsys)
    assert not leftovers(tmp_path)


def test_a_recipe_that_does_not_fit_the_weights_is_refused_before_building(tmp_path, capsys):
    # width 4096 would build a 25 GB cnn_bn before load_state_dict could say the weights are a width-8 one's
    ckpt = _checkpoint(tmp_path / "best.pt")
    payload = load_checkpoint(ckpt)
    payload["recipe"]["model"]["width"] = 4096
    save_checkpoint(ckpt, {k: v for k, v in payload.items() if k not in ("format", "version")})
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    assert main(["predict", str(ckpt), str(tmp_path / "x.png")]) == 2
    assert "weights do not fit cnn_bn with 10 classes at 32x32" in one_line(capsys)


@pytest.mark.parametrize("field, value, expect", [
    ("epoch", -5, "last.pt: state.epoch: must be an integer in [0, 1000000], got -5"),
    ("accum_steps", 0, "last.pt: state.accum_steps: must be an integer in [1, 1048576], got 0"),
    ("best_metric", float("nan"), "last.pt: state.best_metric: must be a finite number"),
])
def test_absurd_progress_in_last_pt_is_refused_on_resume(tiny, tmp_path, capsys, field, value, expect):
    from rich.console import Console

    from fastcifar.run import run_training

    run = tmp_path / "r"
    run_training(tiny(train={"epochs": 1}), run, Console(quiet=True))
    (run / "result.json").unlink()  # as if stopped before the fold's result: --resume reads last.pt
    last = run / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    payload["state"][field] = value
    save_checkpoint(last, {k: v for k, v in payload.items() if k not in ("format", "version")})
    assert main(["train", str(run / "recipe.toml"), "--out", str(run), "--resume"]) == 2
    assert expect in one_line(capsys)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated upstream; the test only needs a file
@pytest.mark.parametrize("meta, expect", [
    ({"classes": ["a", "b"], "image_size": 100000}, "image_size: must be an integer in [8, 1024], got 100000"),
    ({"classes": "ab", "image_size": 32}, "classes: must be a list of 2 to 100,000 class names"),
    ({"classes": ["a", "b"]}, "image_size: missing from its fastcifar metadata"),
], ids=["huge", "classes", "missing"])
def test_absurd_export_metadata_is_one_line(tmp_path, capsys, meta, expect):
    path = tmp_path / "m.torchscript.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path),
                   _extra_files={"fastcifar.json": json.dumps({"format": "fastcifar-export", "version": 1, **meta})})
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    assert main(["predict", str(path), str(png)]) == 2
    assert f"m.torchscript.pt: {expect}" in one_line(capsys)


# --- 3.4b / 5.2c / 5.2a: full disks and SIGTERM while writing -------------------------------------------------------


@pytest.fixture
def exportable(tmp_path) -> Path:
    return _checkpoint(tmp_path / "best.pt", preprocess=PREPROCESS)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_onto_a_full_disk_is_the_disk_full_line(exportable, tmp_path, capsys, monkeypatch, fmt):
    real = pathlib.Path.write_bytes

    def full(self, data):  # the export's temp file: the disk is full
        if self.name.startswith(".m."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    out = tmp_path / "out" / "m.x"
    assert main(["export", str(exportable), "--format", fmt, "--out", str(out)]) == 2
    assert one_line(capsys).endswith("m.x: disk full while writing (No space left on device); nothing was written, "
                                     "free some space and export again")
    assert not out.exists() and not leftovers(tmp_path / "out")


def _fill(disk: Path, leave: int = 0) -> None:
    """Fill a tmpfs up to `leave` bytes of free space."""
    with open(disk / "filler", "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    if leave:
        os.truncate(disk / "filler", os.path.getsize(disk / "filler") - leave)


def test_torchscript_export_onto_a_really_full_disk(exportable, small_disk, tmp_path):
    _fill(small_disk)
    out = small_disk / "m.torchscript.pt"
    proc = subprocess.run(CLI + ["export", str(exportable), "--format", "torchscript", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-300:]  # was 134: torch.jit.save's C++ abort
    assert proc.stderr.strip().endswith("disk full while writing (No space left on device); nothing was written, "
                                        "free some space and export again") and proc.stderr.count("\n") == 1
    assert not leftovers(small_disk) and not out.exists()


def test_prepare_onto_a_really_full_disk_names_the_file(small_disk, tmp_path, capsys):
    make_image_folder(tmp_path / "src", 20, 4)  # 240 images: 737 KB of arrays, more than is left
    _fill(small_disk, leave=256 * 1024)
    assert main(["prepare", "--source", str(tmp_path / "src"), "--out", str(small_disk / "store")]) == 2
    err = one_line(capsys)
    assert "_images.npy: disk full while writing the new store; its temp folder is removed" in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_full_disk_during_prepare_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import fastcifar.data.store as store_module

    make_image_folder(tmp_path / "src", 2, 1)
    real = np.save

    def full(file, arr, **kw):
        if arr.ndim == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, arr, **kw)

    monkeypatch.setattr(store_module.np, "save", full)
    assert main(["prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out" / "store")]) == 2
    assert "train_images.npy: disk full while writing the new store" in one_line(capsys)
    assert not (tmp_path / "out").exists()  # not even the folder prepare made to hold the store


STOP_EXPORT = """
import os, signal, sys
import fastcifar.export as export
from fastcifar.cli import main
real = export._torchscript
def stopped(deployed, images, path, meta, opset):
    real(deployed, images, path, meta, opset)  # the temp file is written: now the stop arrives
    os.kill(os.getpid(), signal.SIGTERM)
export._torchscript = stopped
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_export_is_one_line_and_removes_the_temp_file(exportable, tmp_path):
    out = tmp_path / "out" / "m.torchscript.pt"
    proc = subprocess.run([sys.executable, "-c", STOP_EXPORT, "export", str(exportable), "--format", "torchscript",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-300:])
    assert proc.stderr == "fastcifar: error: export stopped by SIGTERM; nothing was written (temp files removed)\n"
    assert not out.exists() and not leftovers(tmp_path / "out")


def test_a_download_onto_a_full_disk_says_so(small_disk, tmp_path, capsys, monkeypatch):
    remote = tmp_path / "remote.tar.gz"
    remote.write_bytes(os.urandom(512 * 1024))
    monkeypatch.delenv("FASTCIFAR_SOURCE", raising=False)
    monkeypatch.setenv("FASTCIFAR_URL", remote.as_uri())
    _fill(small_disk, leave=64 * 1024)
    cache = small_disk / "cache"
    assert main(["prepare", "--cache", str(cache), "--out", str(tmp_path / "store")]) == 2
    err = one_line(capsys)  # was "no data source: downloading ... failed ([Errno 28] ...); pass --source PATH"
    assert "cifar-10-python.tar.gz: disk full while downloading" in err and "partial file is removed" in err
    assert not cache.exists()  # the cache folder prepare made for the download is removed with the partial file


@pytest.mark.parametrize("change", [{"counts": None}, {"counts": {"train": "x", "test": []}},
                                    {"counts": {"train": 1, "test": 1}}, {"preprocess": "squash"}],
                         ids=["missing", "types", "wrong", "preprocess"])
def test_store_metadata_that_prepare_would_print_is_checked(store, tmp_path, capsys, change):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta.update(change)
    if change.get("counts", 0) is None:
        del meta["counts"]
    (copy / "meta.json").write_text(json.dumps(meta))
    assert main(["prepare", "--verify", str(copy)]) == 2  # was a KeyError, or "ok (x train, [] test images ...)"
    assert "meta.json: bad store metadata" in one_line(capsys)
