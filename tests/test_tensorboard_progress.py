"""TensorBoard event files read back with TensorBoard's own reader (including a resumed run without duplicate
steps), and the progress lines a run prints when its output is not a terminal."""

import importlib.util
import io
import os
import re
import signal
import subprocess
import sys

import pytest
from rich.console import Console

import fastcifar.progress
from conftest import tiny_table
from fastcifar.cli import main
from fastcifar.lifecycle import Interrupted
from fastcifar.recipe import recipe_from_dict, recipe_to_toml
from fastcifar.run import run_training
from fastcifar.train import Hooks
from resume import interrupt_at

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

QUIET = Console(quiet=True)
STEPS = 7  # 240 training images of the tiny store at batch 32, ragged batch dropped


def _events(run) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def test_event_files_hold_steps_epochs_hparams_and_figures(tiny, tmp_path):
    recipe = tiny(train={"epochs": 2, "log": ["csv", "tensorboard"], "log_every": 2}, eval={"figures": True})
    summary = run_training(recipe, tmp_path / "run", QUIET)
    acc = _events(tmp_path / "run")
    tags = acc.Tags()
    assert _steps(acc, "epoch/val_acc") == [STEPS, 2 * STEPS]
    assert [e.value for e in acc.Scalars("epoch/val_acc")][-1] == pytest.approx(summary["val_acc_mean"], abs=0.05)
    assert _steps(acc, "step/train_loss") == [2, 4, 6, 8, 10, 12, 14]  # every 2nd optimizer step, both epochs
    assert {"epoch/train_loss", "epoch/img_per_s", "step/lr"} <= set(tags["scalars"])
    assert {"figures/confusion", "figures/curves"} <= set(tags["images"])
    hparams = acc.PluginTagToContent("hparams")  # the HParams view's session and its final metrics
    assert "_hparams_/session_start_info" in hparams
    assert "hparam/test_acc" in tags["scalars"]


def test_a_resumed_run_appends_without_duplicate_steps(tiny, tmp_path):
    recipe = tiny(train={"epochs": 3, "log": ["csv", "tensorboard"], "log_every": 1})
    run_training(recipe, tmp_path / "full", QUIET)
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 2, after its step 5: steps 8..13 are logged
        run_training(recipe, tmp_path / "cut", QUIET, hooks=interrupt_at(1, 5))
    run_training(recipe, tmp_path / "cut", QUIET, resume=True)  # resumes at the end of epoch 1 (step 7)
    full, cut = _events(tmp_path / "full"), _events(tmp_path / "cut")
    for tag in ("step/train_loss", "epoch/val_acc"):
        assert _steps(cut, tag) == _steps(full, tag)  # purged and re-logged: one point per step
    assert [e.value for e in cut.Scalars("epoch/val_acc")] == [e.value for e in full.Scalars("epoch/val_acc")]


TIMINGS = {"epoch/img_per_s", "epoch/epoch_time_s"}  # measured, not computed: only their steps can agree
# A child that trains with --resume and SIGKILLs itself after (epoch, step): no handler, no flush, no cleanup.
KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
from rich.console import Console
from fastcifar.recipe import load_recipe
from fastcifar.run import run_training
from fastcifar.train import Hooks
at = (int(sys.argv[3]), int(sys.argv[4]))
kill = lambda e, s: os.kill(os.getpid(), signal.SIGKILL) if (e, s) == at else None
run_training(load_recipe(sys.argv[1]), Path(sys.argv[2]), Console(quiet=True), resume=True, hooks=Hooks(on_step=kill))
"""


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    """A 3-epoch run (7 steps an epoch) with a step point every 3 steps, so stops fall between points, and
    epoch-end checkpoints after epochs 2 and 3 only; the recipe, its file, the uninterrupted run's folder."""
    tmp = tmp_path_factory.mktemp("tb")
    # threads = 1: the kill -9 child and this process then sum in the same order (torch's default thread count
    # is whatever an earlier test in this process left; a 1-thread parent and a 2-thread child differ by 0.35)
    recipe = recipe_from_dict(tiny_table(store, train={"log": ["csv", "tensorboard"], "log_every": 3,
                                                       "checkpoint_every": 2, "threads": 1}))
    (tmp / "r.toml").write_text(recipe_to_toml(recipe))
    run_training(recipe, tmp / "full", QUIET)
    return recipe, tmp / "r.toml", tmp / "full"


