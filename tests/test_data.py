"""fastcifar.data: source formats round-trip into the store; untrusted input is refused cleanly, leaving nothing."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fastcifar.data import OFFICIAL_MD5, OFFICIAL_URL, Store, open_store, prepare_store, resolve_source, verify_store
from fastcifar.errors import DataError
from fastcifar.ownership import NotOurs

try:
    from synth import make_archive, make_cifar_python_tar, make_image_folder, make_store, write_cifar_batches
except ImportError:  # tests/ imported as a package
    from tests.synth import make_archive, make_cifar_python_tar, make_image_folder, make_store, write_cifar_batches

CLASSES3 = ("cat", "dog", "frog")


def quiet(*_: object) -> None:
    pass


def message(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg, msg
    return msg


def assert_nothing_left(parent: Path, out: Path) -> None:
    """No store, and no temp dir beside it."""
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def check_store(out: Path, expected: dict, exact: bool = True) -> Store:
    verify_store(out)
    store = open_store(out, verify=True)
    assert store.classes == tuple(expected["classes"])
    assert store.meta["format_version"] == 1
    for split in ("train", "test"):
        images, labels = getattr(store, f"{split}_images"), getattr(store, f"{split}_labels")
        assert isinstance(images, np.memmap) and images.dtype == np.uint8 and labels.dtype == np.int64
        assert images.shape == expected[f"{split}_images"].shape
        np.testing.assert_array_equal(labels, expected[f"{split}_labels"])
        if exact:
            np.testing.assert_array_equal(images, expected[f"{split}_images"])
        else:  # JPEG is lossy
            diff = np.abs(images.astype(int) - expected[f"{split}_images"].astype(int))
            assert diff.mean() < 6, diff.mean()
        counts = np.bincount(expected[f"{split}_labels"], minlength=len(expected["classes"])).tolist()
        assert store.meta["class_counts"][split] == counts
    return store


# --- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["py2", 5])
def test_official_tar_gz_round_trip(tmp_path: Path, protocol: object) -> None:
    src = tmp_path / "cifar-10-python.tar.gz"
    expected = make_cifar_python_tar(src, n_per_class=2, protocol=protocol)
    meta = prepare_store(src, tmp_path / "store", log=quiet)
    assert meta["source"]["kind"] == "cifar-python" and meta["counts"] == {"train": 100, "test": 20}
    assert meta["shapes"]["train_images"] == [100, 32, 32, 3]
    check_store(tmp_path / "store", expected)


def test_extracted_batches_dir_round_trip(tmp_path: Path) -> None:
    # label_names order is kept as-is (not sorted): the official labels index into it
    classes = ("zebra", "ant", "moose")
    expected = write_cifar_batches(tmp_path / "cifar-10-batches-py", 3, classes, seed=1)
    prepare_store(tmp_path / "cifar-10-batches-py", tmp_path / "store", log=quiet)
    check_store(tmp_path / "store", expected)


def test_image_folder_png_dir_exact(tmp_path: Path) -> None:
    expected = make_image_folder(tmp_path / "src", 3, 2, "png", classes=CLASSES3)
    (tmp_path / "src" / "train" / "cat" / ".DS_Store").write_bytes(b"junk")  # hidden junk is ignored
    meta = prepare_store(tmp_path / "src", tmp_path / "store", log=quiet)
    assert meta["source"]["kind"] == "image-folder"
    check_store(tmp_path / "store", expected)


@pytest.mark.parametrize("name,top", [("a.tar", None), ("a.tar.gz", "cifar10"), ("a.zip", None), ("b.zip", "x")])
def test_image_folder_jpeg_archives(tmp_path: Path, name: str, top: str | None) -> None:
    expected = make_image_folder(tmp_path / "src", 3, 2, "jpeg", classes=CLASSES3)
    archive = make_archive(tmp_path / "src", tmp_path / name, top=top)
    prepare_store(archive, tmp_path / "store", log=quiet)
    check_store(tmp_path / "store", expected, exact=False)


def test_make_store_helper(tmp_path: Path) -> None:
    out = make_store(tmp_path / "store", 4, 2, num_classes=4)
    store = open_store(out)
    assert store.train_images.shape == (16, 32, 32, 3) and store.test_labels.shape == (8,)
    assert len(store.classes) == 4


# --- re-runs -------------------------------------------------------------------------------------------------------


def test_rerun_is_noop_and_force_replaces(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", 2, 1, "png", classes=CLASSES3)
    out = tmp_path / "store"
    prepare_store(tmp_path / "src", out, log=quiet)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    logs: list[str] = []
    prepare_store(tmp_path / "src", out, log=logs.append)
    assert any("up to date" in line for line in logs)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    other = make_image_folder(tmp_path / "src2", 1, 1, "png", classes=("a", "b"))
    with pytest.raises(DataError) as e:
        prepare_store(tmp_path / "src2", out, log=quiet)
    assert "--force" in message(e) and str(out) in message(e)
    prepare_store(tmp_path / "src2", out, force=True, log=quiet)
    check_store(out, other)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".store.")]


def test_out_holding_other_files_is_protected(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", 1, 1, "png", classes=CLASSES3)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    for force in (False, True):  # --force replaces only fastcifar's own stores
        with pytest.raises(NotOurs, match="holds files fastcifar did not write"):
            prepare_store(tmp_path / "src", out, force=force, log=quiet)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "do not delete"


# --- untrusted input -----------------------------------------------------------------------------------------------

MARKER = Path("/tmp/fastcifar-test-pwned-marker")


def write_marker() -> None:  # referenced by the third malicious pickle below
    MARKER.write_text("pwned")


class _System:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class _Exec:
    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({str(MARKER)!r}, 'w').write('pwned')",))


class _Func:
    def __reduce__(self):
        return (write_marker, ())


@pytest.mark.parametrize("payload", [_System, _Exec, _Func])
def test_malicious_pickle_refused_without_side_effect(tmp_path: Path, payload: type) -> None:
    MARKER.unlink(missing_ok=True)
    evil = pickle.dumps({b"data": payload(), b"labels": []}, protocol=2)
    src = tmp_path / "cifar.tar.gz"
    make_cifar_python_tar(src, 1, overrides={"data_batch_1": evil})
    out = tmp_path / "store"
    with pytest.raises(DataError) as e:
        prepare_store(src, out, log=quiet)
    msg = message(e)
    assert "refusing pickle global" in msg and "data_batch_1" in msg and str(src) in msg
    assert not MARKER.exists()
    assert_nothing_left(tmp_path, out)


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    "bad",
    [
        _member("../escape.png"),
        _member("train/cat/../../../escape.png"),
        _member("/tmp/escape.png"),
        _member("C:/escape.png"),
        _member("train/cat/link.png", tarfile.SYMTYPE, "/etc/passwd"),
        _member("train/cat/hard.png", tarfile.LNKTYPE, "/etc/passwd"),
        _member("train/cat/dev", tarfile.CHRTYPE),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "drive", "symlink", "hardlink", "device"],
)
def test_unsafe_tar_member_refused(tmp_path: Path, bad: tarfile.TarInfo) -> None:
    make_image_folder(tmp_path / "src", 1, 1, "png", classes=CLASSES3)
    png = (tmp_path / "src" / "train" / "cat" / "0000.png").read_bytes()
    src = tmp_path / "evil.tar.gz"
    _tar_with(src, [(_member("train/cat/0000.png"), png), (bad, png)])
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.as_posix() for p in tmp_path.rglob("*"))
    with pytest.raises(DataError) as e:
        prepare_store(src, work / "store", log=quiet)
    msg = message(e)
    assert f"refusing unsafe member '{bad.name}'" in msg and str(src) in msg and "path traversal" in msg
    assert sorted(p.as_posix() for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/escape.png").exists()


def test_unsafe_zip_member_refused(tmp_path: Path) -> None:
    src = tmp_path / "evil.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("train/cat/a.png", b"x")
        zf.writestr("..\\..\\escape.png", b"x")
    with pytest.raises(DataError) as e:
        prepare_store(src, tmp_path / "store", log=quiet)
    assert "refusing unsafe member '..\\..\\escape.png' (path traversal)" in message(e)
    assert_nothing_left(tmp_path, tmp_path / "store")


def test_zip_symlink_member_refused(tmp_path: Path) -> None:
    src = tmp_path / "link.zip"
    with zipfile.ZipFile(src, "w") as zf:
        info = zipfile.ZipInfo("train/cat/a.png")
        info.create_system = 3
        info.external_attr = (0o120777 << 16)  # S_IFLNK
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match=r"refusing unsafe member 'train/cat/a.png' \(path traversal"):
        prepare_store(src, tmp_path / "store", log=quiet)


def test_truncated_tar_gz(tmp_path: Path) -> None:
    src = tmp_path / "cifar.tar.gz"
    make_cifar_python_tar(src, 1)
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        prepare_store(src, tmp_path / "store", log=quiet)
    assert str(src) in message(e) and "truncated or corrupt archive" in message(e)
    assert_nothing_left(tmp_path, tmp_path / "store")


def test_truncated_plain_tar_at_block_boundary(tmp_path: Path) -> None:
    # tarfile itself silently stops at a missing header; we must notice the archive is cut short
    make_image_folder(tmp_path / "src", 2, 2, "png", classes=CLASSES3)
    src = make_archive(tmp_path / "src", tmp_path / "a.tar")
    raw = src.read_bytes()
    with tarfile.open(src) as tf:
        cut = tf.getmembers()[len(tf.getmembers()) // 2].offset  # a header boundary
    src.write_bytes(raw[:cut])
    with pytest.raises(DataError, match="truncated or corrupt archive .no end-of-archive marker"):
        prepare_store(src, tmp_path / "store", log=quiet)


def test_corrupt_gzip_and_zip(tmp_path: Path) -> None:
    bad_gz = tmp_path / "x.tar.gz"
    bad_gz.write_bytes(gzip.compress(b"not a tar at all" * 100)[:-8] + b"\0" * 8)  # broken CRC trailer
    bad_zip = tmp_path / "x.zip"
    bad_zip.write_bytes(b"PK\x03\x04" + b"garbage" * 10)
    for src in (bad_gz, bad_zip):
        with pytest.raises(DataError) as e:
            prepare_store(src, tmp_path / "store", log=quiet)
        assert str(src) in message(e) and "truncated or corrupt archive" in message(e)


def test_corrupt_image(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", 2, 1, "png", classes=CLASSES3)
    bad = tmp_path / "src" / "train" / "dog" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError) as e:
        prepare_store(tmp_path / "src", tmp_path / "store", log=quiet)
    assert str(bad) in message(e) and "truncated or corrupt image" in message(e)
    assert_nothing_left(tmp_path, tmp_path / "store")


def test_mixed_image_sizes(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", 1, 1, "png", classes=CLASSES3)
    from PIL import Image

    odd = tmp_path / "src" / "test" / "frog" / "0000.png"
    Image.new("RGB", (16, 8)).save(odd)
    with pytest.raises(DataError) as e:
        prepare_store(tmp_path / "src", tmp_path / "store", log=quiet)
    assert str(odd) in message(e) and "16x8" in message(e) and "32x32" in message(e)


def _batch(data: object, labels: object) -> bytes:
    return pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"}, protocol=4)


@pytest.mark.parametrize(
    "payload,fragment",
    [
        (_batch(np.zeros((4, 3071), np.uint8), [0, 1, 2, 3]), "wrong shapes"),
        (_batch(np.zeros((4, 3072), np.float32), [0, 1, 2, 3]), "wrong shapes"),
        (_batch(np.zeros((4, 3072), np.uint8), [0, 1, 2]), "wrong shapes"),
        (_batch(np.zeros((2, 3072), np.uint8), [0, 10]), "out of range"),
        (pickle.dumps([1, 2, 3]), "wrong structure"),
        (b"\x80\x04garbage", "corrupt pickle"),
    ],
    ids=["width", "dtype", "nlabels", "range", "not-dict", "garbage"],
)
def test_bad_batch_contents(tmp_path: Path, payload: bytes, fragment: str) -> None:
    write_cifar_batches(tmp_path / "cifar-10-batches-py", 1, overrides={"data_batch_3": payload})
    with pytest.raises(DataError) as e:
        prepare_store(tmp_path / "cifar-10-batches-py", tmp_path / "store", log=quiet)
    assert "data_batch_3" in message(e) and fragment in message(e)


def test_folder_structure_errors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_image_folder(src, 1, 1, "png", classes=CLASSES3)
    (src / "train" / "emu").mkdir()
    (src / "test" / "emu").mkdir()
    (src / "test" / "emu" / "0000.png").write_bytes((src / "test" / "cat" / "0000.png").read_bytes())
    with pytest.raises(DataError) as e:
        prepare_store(src, tmp_path / "store", log=quiet)
    assert str(src / "train" / "emu") in message(e) and "empty class folder" in message(e)

    (src / "train" / "emu").rmdir()
    with pytest.raises(DataError, match="different classes"):
        prepare_store(src, tmp_path / "store", log=quiet)

    for p in sorted((src / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (src / "test").rmdir()
    with pytest.raises(DataError) as e:
        prepare_store(src, tmp_path / "store", log=quiet)
    assert "test/" in message(e) and "missing" in message(e)
    assert_nothing_left(tmp_path, tmp_path / "store")


# --- store integrity ----------------------------------------------------------------------------------------------


def test_verify_detects_flipped_byte_and_missing_files(tmp_path: Path) -> None:
    out = make_store(tmp_path / "store", 2, 1, num_classes=3)
    arr = out / "train_images.npy"
    raw = bytearray(arr.read_bytes())
    raw[-5] ^= 0xFF
    arr.write_bytes(bytes(raw))
    open_store(out)  # the cheap check cannot see a flipped pixel ...
    for check in (verify_store, lambda p: open_store(p, verify=True)):
        with pytest.raises(DataError) as e:  # ... but hashing does
            check(out)
        assert str(arr) in message(e) and "sha256 mismatch" in message(e)

    (out / "test_labels.npy").unlink()
    with pytest.raises(DataError) as e:
        open_store(out)
    assert "test_labels.npy" in message(e)


def test_open_store_cheap_checks(tmp_path: Path) -> None:
    out = make_store(tmp_path / "store", 2, 1, num_classes=3)
    np.save(out / "test_labels.npy", np.zeros(2, np.int64))  # wrong length vs meta
    with pytest.raises(DataError) as e:
        open_store(out)
    assert "test_labels.npy" in message(e)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json"):
        open_store(out)


def test_open_store_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        open_store(tmp_path / "nope")
    assert message(e) == f"{tmp_path / 'nope'}: no prepared store here (run `fastcifar prepare --out {tmp_path / 'nope'}`)"


# --- resolve_source -----------------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("FASTCIFAR_SOURCE", "FASTCIFAR_URL", "FASTCIFAR_MD5"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_resolve_explicit_and_env(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    f = tmp_path / "data.tar.gz"
    f.write_bytes(b"x")
    assert resolve_source(str(f), tmp_path / "cache") == f
    with pytest.raises(DataError) as e:
        resolve_source(str(tmp_path / "missing.tar.gz"), tmp_path / "cache")
    assert "missing.tar.gz" in message(e)
    clean_env.setenv("FASTCIFAR_SOURCE", str(f))
    assert resolve_source(None, tmp_path / "cache") == f


def test_resolve_download_md5(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    assert OFFICIAL_URL.endswith("cifar-10-python.tar.gz") and len(OFFICIAL_MD5) == 32
    remote = tmp_path / "remote.tar.gz"
    remote.write_bytes(b"pretend archive")
    cache = tmp_path / "cache"
    clean_env.setenv("FASTCIFAR_URL", remote.as_uri())
    clean_env.setenv("FASTCIFAR_MD5", "0" * 32)
    with pytest.raises(DataError) as e:
        resolve_source(None, cache)
    assert "md5 mismatch" in message(e) and "0" * 32 in message(e)
    assert not cache.exists()  # the cache folder this download made is removed with its temp file

    import hashlib

    clean_env.setenv("FASTCIFAR_MD5", hashlib.md5(b"pretend archive").hexdigest())
    got = resolve_source(None, cache)
    assert got == cache / "cifar-10-python.tar.gz" and got.read_bytes() == b"pretend archive"
    remote.unlink()  # the cached copy is reused without downloading again
    assert resolve_source(None, cache) == got


def test_resolve_nothing_available(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FASTCIFAR_URL", (tmp_path / "does-not-exist.tar.gz").as_uri())
    with pytest.raises(DataError) as e:
        resolve_source(None, tmp_path / "cache")
    msg = message(e)
    assert "--source" in msg and "FASTCIFAR_SOURCE" in msg and "does-not-exist" in msg
    assert not (tmp_path / "cache").exists()  # nothing left behind, not even the folder the download made
