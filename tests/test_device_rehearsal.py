"""The device call, rehearsed on the CPU the way the lent GPU box runs it: a fresh copy of the tree plus the carried
folders, a Python that has the box's packages but not this checkout's install, no package index, and an empty
$OUT. Only what lands in $OUT would come back: the test checks that every stage's results are there, with their
environment block, and that nothing the call needed was written anywhere else."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from synth import make_archive, make_image_folder

REPO = Path(__file__).resolve().parents[1]
# What the call may leave in the tree: the store it prepares, build and cache output (none of it is a result).
BYPRODUCTS = ("data/cifar10-suite/", "fastcifar.egg-info/", "build/", ".pytest_cache/")


def _tree_copy(dest: Path) -> None:
    """Tracked files plus untracked ones git does not ignore, as the device tool copies a working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _box_python(venv: Path) -> Path:
    """A venv that sees this interpreter's packages through a .pth line (torch, pip, setuptools, ...) but not
    their .pth hooks, so this checkout's editable install stays invisible, as on the box."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "box-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv / "bin" / "python"


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_device_call_rehearsal_brings_every_result_back_in_out(tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "out"
    _tree_copy(tree)
    src = tmp_path / "images"
    make_image_folder(src, 12, 4, "png")  # 10 classes of 32 px, as airbench and speedrun94 need
    (tree / "carry" / "data").mkdir(parents=True)
    make_archive(src, tree / "carry" / "data" / "cifar10-jpeg.tar.gz")
    out.mkdir()
    before = _files(tree)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(OUT=str(out), BENCH_QUICK="1", PIP_NO_INDEX="1", PYTHON=str(_box_python(tmp_path / "box")),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "bench/device_suite.sh"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=420)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]

    stages = dict(line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines())
    assert stages == {"install": "0", "preflight": "0", "prepare": "0", "cuda tests": "0", "peer": "0",
                      "suite": "0"}, stages
    assert "pip install failed" not in log  # the offline install itself works
    names = sorted(p.name for p in out.iterdir())
    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["kind"] == "fastcifar-device-preflight" and preflight["facts"]["python"]
    (peer,) = out.glob("*-cpu-speedrun-tiny.json")
    (suite_json,) = [p for p in out.glob("*.json") if json.loads(p.read_text()).get("kind") == "fastcifar-bench-suite"]
    suite = json.loads(suite_json.read_text())
    assert suite["environment"]["device_name"] and suite_json.name[len("YYYY-MM-DD-"):].startswith("cpu")
    assert json.loads(peer.read_text())["environment"]["device_name"] == suite["environment"]["device_name"]
    assert suite["seed_workload"]["seed_reported_hours"] == 178.0 and suite["loader"]["rows"]
    assert suite_json.with_suffix(".md").is_file() and "cuda-tests.xml" in names and "device_suite.log" in names
    assert 'tests="' in (out / "cuda-tests.xml").read_text()

    added = sorted(f for f in _files(tree) - before if not f.startswith(BYPRODUCTS))
    assert not added, f"written outside $OUT (lost on the box): {added}"