def _stop(how: str, recipe, toml, run, epoch: int, step: int) -> None:
    """Stop a run of `recipe` in `run` after (epoch, step): SIGTERM (a graceful stop: mid-epoch checkpoint),
    a crash (an exception from the hook: every event flushed, no checkpoint), or SIGKILL in a child process."""
    if how == "kill -9":
        child = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(toml), str(run), str(epoch), str(step)],
                               capture_output=True, text=True, timeout=300)
        assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
        return
    if how == "SIGTERM":
        hook, expect = lambda e, s: os.kill(os.getpid(), signal.SIGTERM) if (e, s) == (epoch, step) else None, \
            Interrupted
    else:
        hook, expect = interrupt_at(epoch, step).on_step, KeyboardInterrupt
    with pytest.raises(expect):
        run_training(recipe, run, QUIET, resume=True, hooks=Hooks(on_step=hook))


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    acc = _events(run)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("stops", [
    [("SIGTERM", 1, 2)],  # mid-epoch, a step after a point: the next point averages from that point
    [("SIGTERM", 0, 0), ("SIGTERM", 0, 6), ("SIGTERM", 2, 4)],  # the first step, an epoch's last, then again
    [("crash", 0, 4)],  # before the first checkpoint, its events all on disk: every one is purged
    [("kill -9", 1, 3)],  # before the first checkpoint, epoch 1's events on disk (flushed at its end)
    [("kill -9", 2, 2), ("crash", 2, 4), ("SIGTERM", 2, 5)],  # after epoch 2's checkpoint, then twice more
], ids=["sigterm-between-points", "sigterm-x3", "crash-before-checkpoint", "kill9-before-checkpoint",
        "kill9-crash-sigterm"])
def test_a_stopped_and_resumed_run_writes_the_events_of_an_uninterrupted_one(uninterrupted, tmp_path, stops):
    """Same tags, steps and values (to float tolerance: the resumed weights are bit-identical) as the run that was
    never stopped, wherever it stopped: mid-epoch SIGTERM (checkpoint with the epoch's running totals), a crash or
    kill -9 (resumed from the last epoch-end checkpoint, or from scratch)."""
    recipe, toml, full = uninterrupted
    cut = tmp_path / "cut"
    for how, epoch, step in stops:
        _stop(how, recipe, toml, cut, epoch, step)
    run_training(recipe, cut, QUIET, resume=True)
    want, got = _scalars(full), _scalars(cut)
    assert got.keys() == want.keys()
    worst = 0.0
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag  # no step twice, none missing
        if tag not in TIMINGS:
            worst = max([worst, *(abs(a - b) for (_, a), (_, b) in zip(got[tag], want[tag]))])
    assert worst <= 1e-6, worst
    print(f"{stops}: {len(want)} tags, {sum(map(len, want.values()))} points, max |difference| {worst:.3g}")


def test_a_resumed_event_file_sorts_after_the_files_it_purges(tiny, tmp_path):
    """TensorBoard reads event files in name order (`...tfevents.<second>.<host>.<pid>.<counter>`): a resumed
    writer opened in the same second as an earlier file with a larger pid (or counter: 10 < 9) sorted before it,
    so its purge did not apply."""
    import socket
    import time

    from fastcifar.tblog import FoldLog

    folder = tmp_path / "tensorboard"
    folder.mkdir()
    earlier = folder / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.99999999.99"
    earlier.write_bytes(b"")
    log = FoldLog(tmp_path, tiny(train={"log": ["csv", "tensorboard"]}), True, purge_step=5)
    log.close()
    assert sorted(p.name for p in folder.iterdir())[-1] != earlier.name


def test_tensorboard_without_the_package_is_one_line_before_the_run(tiny, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_to_toml(tiny(train={"log": ["csv", "tensorboard"]})))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "train.log: \"tensorboard\" needs the tensorboard package" in err and "fastcifar[tensorboard]" in err
    assert not (tmp_path / "run").exists()


LINE = re.compile(r"^fold (\d) epoch (\d)/2 step (\d+)/(\d+)  [\d,]+ img/s  ETA epoch (\S+), run (\S+)$")


def test_progress_lines_when_output_is_not_a_terminal(tiny, tmp_path, monkeypatch):
    """Every step prints (interval 0) and a fake clock ticks 1 s per reading, so a step takes 1 s and the ETAs
    are exact: the steps left in the epoch, and in the run with the second fold included."""
    import fastcifar.run

    ticks = iter(range(10**6))
    monkeypatch.setattr(fastcifar.progress, "LINE_EVERY_S", 0.0)
    monkeypatch.setattr(fastcifar.run, "RunProgress",
                        lambda console, folds: fastcifar.progress.RunProgress(console, folds, clock=lambda: next(ticks)))
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    run_training(tiny(split={"kind": "kfold", "k": 2}, train={"epochs": 2}), tmp_path / "run", console)
    lines = [m.groups() for m in map(LINE.match, out.getvalue().splitlines()) if m]
    steps = int(lines[0][3])  # 120 training images a fold at batch 32: 3 steps
    assert len(lines) == 2 * 2 * steps  # folds x epochs x steps
    for fold, epoch, step, _, eta_epoch, eta_run in lines:
        done = (int(epoch) - 1) * steps + int(step)  # steps of this fold so far
        assert _seconds(eta_epoch) == steps - int(step)
        assert _seconds(eta_run) == 2 * steps - done + (2 * steps if fold == "0" else 0)


def _seconds(text: str) -> int:
    h, m, s = map(int, text.split(":"))
    return 3600 * h + 60 * m + s
