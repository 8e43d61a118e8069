"""A newcomer's second hour (issue 24): reruns without a source (item 1), runs found from any folder (item 2), and
`make train` twice through the Makefile (items 1 and 8)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastcifar.cli import main
from synth import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
NOWHERE = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # the discard port: a download fails at once


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No source anywhere: $FASTCIFAR_SOURCE unset, the download URL unreachable, HOME (the cache's home) empty."""
    monkeypatch.delenv("FASTCIFAR_SOURCE", raising=False)
    monkeypatch.setenv("FASTCIFAR_URL", NOWHERE)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_prepare_again_without_a_source_reuses_the_verified_store(offline, tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src, 3, 2, "png")
    store = tmp_path / "data" / "cifar10"
    assert main(["prepare", "--source", str(src), "--out", str(store)]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    capsys.readouterr()
    assert main(["prepare", "--out", str(store)]) == 0  # `make train` again: no SOURCE, no download
    out = capsys.readouterr().out
    assert out.strip().splitlines() == [f"{store}: already prepared and verified (30 train + 20 test images, 10 "
                                        f"classes, from {src.resolve()}); nothing to do, no source needed"]
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == before  # untouched
    assert not offline.exists()  # no cache folder made: nothing was downloaded
    # Other options than the store was prepared with: not reused, so prepare tries the download (and says so).
    assert main(["prepare", "--out", str(store), "--size", "16"]) == 2
    assert "no data source: downloading" in capsys.readouterr().err
    # A damaged store is not "already prepared" either.
    (store / "test_labels.npy").write_bytes(b"\x93NUMPY broken")
    assert main(["prepare", "--out", str(store)]) == 2
    assert "already prepared" not in capsys.readouterr().out


def test_a_failed_download_leaves_no_empty_cache_folder(offline, tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path / "new")]) == 2
    assert "no data source: downloading" in capsys.readouterr().err
    assert not offline.exists() and not (tmp_path / "new").exists()  # ~/.cache/fastcifar and ~ were made, removed
    kept = tmp_path / "mine"
    kept.mkdir()
    assert main(["prepare", "--out", str(tmp_path / "new"), "--cache", str(kept / "c")]) == 2
    assert kept.is_dir() and not (kept / "c").exists()  # a folder this run did not create stays
