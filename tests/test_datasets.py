"""Beyond CIFAR-10: CIFAR-100 (fine and coarse), SVHN .mat files, image folders of mixed sizes, and the store's own
normalisation statistics; each official format built synthetically with the publisher's keys and layout."""

import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastcifar.cli import main
from fastcifar.data import ReadOptions, open_store, prepare_store
from fastcifar.data.matfile import read_mat
from fastcifar.errors import DataError
from fastcifar.recipe import load_recipe
from synth import make_archive, make_image_folder, write_cifar100, write_svhn

RECIPES = Path(__file__).parent.parent / "recipes"


def quiet(*_):
    pass


def _labels(store, split):
    return np.asarray(getattr(store, f"{split}_labels"))


# --- CIFAR-100 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_cifar100_archive_round_trip(tmp_path, labels):
    expected = write_cifar100(tmp_path / "src" / "cifar-100-python", n_per_class=3)
    make_archive(tmp_path / "src", tmp_path / "cifar-100-python.tar.gz")
    meta = prepare_store(tmp_path / "cifar-100-python.tar.gz", tmp_path / "store", log=quiet,
                         options=ReadOptions(labels=labels))
    store = open_store(tmp_path / "store", verify=True)
    assert meta["source"]["kind"] == "cifar100-python" and list(store.classes) == expected[f"{labels}_classes"]
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(store, f"{split}_images"), expected[f"{split}_images"])
        np.testing.assert_array_equal(_labels(store, split), expected[f"{split}_{labels}"])


def test_cifar100_options_are_part_of_the_store(tmp_path):
    write_cifar100(tmp_path / "c100")
    prepare_store(tmp_path / "c100", tmp_path / "store", log=quiet)
    with pytest.raises(DataError, match="store of other prepare options .* pass --force"):
        prepare_store(tmp_path / "c100", tmp_path / "store", log=quiet, options=ReadOptions(labels="coarse"))
    prepare_store(tmp_path / "c100", tmp_path / "store", log=quiet, options=ReadOptions(labels="coarse"),
                  force=True)
    assert open_store(tmp_path / "store").classes == ("coarse0", "coarse1", "coarse2")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_a_malicious_cifar100_pickle_is_refused(tmp_path):
    write_cifar100(tmp_path / "c100", overrides={"train": pickle.dumps({b"data": _Evil()})})
    with pytest.raises(DataError, match=r"c100/train: refusing pickle global 'posix.system'"):
        prepare_store(tmp_path / "c100", tmp_path / "store", log=quiet)
    assert not (tmp_path / "store").exists()


# --- SVHN ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_svhn_mat_round_trip_with_digit_zero_as_label_zero(tmp_path, compress):
    expected = write_svhn(tmp_path / "svhn", 30, 12, extra=10, compress=compress)
    meta = prepare_store(tmp_path / "svhn", tmp_path / "store", log=quiet)
    store = open_store(tmp_path / "store", verify=True)
    assert meta["source"]["kind"] == "svhn-mat" and store.classes == tuple(str(d) for d in range(10))
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(store, f"{split}_images"), expected[f"{split}_images"])
        np.testing.assert_array_equal(_labels(store, split), expected[f"{split}_labels"])
    assert _labels(store, "train")[0] == 0  # digit 0, stored as 10 in the file
    prepare_store(tmp_path / "svhn", tmp_path / "with-extra", log=quiet, options=ReadOptions(extra=True))
    assert len(open_store(tmp_path / "with-extra").train_labels) == 40


def _mat_with(element: bytes) -> bytes:
    header = b"MATLAB 5.0 MAT-file".ljust(116) + bytes(8) + struct.pack("<H", 0x0100) + b"IM"
    return header + element


def _element(kind: int, data: bytes) -> bytes:
    return struct.pack("<II", kind, len(data)) + data + bytes(-len(data) % 8)


def _array(dims_kind: int, dims: bytes, values: bytes = bytes(8)) -> bytes:
    """A double array 'X' whose dimensions element has data type `dims_kind` and bytes `dims` (MATLAB: int32)."""
    body = (_element(6, struct.pack("<II", 6, 0)) + _element(dims_kind, dims) + _element(1, b"X")
            + _element(9, values))
    return _mat_with(_element(14, body))


