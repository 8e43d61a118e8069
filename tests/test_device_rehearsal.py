"""The device call, rehearsed on the CPU the way the lent GPU box runs it: a fresh copy of the tree plus the carried
folders, a Python that has the box's packages but not this checkout's install, no package index, and an empty
$OUT. Only what lands in $OUT would come back: the test checks that every stage's results are there, with their
environment block, and that nothing the call needed was written anywhere else."""

import json
import os
import shutil
import subprocess
from pathlib import Path

from boxes import REPO, box_python, tree_copy
from fastcifar.bench.suite import listing
from synth import make_archive, make_image_folder

# What the call may leave in the tree: the store it prepares, build and cache output (none of it is a result).
BYPRODUCTS = ("data/cifar10-suite/", "fastcifar.egg-info/", "build/", ".pytest_cache/")
# ... and, from the second call, seed000_fast's run folder, kept in the tree so a later call resumes it.
RUN_FOLDER = "runs/seed000_fast/"


def _stage_peers(tree: Path) -> bool:
    """The record scripts where bench/stage_device.sh stages them (carry/peers), when this machine has them."""
    from fastcifar.bench.peers import PEERS, find_peers

    folder = find_peers(None, [REPO.parent / "shared" / "peers"])
    if folder is None:
        return False
    for spec in PEERS.values():
        dest = tree / "carry" / "peers" / spec.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / spec.path, dest)
    return True


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_device_call_rehearsal_brings_every_result_back_in_out(tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "out"
    tree_copy(tree)
    src = tmp_path / "images"
    make_image_folder(src, 12, 4, "png")  # 10 classes of 32 px, as airbench and speedrun94 need
    (tree / "carry" / "data").mkdir(parents=True)
    make_archive(src, tree / "carry" / "data" / "cifar10-jpeg.tar.gz")
    peers = _stage_peers(tree)
    out.mkdir()
    before = _files(tree)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    # BENCH_TOTAL_S: the quick call took ~45 s on 2 idle cores before the records stage (Hiverge's full-width net,
    # 8 steps, beside ours) was added, and several times that when they are busy
    env.update(OUT=str(out), BENCH_QUICK="1", PIP_NO_INDEX="1", PYTHON=str(box_python(tmp_path / "box")),
               OMP_NUM_THREADS="1", BENCH_TOTAL_S="480")
    log, stages = _call(tree, out, env, timeout=560)
    assert stages == {"install": "0", "preflight": "0", "prepare": "0", "cuda tests": "0", "records": "0",
                      "peer": "0", "suite": "0"}, stages
    assert "pip install failed" not in log  # the offline install itself works
    names = sorted(p.name for p in out.iterdir())
    preflight = json.loads((out / "preflight.json").read_text())
    assert preflight["kind"] == "fastcifar-device-preflight" and preflight["facts"]["python"]
    (peer,) = out.glob("*-cpu-speedrun-tiny.json")
    (records,) = out.glob("*-cpu-records-tiny.json")
    sides = json.loads(records.read_text())["sides"]
    assert sides["ours@hiverge"]["runs"] and (sides["hiverge"]["status"] == "ok") == peers
    if peers:  # Hiverge's own main() ran from the carried file, at the steps ours took
        assert sides["hiverge"]["runs"][0]["steps"] == sides["ours@hiverge"]["runs"][0]["steps"]
    (suite_json,) = [p for p in out.glob("*.json") if json.loads(p.read_text()).get("kind") == "fastcifar-bench-suite"]
    suite = json.loads(suite_json.read_text())
    assert suite["environment"]["device_name"] and suite_json.name[len("YYYY-MM-DD-"):].startswith("cpu")
    assert json.loads(peer.read_text())["environment"]["device_name"] == suite["environment"]["device_name"]
    assert suite["seed_workload"]["seed_reported_hours"] == 178.0 and suite["loader"]["rows"]
    pack = suite["pack"]["rows"]  # packed k-fold: k = 1 (the folds one after another) and 5
    assert [r["k"] for r in pack] == [1, 5] and all(r["packed_img_s"] > 0 and r["ratio"] > 0 for r in pack), pack
    assert "## Packed k-fold" in suite_json.with_suffix(".md").read_text()
    # The groups ran in the order `--list` gives (by the first 20 characters of their names: a log line may wrap).
    listed = "\n".join(listing(quick=True, cuda=False))
    ran = [line[3:].rsplit(" (", 1)[0][:20] for line in log.splitlines() if line.startswith("== ")]
    at = [listed.find(name) for name in ran]
    assert len(ran) == 3 and ran[1].startswith("packed k-fold") and -1 not in at and at == sorted(at), (listed, ran)
    assert suite_json.with_suffix(".md").is_file() and "cuda-tests.xml" in names and "device_suite.log" in names
    assert 'tests="' in (out / "cuda-tests.xml").read_text()

    added = sorted(f for f in _files(tree) - before if not f.startswith(BYPRODUCTS))
    assert not added, f"written outside $OUT (lost on the box): {added}"

    # The second call on the same (warm) box: seed000_fast alone; the store is reused, not prepared again.
    second = _second_call(tree, tmp_path / "out2", env)
    fold = json.loads((second / "seed000_fast" / "fold0" / "result.json").read_text())
    assert 0.0 <= fold["val_acc"] <= 1.0 and fold["figures"]  # the seed's figures came back
    assert not list(second.rglob("checkpoints")) and (tree / RUN_FOLDER / "fold0" / "checkpoints").is_dir()
    # A third call resumes the run in the tree: the finished fold is kept, not trained again.
    third = _second_call(tree, tmp_path / "out3", env)
    assert (third / "seed000_fast" / "fold0" / "result.json").read_bytes() == \
        (second / "seed000_fast" / "fold0" / "result.json").read_bytes()
    added = sorted(f for f in _files(tree) - before if not f.startswith((*BYPRODUCTS, RUN_FOLDER)))
    assert not added, f"written outside $OUT (lost on the box): {added}"


def _call(tree: Path, out: Path, env: dict[str, str], timeout: int, **extra: str) -> tuple[str, dict[str, str]]:
    """One device call into `out`: its log and stages.tsv as {stage: exit code}; the call must exit 0."""
    out.mkdir(exist_ok=True)
    proc = subprocess.run(["bash", "bench/device_suite.sh"], cwd=tree, env={**env, "OUT": str(out), **extra},
                          capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return log, dict(line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines())


def _second_call(tree: Path, out: Path, env: dict[str, str]) -> Path:
    log, stages = _call(tree, out, env, timeout=300, BENCH_ONLY="seed000_fast")
    assert stages == {"install": "0", "preflight": "0", "seed000_fast": "0"}, (stages, log[-3000:])
    assert "already prepared" in log
    return out


def test_an_unknown_bench_only_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "BENCH_ONLY": "suite"}
    proc = subprocess.run(["bash", "bench/device_suite.sh"], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "device_suite: error: BENCH_ONLY=suite: the only stage that runs alone is seed000_fast\n"
    assert not out.exists()
