"""DALI and FFCV end to end through the CLI at default settings: train (workers fitted to the machine), stop by a
signal mid-epoch, --resume to the end; prepare --format beton from a raw source, and stopped by a signal
mid-write; refusals before the run."""

import importlib.util
import multiprocessing
import os
import signal
import threading
import time

import pytest

import fastcifar.backends.forked
import fastcifar.run
from conftest import tiny_table
from fastcifar.cli import main
from fastcifar.context import Hooks
from fastcifar.recipe import recipe_from_dict, recipe_to_toml
from synth import make_image_folder

HAVE = {kind: importlib.util.find_spec(lib) is not None for kind, lib in (("dali", "nvidia.dali"), ("ffcv", "ffcv"))}


def _recipe(path, store, loader: str, **augment):
    # train.workers stays at its default (4): the fitting to this machine's cores is part of what is tested
    table = tiny_table(store, train={"epochs": 2, "loader": loader}, augment={"erasing_p": 0.25, **augment})
    path.write_text(recipe_to_toml(recipe_from_dict(table)))
    return path


def _stop_at(monkeypatch, epoch: int, step: int) -> None:
    """The CLI's run gets a SIGTERM after (epoch, step), as from `kill`: the trainer checkpoints and exits."""
    def on_step(e, s):
        if (e, s) == (epoch, step):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(fastcifar.run, "Hooks", lambda: Hooks(on_step=on_step))


@pytest.fixture
def raw_source(tmp_path):
    make_image_folder(tmp_path / "images", 24, 8, "png")
    return tmp_path / "images"


@pytest.mark.parametrize("loader", ["dali", "ffcv"])
def test_train_stop_and_resume_through_the_cli_at_default_settings(loader, raw_source, tmp_path, capsys,
                                                                   monkeypatch):
    if not HAVE[loader]:
        pytest.skip(f"{loader} is not installed (pip install 'fastcifar[{loader}]')")
    store = tmp_path / "store"
    fmt = ["--format", "beton"] if loader == "ffcv" else []
    assert main(["prepare", "--source", str(raw_source), "--out", str(store), *fmt]) == 0  # a raw source
    assert (tmp_path / "store.beton").is_file() == (loader == "ffcv")
    recipe = _recipe(tmp_path / "r.toml", store, loader)
    _stop_at(monkeypatch, 1, 2)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 128 + signal.SIGTERM
    out = capsys.readouterr()
    cores = os.cpu_count() or 1
    if cores < 4:
        assert f"train.workers: 4 {loader.upper()} threads asked, this machine has {cores} cores" in out.out
    assert "stopped by SIGTERM in fold 0 epoch 2" in out.err
    monkeypatch.undo()
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--resume"]) == 0
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "resumed" in capsys.readouterr().out


def test_refusals_come_before_the_run_folder(raw_source, store, tmp_path, capsys, monkeypatch):
    import fastcifar.backends.dali as dali
    import fastcifar.backends.ffcv as ffcv

    monkeypatch.setattr(dali, "require_dali", lambda *a: None)  # as if both were installed: the checks after
    monkeypatch.setattr(ffcv, "require_ffcv", lambda *a: None)
    cases = [("dali", {"randaugment": True}, "augment.randaugment: train.loader = \"dali\" draws it from DALI's own"),
             ("ffcv", {"flip_mode": "alternate"}, "augment.flip_mode: \"alternate\" needs each image's index"),
             ("ffcv", {}, "no FFCV file for train.loader = \"ffcv\"")]
    for loader, augment, why in cases:
        recipe = _recipe(tmp_path / "r.toml", store, loader, **augment)
        assert main(["train", str(recipe), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1 and not (tmp_path / "never").exists()


@pytest.mark.timeout(120)  # before the fix: the parent waited for the write's end, here never
@pytest.mark.skipif(not HAVE["ffcv"], reason="FFCV is not installed (pip install 'fastcifar[ffcv]')")
def test_a_stopped_beton_write_stops_at_once_in_one_line_and_leaves_nothing(store, tmp_path, capsys,
                                                                            monkeypatch):
    """SIGTERM while the forked writer runs: one line, exit 143, no temp file, no process left. The write is
    made to hang after its rows (a tiny store writes in milliseconds) so the signal lands mid-write."""
    real = fastcifar.backends.forked.run_with_watched_workers

    def hanging(call, module, what, **kw):
        def call_then_hang():
            call()
            time.sleep(600)

        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return real(call_then_hang, module, what, **kw)

    monkeypatch.setattr(fastcifar.backends.forked, "run_with_watched_workers", hanging)
    out = tmp_path / "out" / "x.beton"
    t0 = time.monotonic()
    assert main(["prepare", "--source", str(store), "--format", "beton", "--out", str(out)]) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err.strip()
    assert err == f"fastcifar: error: writing {out} stopped by SIGTERM; nothing was written (temp files removed)"
    assert list(out.parent.iterdir()) == []
    assert not multiprocessing.active_children()