@pytest.mark.parametrize("data, why", [
    (b"not a mat file at all", "not a .mat file"),
    (b"MATLAB 7.3 MAT-file".ljust(124) + struct.pack("<H", 0x0200) + b"IM" + bytes(64), "MATLAB 7.3 (HDF5)"),
    (_mat_with(struct.pack("<II", 14, 10_000) + bytes(16)), "claims 10000 bytes, past the end of the file"),
    (_mat_with(struct.pack("<II", 15, 8) + b"\x78\x9c garbage"), "corrupt compressed element"),
    (_mat_with(struct.pack("<II", 14, 56) + struct.pack("<II", 6, 8) + struct.pack("<II", 1, 0)  # a cell array
               + struct.pack("<II", 5, 8) + struct.pack("<ii", 1, 1) + struct.pack("<II", 1, 1) + b"X" + bytes(7)
               + struct.pack("<II", 2, 0)), "only numeric arrays"),
    # dimension headers that used to give four different raw errors (ValueError, OverflowError, ...)
    (_array(9, struct.pack("<dd", float("nan"), 1.0)), "array 'X': its dimensions are not integers (data type 9)"),
    (_array(9, struct.pack("<dd", 1e300, 1.0)), "array 'X': its dimensions are not integers"),
    (_array(12, struct.pack("<qq", 2**32, 2**32), b""), "dimensions [4294967296, 4294967296] do not match its 0 "
                                                        "values"),  # an int64 product wraps to 0
    (_array(5, struct.pack("<70i", *[1] * 70)), "array 'X': 70 dimensions (MATLAB writes 2 or more; at most 32"),
    (_mat_with(_element(14, _element(6, struct.pack("<II", 6, 0)) + _element(5, struct.pack("<ii", 1, 1))
                        + _element(1, b"X") + struct.pack("<HH", 9, 4000) + bytes(4))),
     "small element at byte 184 claims 4000 bytes (it holds at most 4)"),
], ids=["not-mat", "hdf5", "past-end", "corrupt-zlib", "cell", "nan-dims", "huge-dims", "wrapping-dims", "70-dims",
        "small-element"])
def test_hostile_mat_files_are_one_line_refusals(data, why):
    with pytest.raises(DataError) as e:
        read_mat(data, "x.mat")
    assert why in str(e.value) and "\n" not in str(e.value)


