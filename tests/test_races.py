"""Races: what another process (or the user) does while a command runs never costs a file fastcifar did not write.

- A folder made (or changed) at prepare's --out while the source is being read is never moved aside or deleted:
  the swap checks again what is there, and the folder moved aside is checked once more where it lies.
- Two writers of one store (or one run folder) never both "succeed": the second is refused naming the first.
- The ownership property test of test_ownership.py, with two commands at once and a user making a folder at
  one of their --out paths while they run.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synth import make_image_folder
from test_ownership import CLASSES, one_error, quiet, snapshot

import fastcifar.data.store as store_mod
from fastcifar.cli import main
from fastcifar.data import prepare_store
from fastcifar.lifecycle import PidLock, RunInUse, RunLock, WriterInUse
from fastcifar.recipe import recipe_from_dict, recipe_to_toml

ROOT = Path(__file__).resolve().parents[1]


def _sources(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "src_a", tmp_path / "src_b"
    make_image_folder(a, 2, 1, "png", classes=CLASSES)
    make_image_folder(b, 2, 1, "png", classes=("a", "b", "c"))
    return a, b


def _while_reading(monkeypatch, action) -> None:
    """Run `action` after the source has been read, before the new store is swapped in."""
    real = store_mod.read_dataset

    def read(*args, **kwargs):
        data = real(*args, **kwargs)
        action()
        return data

    monkeypatch.setattr(store_mod, "read_dataset", read)


def _leftovers(parent: Path) -> list[str]:
    """fastcifar's temp folders and lock files beside a store."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-"
                                                                                 in p.name or p.name.endswith(".lock")))


@pytest.mark.parametrize("before", ["absent", "empty", "store"])
def test_a_folder_made_or_changed_at_out_during_the_read_is_never_replaced(tmp_path, monkeypatch, capsys, before):
    src_a, src_b = _sources(tmp_path)
    out = tmp_path / "out"
    if before == "empty":
        out.mkdir()
    if before == "store":
        prepare_store(src_a, out, log=quiet)
    store_files = snapshot(out) if before == "store" else {}

    def user():
        out.mkdir(exist_ok=True)
        (out / "thesis.txt").write_text("x")

    _while_reading(monkeypatch, user)
    assert main(["prepare", "--source", str(src_b), "--out", str(out), "--force"]) == 2
    err = one_error(capsys)
    assert "changed while prepare was reading" in err and "thesis.txt" in err
    assert snapshot(out) == {**store_files, "thesis.txt": snapshot(out)["thesis.txt"]}
    assert (out / "thesis.txt").read_text() == "x"
    assert _leftovers(tmp_path) == []


def test_a_file_landing_between_the_check_and_the_rename_is_put_back(tmp_path, monkeypatch, capsys):
    """The narrowest window: the folder is checked, then a file lands, then it is moved aside; the folder moved
    aside is checked again where it lies, put back untouched, and the swap refused."""
    src_a, src_b = _sources(tmp_path)
    out = tmp_path / "out"
    prepare_store(src_a, out, log=quiet)
    before = snapshot(out)
    real_state = store_mod.out_state
    calls = []

    def state(path):
        value = real_state(path)
        calls.append(value)
        if len(calls) == 2:  # the swap's own check: it passes, and only then does the user's file land
            (out / "thesis.txt").write_text("x")
        return value

    monkeypatch.setattr(store_mod, "out_state", state)
    assert main(["prepare", "--source", str(src_b), "--out", str(out), "--force"]) == 2
    assert "changed while prepare was reading" in one_error(capsys)
    after = snapshot(out)
    assert after.pop("thesis.txt") and after == before
    assert _leftovers(tmp_path) == []


def test_a_replaced_store_is_deleted_by_name_and_foreign_files_are_left(tmp_path, capsys):
    """If the old store moved aside is found holding something else when it is deleted, that is kept."""
    src_a, _ = _sources(tmp_path)
    old = tmp_path / ".out.old-1-abc"
    prepare_store(src_a, old, log=quiet)
    (old / "late.txt").write_text("x")
    lines = []
    store_mod._remove_old_store(old, lines.append)
    assert sorted(p.name for p in old.iterdir()) == [".fastcifar-store", "late.txt"]
    assert "late.txt" in lines[0]


def test_a_second_prepare_of_the_same_store_is_refused_naming_the_first(tmp_path, monkeypatch):
    src_a, src_b = _sources(tmp_path)
    out = tmp_path / "out"
    reading, release = threading.Event(), threading.Event()
    real_read = store_mod.read_dataset

    def hold():
        reading.set()
        assert release.wait(60)

    _while_reading(monkeypatch, hold)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(meta=prepare_store(src_a, out, log=quiet)))
    thread.start()
    try:
        assert reading.wait(60)
        monkeypatch.setattr(store_mod, "read_dataset", real_read)
        with pytest.raises(WriterInUse, match=rf"out: being written by pid {os.getpid()} \(another fastcifar "
                                             r"prepare\)"):
            prepare_store(src_b, out, log=quiet, force=True)
    finally:
        release.set()
        thread.join(60)
    assert first["meta"]["classes"] == list(CLASSES)
    assert (out / "meta.json").read_text().count('"cat"') == 1  # the first one's store, and only it
    assert _leftovers(tmp_path) == []


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastcifar", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}: {proc.stderr.read()}")
    raise AssertionError(f"no {text!r} within {timeout} s")


