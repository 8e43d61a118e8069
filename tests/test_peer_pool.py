"""bench/peer_pool.py: several peer_airbench results of one comparison pooled into one, or refused."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from boxes import bench_script
from fastcifar.bench import results_table


@pytest.fixture(scope="module")
def pp():
    return bench_script("peer_pool")


def result(first_seed: int, ours: list[tuple[float, float]], airbench: list[tuple[float, float]],
           ratio: float, **changes) -> dict:
    """A peer_airbench result as it writes them: (acc, acc_no_tta) per run, seeds first_seed, first_seed + 1..."""
    recipe = {"train": {"seed": first_seed, "epochs": 3, "batch_size": 1024}, "model": {"name": "speedrun_net"}}
    runs = lambda pairs: [{"acc": a, "acc_no_tta": b, "train_s": 500.0, "eval_s": 80.0} for a, b in pairs]  # noqa: E731
    d = {"device": "cpu", "tiny": False, "commit": "abc", "epoch_time_ratio": ratio,
         "store": {"path": "data/cifar10", "sha256": {"train_images.npy": "aa"}},
         "recipe": {"resolved": recipe, "overrides": []},
         "environment": {"device_name": "CPU: test", "load_avg": [1.0, 1.0, 1.0]},
         "ours": {"status": "ok", "runs": runs(ours)},
         "airbench": {"status": "ok", "runs": runs(airbench), "version": "0.1.8", "variant": "airbench94",
                      "epochs": 3.0, "batch_size": 1024, "train_images": 50000, "tta_level": 2, "mode": "fp32"}}
    for key, value in changes.items():  # "a__b": d["a"]["b"]
        *path, last = key.split("__")
        target = d
        for part in path:
            target = target[part]
        target[last] = value
    return d


def write(tmp_path: Path, name: str, d: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


def test_pools_every_run_of_both_sides_with_its_seed(pp, tmp_path):
    a = write(tmp_path, "a.json", result(0, [(0.85, 0.84), (0.86, 0.845)], [(0.84, 0.83), (0.85, 0.835)], 0.88))
    b = write(tmp_path, "b.json", result(2, [(0.83, 0.82)], [(0.86, 0.84)], 0.85))
    out = tmp_path / "pooled.json"
    assert pp.main([str(a), str(b), "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["kind"] == pp.KIND and d["ours"]["n"] == d["airbench"]["n"] == 3
    assert [r["seed"] for r in d["ours"]["runs"]] == [0, 1, 2]
    ours, ab = [0.85, 0.86, 0.83], [0.84, 0.85, 0.86]
    assert d["ours"]["acc_mean"] == pytest.approx(statistics.fmean(ours))
    assert d["airbench"]["acc_std"] == pytest.approx(statistics.stdev(ab))
    se = math.sqrt(statistics.variance(ours) / 3 + statistics.variance(ab) / 3)
    assert d["acc"] == pytest.approx({"delta": statistics.fmean(ours) - statistics.fmean(ab), "se": se})
    assert d["ours"]["acc_no_tta_mean"] == pytest.approx(statistics.fmean([0.84, 0.845, 0.82]))
    assert d["epoch_time_ratio"] == {"per_source": [0.88, 0.85], "max": 0.88}
    assert [s["seeds"] for s in d["sources"]] == [[0, 1], [2]]
    # the README table shows it as one row, built from the file
    cells = results_table.row(out)
    assert cells[2] == "speedrun vs airbench, pooled" and "n=3 seeds" in cells[4] and "0.85–0.88" in cells[4]


@pytest.mark.parametrize("changes, says", [
    ({"recipe__resolved__train__seed": 1}, "seed 1 was already run"),
    ({"recipe__resolved__train__epochs": 4}, "recipe (apart from train.seed) differs"),
    ({"store__sha256": {"train_images.npy": "bb"}}, "store (sha256 of its arrays) differs"),
    ({"recipe__resolved__augment": {"cutout_mode": "inside"}}, "recipe (apart from train.seed) differs"),
    ({"recipe__resolved__train__epochs": -1}, "its resolved recipe does not load: train.epochs"),
    ({"device": "cuda"}, "device differs"),
    ({"airbench__epochs": 9.9}, "airbench epochs 9.9 differs"),
    ({"tiny": True}, "a --tiny smoke run"),
    ({"ours__status": "not run"}, "ours: no completed runs"),
])
def test_refuses_files_of_another_comparison_in_one_line(pp, tmp_path, capsys, changes, says):
    a = write(tmp_path, "a.json", result(0, [(0.85, 0.84), (0.86, 0.845)], [(0.84, 0.83), (0.85, 0.835)], 0.88))
    b = write(tmp_path, "b.json", result(2, [(0.83, 0.82)], [(0.86, 0.84)], 0.85, **changes))
    out = tmp_path / "pooled.json"
    assert pp.main([str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "b.json" in err and "Traceback" not in err
    assert not out.exists()


def test_a_key_added_since_with_its_default_is_the_same_recipe(pp, tmp_path):
    # a file written before augment.cutout_mode existed pools with one that records its default
    a = write(tmp_path, "a.json", result(0, [(0.85, 0.84)], [(0.84, 0.83)], 0.88))
    b = write(tmp_path, "b.json", result(1, [(0.83, 0.82)], [(0.86, 0.84)], 0.85,
                                         recipe__resolved__augment={"cutout_mode": "centre"}))
    assert pp.main([str(a), str(b)]) == 0


def test_never_writes_over_an_existing_file(pp, tmp_path, capsys):
    a = write(tmp_path, "a.json", result(0, [(0.85, 0.84)], [(0.84, 0.83)], 0.88))
    b = write(tmp_path, "b.json", result(1, [(0.83, 0.82)], [(0.86, 0.84)], 0.85))
    out = tmp_path / "mine.json"
    out.write_text("keep me")
    assert pp.main([str(a), str(b), "--out", str(out)]) == 2
    assert "exists; not overwriting" in capsys.readouterr().err and out.read_text() == "keep me"


def test_benchmark_result_names_never_reuse_an_existing_file(tmp_path):
    """peer_airbench and the suite name results <date>-<device>[-N]: a second run the same day keeps the first."""
    from fastcifar.bench.env import free_stem
    from fastcifar.bench.suite import result_paths

    assert free_stem(tmp_path, "2026-12-03-cpu-speedrun") == "2026-12-03-cpu-speedrun"
    (tmp_path / "2026-12-03-cpu-speedrun.json").write_text("first")
    assert free_stem(tmp_path, "2026-12-03-cpu-speedrun") == "2026-12-03-cpu-speedrun-2"
    json_path, md_path = result_paths(tmp_path, "CPU: Test")
    json_path.with_suffix(".md").write_text("a markdown file alone still takes the name")
    again, _ = result_paths(tmp_path, "CPU: Test")
    assert again.name == json_path.name.replace(".json", "-2.json") and md_path.suffix == ".md"
