"""kill -9 at random moments of a real `fastcifar train` process: every resume ends bit-identical."""

import json
import random
import subprocess
import sys
import time

import torch

from conftest import tiny_table
from fastcifar.checkpoint import load_checkpoint
from fastcifar.recipe import recipe_from_dict, recipe_to_toml
from synth import make_store

MAX_KILLS = 12
MIN_KILLS = 6
EPOCHS = 3


def _cmd(recipe, out):
    return [sys.executable, "-m", "fastcifar", "train", str(recipe), "--out", str(out), "--resume"]


def _where(run) -> str:
    """Where the killed process was, read from what it left on disk."""
    if list(run.rglob(".*.tmp")):
        return "while writing a file"
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


def test_kill_9_at_random_points(tmp_path):
    # ~1,300 training images per fold: enough work (about 10 s) next to the ~4 s interpreter start-up.
    store = make_store(tmp_path / "store", 130, 10)
    table = tiny_table(store, split={"kind": "kfold", "k": 2}, train={"epochs": EPOCHS, "threads": 1},
                       model={"name": "cnn_bn", "width": 16})
    recipe = tmp_path / "kill.toml"
    recipe.write_text(recipe_to_toml(recipe_from_dict(table)))
    subprocess.run(_cmd(recipe, tmp_path / "warm-up"), check=True, capture_output=True)  # cold caches
    t0 = time.perf_counter()
    subprocess.run(_cmd(recipe, tmp_path / "ref"), check=True, capture_output=True)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import fastcifar.run, fastcifar.train"], check=True)
    startup = time.perf_counter() - t0  # interpreter + torch import: killing inside it proves little
    work = max(full - startup, 1.0)

    # Each kill lands at a uniform moment of the next sixth of the work, so kills spread over the whole run.
    rng, run, kills = random.Random(20261122), tmp_path / "killed", []
    while True:
        proc = subprocess.Popen(_cmd(recipe, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=startup + rng.uniform(0, work / 6) if len(kills) < MAX_KILLS else None)
            break
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL: no handler runs, no cleanup happens
            proc.wait()
            kills.append(_where(run))
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    print(f"\n{len(kills)} kills in a {full:.1f} s run ({startup:.1f} s start-up):", *kills, sep="\n  ")
    assert len(kills) >= MIN_KILLS

    for fold in ("fold0", "fold1"):
        for name in ("last.pt", "best.pt"):
            a = load_checkpoint(tmp_path / "ref" / fold / "checkpoints" / name)["model"]
            b = load_checkpoint(run / fold / "checkpoints" / name)["model"]
            assert all(torch.equal(a[k], b[k]) for k in a), (fold, name)
        ra, rb = (json.loads((d / fold / "result.json").read_text()) for d in (tmp_path / "ref", run))
        ra.pop("train_time_s"), rb.pop("train_time_s")
        assert ra == rb
    assert not list(run.rglob(".*.tmp")) and not (run / ".lock").exists()
