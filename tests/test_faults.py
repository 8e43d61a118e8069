"""Fault tolerance: signals, non-finite numbers, full disks, out-of-memory, run locks, tampered stores."""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import fastcifar.atomic
from fastcifar.checkpoint import load_checkpoint
from fastcifar.context import Hooks
from fastcifar.cli import main
from fastcifar.errors import DataError, DiskFullError
from fastcifar.lifecycle import Interrupted, RunInUse, RunLock
from fastcifar.recipe import recipe_to_toml
from fastcifar.run import run_training
from fastcifar.step import NonFiniteError, OutOfMemory

QUIET = Console(quiet=True)
MIB = 2**20


def _weights(run, name="last.pt"):
    return load_checkpoint(run / "checkpoints" / name)["model"]


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _csv_without_times(path):
    rows = path.read_text().splitlines()
    return [r.rsplit(",", 3)[0] + "," + r.rsplit(",", 1)[1] for r in rows]  # drop epoch_time_s, img_per_s


def test_sigterm_mid_epoch_checkpoints_and_resume_is_exact(tiny, tmp_path):
    recipe = tiny(model={"name": "cnn_bn", "width": 8, "dropout": 0.2}, augment={"erasing_p": 0.5})
    run_training(recipe, tmp_path / "full", QUIET)

    def signal_self(epoch, step):
        if (epoch, step) == (1, 2):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag; the step finishes first

    with pytest.raises(Interrupted) as e:
        run_training(recipe, tmp_path / "cut", QUIET, hooks=Hooks(on_step=signal_self))
    msg = str(e.value)
    assert e.value.exit_code == 128 + signal.SIGTERM and "\n" not in msg
    assert "stopped by SIGTERM in fold 0 epoch 2 after step 3/7" in msg and "--resume" in msg
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert ckpt["partial"]["seen"] == 3 * 32 and ckpt["loader"]["pos"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored after the run
    run_training(recipe, tmp_path / "cut", QUIET, resume=True)
    assert _same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    assert _csv_without_times(tmp_path / "full" / "metrics.csv") == \
        _csv_without_times(tmp_path / "cut" / "metrics.csv")


def _poison_cross_entropy(monkeypatch, bad_calls: set[int]):
    """Make the training loss NaN on the given training-step calls (evaluation calls are left alone)."""
    real = F.cross_entropy
    calls = {"n": 0}

    def fake(logits, target, *args, **kwargs):
        loss = real(logits, target, *args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":
            calls["n"] += 1
            if calls["n"] in bad_calls:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(F, "cross_entropy", fake)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    _poison_cross_entropy(monkeypatch, {7 + 3})  # 7 steps per epoch: epoch 2, step index 2
    with pytest.raises(NonFiniteError) as e:
        run_training(tiny(), tmp_path / "nan", QUIET)
    msg = str(e.value)
    assert e.value.exit_code == 3 and "\n" not in msg
    assert "non-finite in fold 0 epoch 2 step 2" in msg and "end of epoch 1) is kept" in msg
    ckpt = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert ckpt["state"]["epoch"] == 1 and ckpt["partial"] is None
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert len((tmp_path / "nan" / "metrics.csv").read_text().splitlines()) == 2  # header + epoch 1


def test_nonfinite_weights_from_divergence_stop(tiny, tmp_path):
    # A real divergence: the largest lr a recipe admits (1000, recipe.LIMITS) on a ReLU MLP without
    # normalisation overflows within 3 steps.
    recipe = tiny(model={"name": "mlp", "width": 0}, optim={"name": "sgd", "lr": 1000.0, "momentum": 0.0,
                                                            "nesterov": False}, schedule={"name": "constant"})
    with pytest.raises(NonFiniteError, match="epoch 1 step .*no checkpoint was written before it"):
        run_training(recipe, tmp_path / "div", QUIET)


def test_skip_mode_counts_skipped_steps_and_gives_up_past_the_limit(tiny, tmp_path, monkeypatch):
    _poison_cross_entropy(monkeypatch, {4, 12})
    s = run_training(tiny(train={"on_nonfinite": "skip"}), tmp_path / "skip", QUIET)
    rows = (tmp_path / "skip" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[-1]) for r in rows] == [1, 1, 0]
    assert np.isfinite(s["val_loss_mean"])
    _poison_cross_entropy(monkeypatch, {2, 3})
    with pytest.raises(NonFiniteError, match=r"2 steps skipped, more than train\.max_skipped_steps = 1"):
        run_training(tiny(train={"on_nonfinite": "skip", "max_skipped_steps": 1}), tmp_path / "skip2", QUIET)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    real_fsync = os.fsync
    state = {"armed": False}

    def full_fsync(fd):
        if state["armed"] and os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".last.pt."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(fastcifar.atomic.os, "fsync", full_fsync)

    def arm(epoch):
        state["armed"] = epoch == 1  # the disk fills up after the first checkpoint

    with pytest.raises(DiskFullError) as e:
        run_training(tiny(), tmp_path / "full", QUIET, hooks=Hooks(on_epoch_end=arm))
    assert "last.pt: disk full while writing (No space left on device); the previous last.pt is intact" \
        in str(e.value)
    assert load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["state"]["epoch"] == 1
    assert not list((tmp_path / "full").rglob("*.tmp"))
    monkeypatch.setattr(fastcifar.atomic.os, "fsync", real_fsync)
    run_training(tiny(), tmp_path / "full", QUIET, resume=True)  # space freed: the run resumes and finishes
    assert load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["state"]["epoch"] == 3


class _FillingFile:
    """A file whose disk fills up after `room` more bytes: write raises ENOSPC as the OS does, and the writer
    above it reacts as it really does (torch.save's zip writer turns it into its own RuntimeError)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fill_on(monkeypatch, name: str, nth: int) -> None:
    """The nth write of `name` (counting from 1, matched on its temp file) runs out of space part-way: after
    4 KiB of a checkpoint (inside torch's zip writer), after 20 bytes of a text file."""
    room = 4096 if name.endswith(".pt") else 20
    opened = {"n": 0}

    def fake_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if Path(path).name.startswith(f".{name}."):
            opened["n"] += 1
            if opened["n"] == nth:
                return _FillingFile(f, room)
        return f

    monkeypatch.setattr(fastcifar.atomic, "open", fake_open, raising=False)  # shadows the builtin there only


@pytest.mark.parametrize("name, nth, kept", [
    ("last.pt", 2, "the previous last.pt is intact"),  # the README's line: epoch 2's checkpoint
    ("last.pt", 1, "nothing was written"),
    ("best.pt", 2, "the previous best.pt is intact"),
    ("metrics.csv", 1, "nothing was written"),
    ("result.json", 1, "nothing was written"),
    ("summary.json", 1, "nothing was written"),
    ("env.json", 1, "nothing was written"),  # before training
])
def test_disk_full_in_any_run_file_is_the_documented_line(tiny, tmp_path, capsys, monkeypatch, name, nth, kept):
    """torch.save, json and csv writes that run out of space mid-file: `fastcifar: error: FILE: disk full while
    writing (No space left on device); ...`, exit 2, no traceback, no temp file (torch's RuntimeError('[enforce
    fail at inline_container.cc:672] . unexpected pos ...') escaped raw before)."""
    recipe, run = tmp_path / "r.toml", tmp_path / "run"
    recipe.write_text(recipe_to_toml(tiny(train={"epochs": 2, "threads": 1})))
    _fill_on(monkeypatch, name, nth)
    assert main(["train", str(recipe), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    where = next(run.rglob(name), run / name) if name != "last.pt" else run / "checkpoints" / name
    where = run / "checkpoints" / name if name.endswith(".pt") else where
    assert err == (f"fastcifar: error: {where}: disk full while writing (No space left on device); {kept}, free "
                   "some space and resume\n")
    assert not list(run.rglob(".*.tmp"))


@pytest.mark.parametrize("name, line", [("report.md", "report.md not written ("),
                                        ("confusion.png", "figures not written (")])
def test_disk_full_in_the_report_or_a_figure_is_a_warning(tiny, tmp_path, capsys, monkeypatch, name, line):
    """Results first: the run ends (exit 0) with result.json and summary.json, and one warning naming the file
    and the full disk."""
    recipe, run = tmp_path / "r.toml", tmp_path / "run"
    recipe.write_text(recipe_to_toml(tiny(train={"epochs": 1, "threads": 1}, eval={"figures": True})))
    _fill_on(monkeypatch, name, 1)
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps at the terminal's width, inside a path too
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{line}{run}" in out and f"{name}: disk full while writing (No space left on device)" in out
    assert (run / "summary.json").exists() and not list(run.rglob(".*.tmp"))


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # no thread traceback either
def test_disk_full_while_writing_tensorboard_events(tiny, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer.record_writer import RecordWriter

    recipe, run = tmp_path / "r.toml", tmp_path / "run"
    recipe.write_text(recipe_to_toml(tiny(train={"epochs": 2, "threads": 1, "log": ["csv", "tensorboard"]})))
    real, writes = RecordWriter.write, {"n": 0}

    def write(self, data):  # runs in the writer's thread; the trainer meets the error at its next call
        writes["n"] += 1
        if writes["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(RecordWriter, "write", write)
    assert main(["train", str(recipe), "--out", str(run)]) == 2
    assert capsys.readouterr().err == (f"fastcifar: error: {run / 'tensorboard'}: disk full while writing "
                                       "TensorBoard events (No space left on device); the checkpoints are intact, "
                                       "free some space and resume\n")


class _SmallMemory(torch.nn.Module):
    """Pretends the device runs out of memory above 16 images per forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if self.training and len(x) > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def _small_memory(monkeypatch):
    import fastcifar.fold_run as fold_run

    real = fold_run.build_model
    monkeypatch.setattr(fold_run, "build_model", lambda *a, **k: _SmallMemory(real(*a, **k)))


def test_out_of_memory_message_and_automatic_retry(tiny, tmp_path, monkeypatch):
    _small_memory(monkeypatch)
    with pytest.raises(OutOfMemory) as e:
        run_training(tiny(), tmp_path / "oom", QUIET)
    assert str(e.value).startswith("out of memory at train.batch_size = 32 (micro-batch 32); try "
                                   "train.batch_size = 16, or set train.oom_retry = true")
    s = run_training(tiny(train={"oom_retry": True}), tmp_path / "retry", QUIET)
    assert load_checkpoint(tmp_path / "retry" / "checkpoints" / "last.pt")["state"]["accum_steps"] == 2
    assert s["folds"][0]["epochs_run"] == 3


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tiny, tmp_path):
    run = tmp_path / "locked"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f"{sleeper.pid}\n")
        with pytest.raises(RunInUse, match=f"in use by pid {sleeper.pid}"):
            run_training(tiny(train={"epochs": 1}), run, QUIET)
    finally:
        sleeper.kill()
        sleeper.wait()
    # The owner is dead now: its lock is stale and is taken over.
    run_training(tiny(train={"epochs": 1}), run, QUIET)
    assert not (run / ".lock").exists()
    with RunLock(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())


def test_tampered_store_is_refused_before_training(tiny, store, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    arr = copy / "train_images.npy"
    data = bytearray(arr.read_bytes())
    data[-1] ^= 0xFF
    arr.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train_images.npy"):
        run_training(tiny(data={"store": str(copy)}), tmp_path / "run", QUIET)
    assert not (tmp_path / "run").exists()


def test_deterministic_runs_give_identical_weights(tiny, tmp_path):
    recipe = tiny(train={"deterministic": True, "epochs": 2})
    run_training(recipe, tmp_path / "a", QUIET)
    run_training(recipe, tmp_path / "b", QUIET)
    torch.use_deterministic_algorithms(False)
    assert _same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    env = (tmp_path / "a" / "env.json").read_text()
    assert '"git_commit"' in env and '"sha256"' in env and '"torch"' in env


@pytest.fixture
def small_disk(tmp_path, request):
    """A real 8 MiB tmpfs (or the size a test asks for): a disk that can actually fill up (needs root, as on the
    CI machine)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    size = getattr(request, "param", "8m")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root; the fsync-ENOSPC test above covers the same code path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path, leave: int = 0) -> Path:
    """Fill the file system to the last byte (unbuffered writes), then give `leave` bytes back."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.mark.parametrize("small_disk", ["24m"], indirect=True)  # two 5 MB checkpoints fit once space is freed
def test_a_really_full_disk_mid_checkpoint(tiny, small_disk):
    """Half a checkpoint's room left (a 5 MB checkpoint: width 48; smaller ones fail in
    the buffered file's close, an OSError): torch.save's zip writer fails inside the file
    and raised its own RuntimeError ('unexpected pos 2602112 vs 2602008'); now the documented line, the
    previous last.pt intact, and the run resumes once there is space."""
    recipe = tiny(train={"threads": 1}, eval={"every": 0}, model={"name": "cnn_bn", "width": 48})
    run, filler = small_disk / "run", None

    def fill(epoch):  # no validation before the last epoch: epoch 2 writes metrics.csv and last.pt only
        nonlocal filler
        if epoch == 1:
            filler = _fill(small_disk, leave=(run / "checkpoints" / "last.pt").stat().st_size // 2)

    with pytest.raises(DiskFullError) as e:
        run_training(recipe, run, QUIET, hooks=Hooks(on_epoch_end=fill))
    assert str(e.value) == (f"{run}/checkpoints/last.pt: disk full while writing (No space left on device); the "
                            "previous last.pt is intact, free some space and resume")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 1
    assert not list(run.rglob(".*.tmp"))
    filler.unlink()
    run_training(recipe, run, QUIET, resume=True)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 3


def test_a_really_full_disk_before_the_run_and_for_numpy(tiny, small_disk, capsys):
    """A disk already full: the run lock names itself and leaves no folder behind; np.save into a real file
    fails with an OSError that has no errno ('N requested and M written'), and is still called disk full."""
    import fastcifar.atomic as atomic

    filler = _fill(small_disk)
    recipe = small_disk.parent / "r.toml"
    recipe.write_text(recipe_to_toml(tiny()))
    assert main(["train", str(recipe), "--out", str(small_disk / "run")]) == 2
    assert capsys.readouterr().err == (f"fastcifar: error: {small_disk}/run/.lock: disk full while writing (No "
                                       "space left on device); nothing was written, free some space and start "
                                       "again\n")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
    os.truncate(filler, filler.stat().st_size - 2 * MIB)
    with pytest.raises(DiskFullError, match=r"x\.npy: disk full while writing \(No space left on device\); "
                                            "nothing was written"):
        atomic.write_with(small_disk / "x.npy", lambda f: np.save(f, np.zeros(4 * MIB, np.uint8)))
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_really_full_disk(tiny, small_disk):
    filler = small_disk / "filler"

    def fill_disk(epoch):
        if epoch == 1:
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC

    run = small_disk / "run"
    with pytest.raises(DiskFullError, match="disk full while writing .*is intact, free some space and resume"):
        run_training(tiny(), run, QUIET, hooks=Hooks(on_epoch_end=fill_disk))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 1
    filler.unlink()
    run_training(tiny(), run, QUIET, resume=True)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 3


def test_prepare_onto_a_full_disk_says_to_run_prepare_again(small_disk, tmp_path, capsys):
    """A new store's first file is its marker: the line names prepare, not a resume that has nothing to resume."""
    from synth import make_image_folder

    make_image_folder(tmp_path / "src", 2, 1)
    _fill(small_disk, leave=4096)  # one tmpfs page: the lock file fits, the store's first file does not
    rc = main(["prepare", "--source", str(tmp_path / "src"), "--out", str(small_disk / "store")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "disk full" in err, err
    assert err == (f"fastcifar: error: {small_disk / 'store'}: disk full while writing the new store; its temp folder "
                   "is removed and any store already at --out is unchanged; free some space and run prepare again\n")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
