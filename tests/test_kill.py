"""kill -9 at random moments of a real `fastcifar train` process: every resume ends bit-identical."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_table
from fastcifar.checkpoint import load_checkpoint
from fastcifar.recipe import recipe_from_dict, recipe_to_toml
from resume import wait_until
from synth import make_store

MIN_KILLS = 6
EPOCHS = 6


def _cmd(recipe, out):
    return [sys.executable, "-m", "fastcifar", "train", str(recipe), "--out", str(out), "--resume"]


def _orphans(run) -> set:
    return set(run.rglob(".*.tmp"))


def _where(run, orphans_before: set) -> str:
    """Where the killed process was, read from what it left on disk."""
    if _orphans(run) - orphans_before:
        return "while writing a file (its temp file is left, the target is intact)"
    done = sorted(p.parent.name for p in run.rglob("result.json"))
    ckpts = sorted(run.rglob("last.pt"))
    if not ckpts:
        return "before the first checkpoint"
    fold = ckpts[-1].parent.parent.name
    if f"{fold}" in done:
        return f"after {fold} finished (between folds or in the final summary)"
    epoch = load_checkpoint(ckpts[-1])["state"]["epoch"]
    if epoch == EPOCHS:
        return f"in {fold}'s final evaluation (all {EPOCHS} epochs checkpointed)"
    return f"in {fold} epoch {epoch + 1} (last checkpoint: end of epoch {epoch}; folds done: {len(done)})"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A recipe, its uninterrupted run, the run's wall time and the interpreter start-up time."""
    tmp = tmp_path_factory.mktemp("kill")
    # 600 training images per fold, 6 short epochs: many checkpoints, so kills can land between all of them.
    store = make_store(tmp / "store", 60, 10)
    table = tiny_table(store, split={"kind": "kfold", "k": 2}, train={"epochs": EPOCHS, "threads": 1},
                       model={"name": "cnn_bn", "width": 16})
    recipe = tmp / "kill.toml"
    recipe.write_text(recipe_to_toml(recipe_from_dict(table)))
    subprocess.run(_cmd(recipe, tmp / "warm-up"), check=True, capture_output=True)  # cold caches
    t0 = time.perf_counter()
    subprocess.run(_cmd(recipe, tmp / "ref"), check=True, capture_output=True)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import fastcifar.run, fastcifar.train"], check=True)
    startup = time.perf_counter() - t0  # interpreter + torch import: killing inside it proves little
    return recipe, tmp / "ref", full, startup


def _assert_same_as_reference(ref, run):
    for fold in ("fold0", "fold1"):
        for name in ("last.pt", "best.pt"):
            a = load_checkpoint(ref / fold / "checkpoints" / name)["model"]
            b = load_checkpoint(run / fold / "checkpoints" / name)["model"]
            assert all(torch.equal(a[k], b[k]) for k in a), (fold, name)
        ra, rb = (json.loads((d / fold / "result.json").read_text()) for d in (ref, run))
        for measured in ("train_time_s", "peak_memory_mb", "inference_ms_per_image"):  # timings, not results
            ra.pop(measured), rb.pop(measured)
        assert ra == rb
    assert not list(run.rglob(".*.tmp")) and not (run / ".lock").exists()


# Where each kill is aimed. "random": a uniform moment of the training work after the run took its lock (so
# kills spread over the run instead of piling up in start-up); "write": the moment a checkpoint's temp file
# appears; "fold-end": the moment fold 0's result is on disk.
AIMS = ["random", "random", "write", "random", "random", "write", "fold-end", "random", "write", "random",
        "random", "write"]


def test_kill_9_at_random_points(reference, tmp_path):
    recipe, ref, full, startup = reference
    work = max(full - startup, 1.0)
    rng, run, kills = random.Random(20261122), tmp_path / "killed", []
    for aim in AIMS:
        before = _orphans(run)  # temp files of an earlier kill: the next run removes them
        conditions = {"write": lambda: bool(_orphans(run) - before),
                      "fold-end": lambda: (run / "fold0" / "result.json").exists()}
        proc = subprocess.Popen(_cmd(recipe, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(proc, lambda: (run / ".lock").exists(), 60)
        if aim == "random":
            wait_until(proc, lambda: False, rng.uniform(0, work / 3))
        else:
            wait_until(proc, conditions[aim], work)
        if proc.poll() is not None:
            break  # it finished before this aim was reached
        proc.kill()  # SIGKILL: no handler runs, no cleanup happens
        proc.wait()
        kills.append(f"{aim:>8}: {_where(run, before)}")
    final = subprocess.run(_cmd(recipe, run), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    print(f"\n{len(kills)} kills ({full:.1f} s run, {startup:.1f} s start-up):", *kills, sep="\n  ")
    assert len(kills) >= MIN_KILLS
    _assert_same_as_reference(ref, run)


def test_sigterm_to_the_cli_checkpoints_and_says_how_to_resume(reference, tmp_path):
    recipe, ref, _, _ = reference
    run = tmp_path / "term"
    proc = subprocess.Popen(_cmd(recipe, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run / "fold0" / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastcifar: error: stopped by SIGTERM in fold 0 epoch ")
    assert f"resume with: fastcifar train {run / 'recipe.toml'} --out {run} --resume" in lines[0]
    assert load_checkpoint(run / "fold0" / "checkpoints" / "last.pt")["partial"] is not None
    subprocess.run(_cmd(run / "recipe.toml", run), check=True, capture_output=True)
    _assert_same_as_reference(ref, run)
