"""A newcomer's second hour (issue 24): reruns without a source (item 1), runs found from any folder (item 2), and
`make train` twice through the Makefile (items 1 and 8)."""

import json
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


# ---------------------------------------------------------------------------------------------- item 2: paths

TINY = ["--set", "train.epochs=1", "--set", "data.train_subset=4", "--set", "train.batch_size=16", "--set",
        "model.width=8", "--set", "eval.figures=false"]


@pytest.fixture
def clone(store, tmp_path, monkeypatch):
    """A clone with its store at data/cifar10, and another folder to work from; FASTCIFAR_DATA unset."""
    monkeypatch.delenv("FASTCIFAR_DATA", raising=False)
    shutil.copytree(store, tmp_path / "clone" / "data" / "cifar10")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return tmp_path / "clone"


def test_a_recipe_by_name_trains_from_any_folder_with_fastcifar_data(clone, tmp_path, monkeypatch, capsys):
    assert main(["train", "quickstart", *TINY]) == 2  # data/cifar10 is not here, and nothing says where it is
    err = capsys.readouterr().err
    assert f"no prepared store at {tmp_path / 'elsewhere' / 'data' / 'cifar10'}" in err
    assert "--set data.store=PATH" in err and "set FASTCIFAR_DATA to the folder holding data/cifar10" in err
    assert not (tmp_path / "elsewhere" / "runs").exists()
    monkeypatch.setenv("FASTCIFAR_DATA", str(clone))
    assert main(["train", "quickstart", *TINY]) == 0
    assert "runs/quickstart: test accuracy" in capsys.readouterr().out
    data = json.loads((tmp_path / "elsewhere" / "runs" / "quickstart" / "data.json").read_text())
    assert data["store"] == str((clone / "data" / "cifar10").resolve())  # absolute: found from anywhere later
    env = json.loads((tmp_path / "elsewhere" / "runs" / "quickstart" / "env.json").read_text())
    assert env["store"]["path"] == data["store"] and env["cwd"] == str(tmp_path / "elsewhere")


def test_eval_of_a_run_from_another_folder_finds_its_store(clone, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(clone)  # trained from the clone, relative data.store, as `make train` does
    assert main(["train", "quickstart", *TINY, "--set", 'data.store="data/cifar10"', "--out", "runs/q"]) == 0
    best = clone / "runs" / "q" / "checkpoints" / "best.pt"
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["eval", str(best)]) == 0
    assert "best.pt: test accuracy" in " ".join(capsys.readouterr().out.split())
    # A run from before absolute paths: data.json relative, env.json naming the folder it started in.
    data = clone / "runs" / "q" / "data.json"
    data.write_text(json.dumps({**json.loads(data.read_text()), "store": "data/cifar10"}))
    assert main(["eval", str(best)]) == 0
    # The store moved away: one line naming where it looked and --data.
    (clone / "data" / "cifar10").rename(clone / "data" / "moved")
    assert main(["eval", str(best)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{best}: the store it was trained on is not at {clone / 'data' / 'cifar10'}" in err
    assert "pass --data STORE" in err and "FASTCIFAR_DATA" in err
    assert main(["eval", str(best), "--data", str(clone / "data" / "moved")]) == 0


# ---------------------------------------------------------------------------------------------- the Makefile


def _clone_with_venv(tmp_path: Path) -> Path:
    """The Makefile in a folder of its own, with a "venv" whose stamp says it is installed (this interpreter)."""
    clone = tmp_path / "clone"
    (clone / "venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", clone / "Makefile")
    (clone / "pyproject.toml").write_text("")
    (clone / "venv" / "bin" / "python").symlink_to(sys.executable)
    script = clone / "venv" / "bin" / "fastcifar"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fastcifar "$@"\n')
    script.chmod(0o755)
    later = (clone / "pyproject.toml").stat().st_mtime + 10
    (clone / "venv" / "bin" / ".installed").touch()
    os.utime(clone / "venv" / "bin" / ".installed", (later, later))
    return clone


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_twice_the_second_time_without_a_source(store, tmp_path):
    clone = _clone_with_venv(tmp_path)
    make_image_folder(tmp_path / "src", 6, 3, "png")
    (clone / "tiny.toml").write_text('name = "tiny"\n[model]\nname = "cnn_bn"\nwidth = 8\n[train]\nepochs = 1\n'
                                     'batch_size = 16\n[eval]\nfigures = false\n')
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCIFAR_SOURCE", "FASTCIFAR_DATA", "MAKEFLAGS")}
    env.update(FASTCIFAR_URL=NOWHERE, HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))

    def make(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "train", "VENV=venv", "RECIPE=tiny.toml", *args], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=900)

    first = make(f"SOURCE={tmp_path / 'src'}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "wrote data/cifar10: 60 train + 30 test images" in first.stdout and "fold 0 epoch" in first.stdout
    result = [line for line in first.stdout.splitlines() if line.startswith("runs/tiny: test accuracy")]
    second = make()  # no SOURCE, no FASTCIFAR_SOURCE, no network
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "data/cifar10: already prepared and verified (60 train + 30 test images" in second.stdout
    assert "fold 0 epoch" not in second.stdout and "fold 0: finished earlier, kept" in second.stdout
    assert [line for line in second.stdout.splitlines() if line.startswith("runs/tiny: test accuracy")] == result
    assert not (tmp_path / "home" / ".cache" / "fastcifar").exists()  # no download cache (matplotlib has its own)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_installs_the_main_job_only_and_make_test_adds_dev(tmp_path):
    clone = tmp_path / "fresh"
    clone.mkdir()
    shutil.copy(ROOT / "Makefile", clone / "Makefile")
    (clone / "pyproject.toml").write_text("")

    def dry(target: str) -> str:
        return subprocess.run(["make", "-n", target], cwd=clone, capture_output=True, text=True, check=True).stdout

    train, test = dry("train"), dry("test")
    assert "pip install -e .\n" in train and "[dev]" not in train
    assert "pip install -e .\n" in test and 'pip install -e ".[dev]"' in test
    assert "pytest" in test and "fastcifar train" in train
