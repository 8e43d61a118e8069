"""Small hostile input must not exhaust the machine or hang it: decompression bombs, FIFOs, signals mid-prepare,
and what a killed prepare left behind."""

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fastcifar.data.archive as archive
from fastcifar.data import prepare_store
from fastcifar.data.archive import read_tree
from fastcifar.data.readers import wanted
from fastcifar.errors import DataError
from fastcifar.lifecycle import Interrupted, stop_raises
from fastcifar.ownership import write_marker
from fastcifar.predict import read_image
from synth import make_archive, make_image_folder

MIB = 2**20
CLI = [sys.executable, "-m", "fastcifar"]


def quiet(*_):
    pass


class _Zeros(io.RawIOBase):
    """n zero bytes, streamed: a bomb is built without holding it in memory."""

    def __init__(self, n: int):
        self.n = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.n)
        b[:k] = bytes(k)
        self.n -= k
        return k


def make_bomb(path: Path, member: str, size: int) -> Path:
    """An archive (by suffix) whose one member is `size` zero bytes: 300 MiB compress to about 300 KB."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            with zf.open(member, "w", force_zip64=True) as f:
                for _ in range(size // MIB):
                    f.write(bytes(MIB))
    else:
        with tarfile.open(path, "w:gz", compresslevel=1) as tf:
            info = tarfile.TarInfo(member)
            info.size = size
            tf.addfile(info, io.BufferedReader(_Zeros(size)))
    return path


# Measured from a small parent: a child forked from this (torch-laden) test process would count the parent's
# pages in its peak RSS until it execs.
# MEASURE_LIMIT_MIB caps the child's address space: a blow-up then fails fast with MemoryError instead of
# swapping, or inviting the OOM killer onto a shared machine.
MEASURE = """
import os, resource, subprocess, sys
limit = int(os.environ.get("MEASURE_LIMIT_MIB", "0")) * 2**20
cap = (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))) if limit else None
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=cap)
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.write(proc.stderr.read().decode())
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024)
"""


def run_measured(args: list[str], cwd: Path, limit_mib: int = 0) -> tuple[int, str, float]:
    """(exit code, stderr, peak resident MiB) of a CLI process, its address space capped at limit_mib if set."""
    env = {**os.environ, "MEASURE_LIMIT_MIB": str(limit_mib)}
    out = subprocess.run([sys.executable, "-c", MEASURE, *CLI, *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300, env=env)
    code, peak = out.stdout.split()
    return int(code), out.stderr, float(peak)


@pytest.mark.parametrize("name,member", [("bomb.zip", "train/a/x.png"), ("bomb.tar.gz", "train/a/x.png"),
                                         ("bomb.tar.gz", "readme.bin")])
def test_a_decompression_bomb_is_refused_before_it_costs_memory(tmp_path, name, member):
    bomb = make_bomb(tmp_path / name, member, 300 * MIB)
    assert bomb.stat().st_size < 2 * MIB
    code, err, peak = run_measured(["prepare", "--source", str(bomb), "--out", str(tmp_path / "store")], tmp_path)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "decompression bomb" in err or "over the 512 MiB" in err
    assert peak < 150, f"peak RSS {peak:.0f} MiB"  # the process itself is ~45 MiB; the member is never inflated
    assert not (tmp_path / "store").exists()


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_an_extreme_aspect_ratio_costs_no_more_than_its_output(tmp_path):
    # An 8 x 60000 PNG (1.5 KB) at --size 1024: resizing the whole image to a shorter side of 1024 before the
    # centre crop built a 1024 x 7,680,000 intermediate (24 GB; 7.7 GB peak for 8 x 6000). Only the centre square
    # is resampled now: the whole prepare stays near its ~170 MiB of imports and four 3 MiB images.
    for split in ("train", "test"):
        for c, colour in (("a", 0), ("b", 2)):
            arr = np.zeros((8, 60000, 3), np.uint8)
            arr[..., colour] = 200
            _png(tmp_path / "src" / split / c / "0.png", arr)
    assert (tmp_path / "src" / "train" / "a" / "0.png").stat().st_size < 4096
    code, err, peak = run_measured(["prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "store"),
                                    "--size", "1024"], tmp_path, limit_mib=2048)
    assert code == 0, err
    assert peak < 400, f"peak RSS {peak:.0f} MiB"
    assert (np.load(tmp_path / "store" / "train_images.npy")[0] == [200, 0, 0]).all()


def _png_1bit(path: Path, side: int) -> None:
    """A valid side x side 1-bit PNG written by hand: 10000 x 10000 (100 Mpx) in about 12 KB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + bytes(-(-side // 8))) * side
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                     + chunk(b"IEND", b""))


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path):
    make_image_folder(tmp_path / "src", 1, 1, "png", classes=("a", "b"))
    _png_1bit(tmp_path / "src" / "train" / "a" / "huge.png", 10000)  # PIL itself only warns below 179 Mpx
    assert (tmp_path / "src" / "train" / "a" / "huge.png").stat().st_size < 64 * 1024
    code, err, peak = run_measured(["prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "store"),
                                    "--size", "32"], tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    assert "huge.png: image is 10000x10000 (100 Mpx), over the 67 Mpx fastcifar decodes" in err
    assert peak < 150, f"peak RSS {peak:.0f} MiB"  # decoding it would take 300 MB as RGB
    with pytest.raises(DataError, match=r"huge.png: image is 10000x10000 \(100 Mpx\), over the 67 Mpx"):
        read_image(tmp_path / "src" / "train" / "a" / "huge.png", 32)  # predict reads files the same way


def test_one_member_is_capped(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "src", 1, 1, "png", classes=("a", "b"))
    make_archive(tmp_path / "src", tmp_path / "src.tar")
    monkeypatch.setattr(archive, "MEMBER_CAP", 64)  # a 32x32 PNG is ~3 KB
    with pytest.raises(DataError, match=r"src.tar: member 'test/a/0000.png' is 0 MiB, over the 0 MiB"):
        read_tree(tmp_path / "src.tar", wanted)


def test_unwanted_members_are_listed_but_never_read(tmp_path):
    make_image_folder(tmp_path / "src", 1, 1, "png", classes=("a", "b"))
    (tmp_path / "src" / "video.bin").write_bytes(bytes(5 * MIB))
    for name in ("src.tar.gz", "src.zip"):
        make_archive(tmp_path / "src", tmp_path / name)
        tree = read_tree(tmp_path / name, wanted)
        assert tree.files["video.bin"] is None and isinstance(tree.files["train/a/0000.png"], bytes)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_fifos_are_refused_not_read(tmp_path):
    make_image_folder(tmp_path / "src", 1, 1, "png", classes=("a", "b"))
    _fifo(tmp_path / "src" / "train" / "a" / "pipe.png")
    fifo_source = _fifo(tmp_path / "source.tar.gz")
    for source in (tmp_path / "src", fifo_source):  # each would block forever if opened
        proc = subprocess.run(CLI + ["prepare", "--source", str(source), "--out", str(tmp_path / "s")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "not a regular file" in proc.stderr and proc.stderr.count("\n") == 1


def test_predict_refuses_a_fifo(tmp_path):
    fifo = _fifo(tmp_path / "cat.png")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("read_image blocked on a FIFO"))
    signal.alarm(30)
    try:
        with pytest.raises(DataError, match="not a regular file"):
            read_image(fifo, 32)
    finally:
        signal.alarm(0)


# `fastcifar train ARGS` in a child whose address space may grow by 1 GiB at most once torch is imported: a
# recipe read to the end of /dev/zero fails there (MemoryError) instead of taking the machine's memory.
CAPPED_TRAIN = """
import resource, sys, torch
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))
from fastcifar.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_recipe_that_is_a_fifo_or_dev_zero_is_refused_at_once(tmp_path):
    """A FIFO blocked forever in open(); /dev/zero was read until memory ran out. Both: one line, exit 2, in
    seconds, before any run folder exists."""
    for recipe in (_fifo(tmp_path / "recipe.toml"), Path("/dev/zero")):
        proc = subprocess.run([sys.executable, "-c", CAPPED_TRAIN, str(recipe), "--out", str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr == (f"fastcifar: error: {recipe}: not a regular file (a FIFO, "
                                                        "socket or device); a recipe must be a file\n")
        assert not (tmp_path / "run").exists()


def test_a_recipe_is_capped_and_a_folder_is_named(tmp_path, capsys):
    from fastcifar.cli import main

    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (2 * MIB) + "\n")  # a comment: valid TOML, but no recipe is 2 MB
    assert main(["train", str(big)]) == 2
    assert capsys.readouterr().err == (f"fastcifar: error: {big}: 2,097,155 bytes, more than a recipe may hold "
                                       "(1,048,576)\n")
    assert main(["train", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"fastcifar: error: {tmp_path}: is a folder, not a recipe\n"


def test_bench_compare_refuses_a_fifo_and_dev_zero(tmp_path, capsys):
    from fastcifar.cli import main

    fifo = _fifo(tmp_path / "a.json")
    for path in (fifo, Path("/dev/zero")):
        assert main(["bench", "--compare", str(path), str(path)]) == 2
        assert capsys.readouterr().err == (f"fastcifar: error: {path}: not a regular file (a FIFO, socket or "
                                           "device); a bench result must be a file\n")


@pytest.fixture(scope="module")
def finished_run(store, tmp_path_factory) -> Path:
    """A finished 2-fold run and its recipe file (r.toml beside it)."""
    from rich.console import Console

    from conftest import tiny_table
    from fastcifar.recipe import recipe_from_dict, recipe_to_toml
    from fastcifar.run import run_training

    tmp = tmp_path_factory.mktemp("finished")
    recipe = recipe_from_dict(tiny_table(store, train={"epochs": 1}, split={"kind": "kfold", "k": 2}))
    (tmp / "r.toml").write_text(recipe_to_toml(recipe))
    run_training(recipe, tmp / "run", Console(quiet=True))
    return tmp / "run"


@pytest.mark.parametrize("name", ["data.json", "recipe.toml", "fold0/result.json", ".lock"])
def test_a_run_file_that_is_a_fifo_is_refused_not_read(finished_run, tmp_path, name):
    """Files a run reads back (a resume's data.json, recipe.toml and finished folds' result.json, the lock) or
    a report reads: a FIFO in their place blocked the reader forever; now one line naming it."""
    shutil.copy(finished_run.parent / "r.toml", tmp_path / "r.toml")
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    (run / name).unlink(missing_ok=True)
    _fifo(run / name)
    for command in (["train", str(tmp_path / "r.toml"), "--out", str(run), "--resume"], ["report", str(run)]):
        if command[0] == "report" and name in ("data.json", ".lock"):
            continue  # the report does not read them
        proc = subprocess.run(CLI + command, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith(f"fastcifar: error: {run / name}: not a regular "
                                                               "file (a FIFO, socket or device)"), proc.stderr
        assert proc.stderr.count("\n") == 1


def test_sigterm_during_prepare_is_one_line_and_leaves_nothing(tmp_path):
    make_image_folder(tmp_path / "src", 400, 1, "png")  # 4,000 PNGs: a few seconds of decoding
    proc = subprocess.Popen(CLI + ["prepare", "--source", "src", "--out", "store"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("reading")  # decoding has begun
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip() == "fastcifar: error: prepare stopped by SIGTERM; nothing was written (temp files removed)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_signal_while_writing_removes_the_temp_folder(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "src", 1, 1, "png", classes=("a", "b"))
    import fastcifar.data.store as store_mod

    real = store_mod.write_with

    def write_then_signal(path, writer):
        real(path, writer)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, between two arrays

    monkeypatch.setattr(store_mod, "write_with", write_then_signal)
    with pytest.raises(Interrupted) as e, stop_raises("prepare"):
        prepare_store(tmp_path / "src", tmp_path / "store", log=quiet)
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_a_killed_prepare_are_cleaned_and_only_those(tmp_path):
    make_image_folder(tmp_path / "src", 1, 1, "png", classes=("a", "b"))
    pid = _dead_pid()
    ours = tmp_path / f".store.tmp-{pid}-ab12cd34"
    ours.mkdir()
    write_marker(ours, "store")
    (ours / "train_images.npy").write_bytes(bytes(100))
    lookalike = tmp_path / f".store.tmp-{pid}-zz99zz99"  # the naming, but not our marker: the user's
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("mine")
    live = tmp_path / f".store.tmp-{os.getpid()}-ef56gh78"  # a prepare still running (this process)
    live.mkdir()
    write_marker(live, "store")
    logs: list[str] = []
    prepare_store(tmp_path / "src", tmp_path / "store", log=logs.append)
    assert not ours.exists() and (lookalike / "keep.txt").read_text() == "mine" and live.is_dir()
    assert any("left by a prepare that was killed" in line for line in logs)


def test_a_store_moved_aside_by_a_killed_swap_is_put_back(tmp_path):
    make_image_folder(tmp_path / "src", 1, 1, "png", classes=("a", "b"))
    prepare_store(tmp_path / "src", tmp_path / "store", log=quiet)
    aside = tmp_path / f".store.old-{_dead_pid()}-ab12cd34"
    os.rename(tmp_path / "store", aside)  # killed between the two renames of the swap
    logs: list[str] = []
    prepare_store(tmp_path / "src", tmp_path / "store", log=logs.append)
    assert not aside.exists() and any("restored" in line for line in logs)
    assert any("up to date" in line for line in logs)  # the restored store is the same source's: kept
    assert np.load(tmp_path / "store" / "train_labels.npy").tolist() == [0, 1]
