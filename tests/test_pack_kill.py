"""kill -9 of a real packed `fastcifar train` process (train.pack = "all"): every resume ends bit-identical to the
uninterrupted packed run. Kills are aimed at random moments and at the checkpoint writes, where the folds of a
pack save one after another, so a kill there leaves some folds' last.pt an epoch behind the others'."""

import json
import random
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

FOLDS = ("fold0", "fold1", "fold2")
# "between": fold 0 has rewritten its last.pt and fold 1 or 2 is writing its own (the folds write in turn); each
# such kill leaves fold 0 an epoch ahead. "random": a uniform moment after the run took its lock.
AIMS = ["between", "random", "between", "random", "between", "random"]
MIN_KILLS = 4


def _cmd(recipe, out):
    return [sys.executable, "-m", "fastcifar", "train", str(recipe), "--out", str(out), "--resume"]


def _mtime(path):
    return path.stat().st_mtime_ns if path.exists() else None


def _between(run):
    """The condition of a "between" kill: fold 0's last.pt rewritten since now, then fold 1's or 2's write."""
    last0 = run / "fold0" / "checkpoints" / "last.pt"
    before = _mtime(last0)
    return lambda: _mtime(last0) != before and any(run.glob("fold[12]/checkpoints/.*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packkill")
    store = make_store(tmp / "store", 30, 8)  # 3 folds of 200 training images: 6 steps an epoch
    table = tiny_table(store, split={"kind": "kfold", "k": 3}, train={"epochs": 4, "threads": 1, "pack": "all"},
                       augment={"erasing_p": 0.5})
    recipe = tmp / "pack.toml"
    recipe.write_text(recipe_to_toml(recipe_from_dict(table)))
    t0 = time.perf_counter()
    subprocess.run(_cmd(recipe, tmp / "ref"), check=True, capture_output=True)
    return recipe, tmp / "ref", time.perf_counter() - t0


def _epochs(run) -> list[int | None]:
    out = []
    for f in FOLDS:
        last = run / f / "checkpoints" / "last.pt"
        out.append(load_checkpoint(last)["state"]["epoch"] if last.exists() else None)
    return out


def test_kill_9_of_a_packed_run_resumes_bit_for_bit(reference, tmp_path):
    recipe, ref, full = reference
    rng, run, kills = random.Random(27), tmp_path / "killed", []
    for aim in AIMS:
        between = _between(run)
        proc = subprocess.Popen(_cmd(recipe, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(proc, lambda: (run / ".lock").exists(), 60)
        if aim == "random":
            wait_until(proc, lambda: False, rng.uniform(0, full / 3))
        else:
            wait_until(proc, between, full)
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        kills.append(f"{aim:>6}: last.pt epochs per fold {_epochs(run)}")
    final = subprocess.run(_cmd(recipe, run), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    print(f"\n{len(kills)} kills ({full:.1f} s run):", *kills, sep="\n  ")
    assert len(kills) >= MIN_KILLS
    for fold in FOLDS:
        for name in ("last.pt", "best.pt"):
            a, b = (load_checkpoint(d / fold / "checkpoints" / name)["model"] for d in (ref, run))
            assert all(torch.equal(a[k], b[k]) for k in a), (fold, name)
        ra, rb = (json.loads((d / fold / "result.json").read_text()) for d in (ref, run))
        for measured in ("train_time_s", "peak_memory_mb", "inference_ms_per_image"):
            ra.pop(measured), rb.pop(measured)
        assert ra == rb
    assert not list(run.rglob(".*.tmp")) and not (run / ".lock").exists()
    assert any("between" in k and len(set(k.split("[")[1].rstrip("]").split(", "))) > 1 for k in kills), \
        "no kill left the folds at different epochs"