@pytest.fixture(scope="module")
def big_sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two sources of 1,500 training images each: reading one takes seconds, time for the user to act."""
    root = tmp_path_factory.mktemp("big")
    make_image_folder(root / "a", 150, 1, "png")
    make_image_folder(root / "b", 150, 1, "png", seed=1)
    return root / "a", root / "b"


def test_the_issue_s_race_with_real_processes(big_sources, tmp_path):
    """prepare of 1,500 images; while it reads (held there by SIGSTOP, so the order is certain on any machine), a
    second prepare of another source into the same out/ starts, and the user makes out/ and writes their thesis
    into it. The second prepare is refused naming the first; the thesis survives; the first says truthfully
    that it did not write the store."""
    a, b = big_sources
    first = _cli("prepare", "--source", str(a), "--out", "out", cwd=tmp_path)
    _wait_for_line(first, "reading")
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = _cli("prepare", "--source", str(b), "--out", "out", cwd=tmp_path)
        _, err2 = second.communicate(timeout=300)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "thesis.txt").write_text("x")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out1, err1 = first.communicate(timeout=300)
    assert second.returncode == 2 and err2.strip() == (f"fastcifar: error: out: being written by pid {first.pid} "
                                                       "(another fastcifar prepare); wait for it to finish or stop it")
    assert first.returncode == 2, out1 + err1
    assert "changed while prepare was reading" in err1 and "wrote out" not in out1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["thesis.txt"]
    assert (tmp_path / "out" / "thesis.txt").read_text() == "x"
    assert _leftovers(tmp_path) == []


def test_two_prepares_one_store_the_line_printed_is_true(big_sources, tmp_path):
    a, b = big_sources
    first = _cli("prepare", "--source", str(a), "--out", "out", cwd=tmp_path)
    _wait_for_line(first, "reading")
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = _cli("prepare", "--source", str(b), "--out", "out", "--force", cwd=tmp_path)
        _, err2 = second.communicate(timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out1, _ = first.communicate(timeout=300)
    assert (first.returncode, second.returncode) == (0, 2)
    assert "wrote out" in out1 and "being written by pid" in err2
    assert f'"path": "{a}"' in (tmp_path / "out" / "meta.json").read_text()  # what the winner said it wrote


# --- locks -------------------------------------------------------------------------------------------------------


def test_a_run_locked_by_a_live_process_is_refused_and_taken_over_once_it_is_killed(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastcifar.lifecycle import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUse, match=f"in use by pid {holder.pid}"):
            RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").read_text().strip() == str(holder.pid)  # left by the killed holder
    with RunLock(run):  # the kernel released its flock: taken over
        assert (run / ".lock").read_text().strip() == str(os.getpid())
    assert not (run / ".lock").exists()


def test_a_stale_lock_is_taken_over_by_exactly_one_of_many(tmp_path):
    """Old RunLock: every contender that saw the dead owner's pid unlinked the lock and made its own, so two
    could hold it. Now flock decides."""
    path = tmp_path / ".lock"
    path.write_text("999999999\n")  # a dead pid
    winners, start = [], threading.Barrier(8)

    def contend():
        lock = PidLock(path, lambda owner: RunInUse(str(owner)))
        start.wait()
        try:
            lock.acquire()
        except RunInUse:
            return
        winners.append(lock)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(winners) == 1
    winners[0].release()
    assert not path.exists()


@pytest.mark.parametrize("content", [b"my notes\n", b"1" * 40])
def test_a_user_file_at_the_lock_path_is_refused_and_left_alone(tmp_path, content):
    path = tmp_path / ".out.lock"
    path.write_bytes(content)
    with pytest.raises(Exception, match="not a lock file fastcifar wrote"):
        PidLock(path, lambda owner: RunInUse(str(owner))).acquire()
    assert path.read_bytes() == content


# --- property: two commands at once, and a user acting meanwhile --------------------------------------------


COMMANDS = {
    "prepare": ["prepare", "--source", "src", "--out", "{out}"],
    "prepare_force": ["prepare", "--source", "src2", "--out", "{out}", "--force"],
    "train": ["train", "r.toml", "--out", "{out}"],
    "resume": ["train", "r.toml", "--out", "{out}", "--resume"],
    "report": ["report", "run", "--out", "{out}/cmp.md"],
}
OUTS = ["new", "empty", "userdir", "store", "run", "late"]


@pytest.fixture(scope="module")
def box(store, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("race-template") / "box"
    make_image_folder(root / "src", 2, 1, "png", classes=CLASSES)
    make_image_folder(root / "src2", 2, 1, "png", classes=("a", "b", "c"))
    (root / "empty").mkdir()
    (root / "userdir").mkdir()
    (root / "userdir" / "thesis.tex").write_text("thesis")
    prepare_store(root / "src", root / "store", log=quiet)
    table = tiny_table(store, train={"epochs": 1}, data={"train_subset": 4}, model={"name": "cnn_bn", "width": 4})
    (root / "r.toml").write_text(recipe_to_toml(recipe_from_dict(table)))
    assert main(["train", str(root / "r.toml"), "--out", str(root / "run")]) == 0
    return root


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.sampled_from(sorted(COMMANDS)), second=st.sampled_from(sorted(COMMANDS)),
       out1=st.sampled_from(OUTS), out2=st.sampled_from(OUTS), delay=st.floats(0.0, 4.0))
def test_property_two_commands_at_once_and_a_user_touch_nothing_they_did_not_write(box, first, second, out1, out2,
                                                                                   delay):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "box"
        shutil.copytree(box, root, symlinks=True)
        before = {k: v for k, v in snapshot(root).items() if not k.startswith(("store/", "run/"))}
        procs = [_cli(*(a.format(out=o) for a in COMMANDS[c]), cwd=root)
                 for c, o in ((first, out1), (second, out2))]
        time.sleep(delay)
        (root / "late").mkdir(exist_ok=True)  # the user makes a folder at an --out path meanwhile
        (root / "late" / "mine.txt").write_text("mine")
        for p in procs:
            p.communicate(timeout=600)
        after = snapshot(root)
        changed = sorted(k for k, v in before.items() if after.get(k) != v)
        assert not changed, f"{first} {out1} + {second} {out2}: removed or changed {changed}"
        assert (root / "late" / "mine.txt").read_text() == "mine"
        assert [p.name for p in Path(tmp).iterdir()] == ["box"]


# --- outputs the user names: checked again at the rename --------------------------------------------------------


def test_atomic_guard_runs_at_the_rename_and_leaves_the_target_alone(tmp_path):
    from fastcifar.atomic import atomic_open, write_text
    from fastcifar.ownership import NotOurs

    target = tmp_path / "out.md"

    def guard():
        if target.exists():
            raise NotOurs("not ours")

    with pytest.raises(NotOurs):
        with atomic_open(target, "w", guard) as f:
            f.write("ours")
            target.write_text("mine")  # the user's file lands while ours is being written
    assert target.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["out.md"]
    target.unlink()
    write_text(target, "ours", guard)
    assert target.read_text() == "ours"


@pytest.fixture(scope="module")
def trained(box) -> Path:
    return box / "run"


def test_report_out_made_by_the_user_meanwhile_is_not_replaced(trained, tmp_path, monkeypatch, capsys):
    import fastcifar.report as report_mod

    out = tmp_path / "cmp.md"
    real = report_mod._compare_rows

    def rows(runs):
        out.write_text("# mine\n")  # the user writes their file while the comparison is made
        return real(runs)

    monkeypatch.setattr(report_mod, "_compare_rows", rows)
    assert main(["report", str(trained), str(trained), "--out", str(out)]) == 2
    assert "not a run comparison fastcifar wrote" in one_error(capsys) and out.read_text() == "# mine\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cmp.md"]


def test_export_out_made_by_the_user_meanwhile_is_not_replaced(trained, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    import fastcifar.export as export_mod

    out = tmp_path / "m.onnx"
    real = export_mod.sample_images

    def images(*args, **kwargs):
        out.write_bytes(b"my model")
        return real(*args, **kwargs)

    monkeypatch.setattr(export_mod, "sample_images", images)
    assert main(["export", str(trained / "checkpoints" / "best.pt"), "--out", str(out)]) == 2
    assert "not a onnx export fastcifar wrote" in one_error(capsys) and out.read_bytes() == b"my model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_bench_json_made_by_the_user_meanwhile_is_not_replaced(box, tmp_path, monkeypatch, capsys):
    import fastcifar.bench.model_bench as bench_mod

    out = tmp_path / "numbers.json"
    real = bench_mod.run_model_bench

    def bench(*args, **kwargs):
        out.write_text('{"mine": 1}')
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_mod, "run_model_bench", bench)
    args = ["bench", "--data", str(box / "store"), "--model", "cnn_bn", "--batch", "4", "--repeats", "1",
            "--warmup", "0", "--seconds", "0.2", "--json", str(out)]
    assert main(args) == 2
    assert "not a bench result fastcifar wrote" in one_error(capsys) and out.read_text() == '{"mine": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["numbers.json"]