def test_a_hostile_mat_header_is_one_line_at_the_cli(tmp_path, capsys):
    write_svhn(tmp_path / "svhn")
    (tmp_path / "svhn" / "train_32x32.mat").write_bytes(_array(9, struct.pack("<dd", float("nan"), 1.0)))
    assert main(["prepare", "--source", str(tmp_path / "svhn"), "--out", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_32x32.mat: not a readable .mat file (array 'X': its dimensions" in err


def test_svhn_with_wrong_variables_or_labels_is_refused(tmp_path):
    import scipy.io

    write_svhn(tmp_path / "svhn")
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                            "y": np.array([[0], [11]], np.uint8)})
    with pytest.raises(DataError, match=r"test_32x32.mat: y must hold 2 labels in 1..10"):
        prepare_store(tmp_path / "svhn", tmp_path / "store", log=quiet)


# --- image folders -------------------------------------------------------------------------------------------------


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_mixed_sizes_need_size_and_are_resized_with_it(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src, 2, 1, "png", classes=("a", "b"), size=40)
    (src / "train" / "a" / "wide.png").write_bytes(_png(np.full((30, 60, 3), 200, np.uint8)))
    with pytest.raises(DataError, match=r"wide.png: image is 60x30 but .* is 40x40 .* pass --size N"):
        prepare_store(src, tmp_path / "store", log=quiet)
    logs: list[str] = []
    prepare_store(src, tmp_path / "store", log=logs.append, options=ReadOptions(size=32))
    store = open_store(tmp_path / "store")
    assert store.train_images.shape[1:] == (32, 32, 3)
    assert "7 images resized to 32x32 (shorter side, centre crop, antialiased bicubic)" in logs
    assert (store.train_images[2] == 200).all()  # wide.png, sorted after 0000/0001 of class a


def test_non_square_and_tiny_images_are_refused_in_one_line(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src, 1, 1, "png", classes=("a", "b"))
    (src / "train" / "a" / "0000.png").write_bytes(_png(np.zeros((32, 48, 3), np.uint8)))
    with pytest.raises(DataError, match=r"0000.png: image is 48x32, not square; pass --size N"):
        prepare_store(src, tmp_path / "store", log=quiet)
    (src / "train" / "a" / "0000.png").write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
    for size in (0, 32):  # too small to be data even when resizing is allowed
        with pytest.raises(DataError, match=r"0000.png: image is 4x4, smaller than 8x8"):
            prepare_store(src, tmp_path / "store", log=quiet, options=ReadOptions(size=size))


# --- statistics and recipes ----------------------------------------------------------------------------------------


def test_the_store_records_its_statistics_and_auto_uses_them(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src, 3, 1, "png", classes=("a", "b"))
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "store")]) == 0
    assert "mean [" in " ".join(capsys.readouterr().out.split())
    store = open_store(tmp_path / "store")
    x = store.train_images.astype(np.float64) / 255
    np.testing.assert_allclose(store.meta["stats"]["mean"], x.mean((0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(store.meta["stats"]["std"], x.std((0, 1, 2)), atol=1e-6)
    base = ["--set", f'data.store="{tmp_path / "store"}"', "--set", "train.epochs=1", "--set", "train.batch_size=4"]
    for name, extra in (("auto", []), ("explicit", ["--set", "data.mean=[0.5, 0.5, 0.5]"])):
        assert main(["train", str(RECIPES / "quickstart.toml"), "--out", str(tmp_path / name), *base, *extra]) == 0
    used = {n: load_recipe(tmp_path / n / "recipe.toml").data for n in ("auto", "explicit")}
    assert list(used["auto"].mean) == store.meta["stats"]["mean"] and list(used["auto"].std) == store.meta["stats"]["std"]
    assert used["explicit"].mean == (0.5, 0.5, 0.5) and list(used["explicit"].std) == store.meta["stats"]["std"]


@pytest.mark.parametrize("recipe, make", [("cifar100_resnet18", "cifar100"), ("svhn_quickstart", "svhn")])
def test_dataset_recipes_train_a_tiny_epoch(tmp_path, capsys, recipe, make):
    if make == "cifar100":
        write_cifar100(tmp_path / "src" / "cifar-100-python", n_per_class=4)
        make_archive(tmp_path / "src", tmp_path / "cifar-100-python.tar.gz")
        source = tmp_path / "cifar-100-python.tar.gz"
    else:
        write_svhn(tmp_path / "src", 40, 20)
        source = tmp_path / "src"
    assert main(["prepare", "--source", str(source), "--dataset", make, "--out", str(tmp_path / "store")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the console width
    assert "train +" in out and "mean [" in out
    sets = [f'data.store="{tmp_path / "store"}"', "train.epochs=1", "train.batch_size=8", "train.amp=false",
            "eval.figures=true"]
    args = ["train", str(RECIPES / f"{recipe}.toml"), "--out", str(tmp_path / "run")]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert len(result["classes"]) == len(open_store(tmp_path / "store").classes)
    assert "figures/confusion.png" in result["figures"] and 0.0 <= result["test_acc"] <= 1.0


def test_many_classes_keep_the_report_readable(tmp_path):
    from fastcifar.report import PER_CLASS_ROWS, _per_class_section, load_run
    from fastcifar.ownership import write_marker

    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "run")
    classes = [f"c{i:03d}" for i in range(100)]
    acc = [i / 100 for i in range(100)]
    (run / "result.json").write_text(json.dumps({"fold": 0, "val_acc": 0.5, "classes": classes,
                                                 "metrics": {"per_class_accuracy": acc}}))
    lines = _per_class_section(load_run(run))
    rows = [line for line in lines if line.startswith("| c0")]
    assert len(rows) == PER_CLASS_ROWS and rows[0].startswith("| c099") and rows[-1].startswith("| c000")
    assert any("highest" in line and "of 100" in line for line in lines)


def test_tar_members_named_like_cifar100_files_are_read(tmp_path):
    """`train`, `test` and `meta` have no extension: the archive reader must still decompress them."""
    write_cifar100(tmp_path / "src" / "cifar-100-python")
    with tarfile.open(tmp_path / "c.tar", "w") as tf:
        tf.add(tmp_path / "src", "top")
    meta = prepare_store(tmp_path / "c.tar", tmp_path / "store", log=quiet)
    assert meta["counts"] == {"train": 24, "test": 12}
