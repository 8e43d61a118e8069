"""bench/peer_records.py: the current records (airbench94_muon, Hiverge) run unchanged beside our recipe at equal
optimizer steps; the CPU shim that lets their CUDA fp16 code run here; train.steps, which makes equal steps
possible at their fractional epochs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from boxes import bench_script
from fastcifar.bench.peers import PEERS, CpuRedirect, load_peer, peer_on_cpu, peer_steps
from fastcifar.checkpoint import load_checkpoint
from fastcifar.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pr():
    return bench_script("peer_records")


def test_peer_facts_are_what_the_files_say(peers_dir):
    """PEERS' batch, epochs and TTA are read off the files: if a peer file changes, this fails, not a comparison."""
    ab = (peers_dir / PEERS["airbench94_muon"].path).read_text()
    assert "    batch_size = 2000\n" in ab and "total_train_steps = ceil(8 * len(train_loader))" in ab
    hv = (peers_dir / PEERS["hiverge"].path).read_text()
    assert "training_batch_size = 1536" in hv and "total_train_steps = ceil(7.59 * len(train_loader))" in hv
    assert "UNCERTAIN_QUANTILE = 0.25" in hv
    assert peer_steps(PEERS["hiverge"], 50_000) == 243 and peer_steps(PEERS["airbench94_muon"], 50_000) == 200


def test_loading_a_peer_runs_its_definitions_not_its_training(peers_dir):
    saved = (torch.compile, torch.cuda.Event, torch.cuda.synchronize, torch.load, torch.nn.Module.cuda,
             torch.backends.cudnn.benchmark)
    module = load_peer(peers_dir / PEERS["hiverge"].path, cpu=True)
    assert callable(module.main) and module.CIFAR_MEAN.dtype == torch.float32  # fp16 asked, fp32 given
    assert not hasattr(module, "results")  # its __main__ block (200 runs) did not run
    assert (torch.compile, torch.cuda.Event, torch.cuda.synchronize, torch.load, torch.nn.Module.cuda,
            torch.backends.cudnn.benchmark) == saved


def test_cpu_redirect_turns_cuda_fp16_requests_into_cpu_fp32_or_bf16():
    with CpuRedirect(torch.bfloat16):
        a = torch.zeros(3, device="cuda", dtype=torch.half)
        b = torch.ones(2).cuda().half().pin_memory()
        net = torch.nn.Linear(2, 2).half()
    assert (a.device.type, a.dtype, b.dtype, net.weight.dtype) == ("cpu", torch.bfloat16, torch.bfloat16,
                                                                     torch.bfloat16)
    with peer_on_cpu():
        m = torch.nn.Linear(2, 2).cuda().half()
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev0.record()
        ev1.record()
        torch.cuda.synchronize()
        assert m.weight.dtype == torch.float32 and ev0.elapsed_time(ev1) >= 0
        assert torch.compile(len) is len and torch.compile(mode="max-autotune")(len) is len
    assert torch.zeros(1, dtype=torch.half).dtype == torch.float16  # nothing leaks out


def test_equal_steps_recipe(pr):
    from fastcifar.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "speedrun94_muon.toml")
    hv = pr.equal_steps(r, 243, 1536, 50_000)  # Hiverge: 7.59 epochs of 32 steps
    assert (hv.train.batch_size, hv.train.epochs, hv.train.steps) == (1536, 8, 243)
    ab = pr.equal_steps(r, 200, 2000, 50_000)  # airbench94_muon: 8 whole epochs of 25 steps
    assert (ab.train.batch_size, ab.train.epochs, ab.train.steps) == (2000, 8, 0)


def test_comparisons_pair_each_peer_with_ours_at_equal_steps_and_at_its_own(pr):
    def side(accs, train_s, steps, batch):
        runs = [{"acc": a, "acc_no_tta": a - 0.01, "train_s": train_s, "eval_s": 1.0} for a in accs]
        return {"steps": steps, "batch_size": batch, "runs": runs, **pr.stats(runs, pr.KEYS)}

    sides = {"hiverge": side([0.94, 0.942], 100.0, 243, 1536), "ours@hiverge": side([0.945, 0.943], 90.0, 243, 1536),
             "ours": side([0.95, 0.95], 120.0, 300, 1536)}
    c = pr.comparisons(sides, 50_000)
    assert set(c) == {"hiverge", "hiverge/own"} and c["hiverge"]["ours"] == "ours@hiverge"
    assert c["hiverge"]["acc"]["delta"] == pytest.approx(0.003) and c["hiverge"]["acc"]["se"] == pytest.approx(
        ((0.001 ** 2 * 2) / 2 + (0.001 ** 2 * 2) / 2) ** 0.5)
    assert c["hiverge"]["epoch_time_ratio"] == pytest.approx(0.9) and c["hiverge"]["steps"] == [243, 243]
    # at its own 300 steps ours trains 300 / 243 epochs' worth: the epoch time is per epoch of images
    assert c["hiverge/own"]["epoch_time_ratio"] == pytest.approx((120 / 300) / (100 / 243))


def test_result_file_is_only_rewritten_while_it_is_ours(pr, tmp_path):
    from fastcifar.errors import FastCifarError

    out = pr.OwnedResult(tmp_path / "r.json")
    out.write({"n": 1})
    out.write({"n": 2})  # our own file: rewritten
    (tmp_path / "r.json").write_text("someone else's")
    with pytest.raises(FastCifarError, match="changed by someone else"):
        out.write({"n": 3})
    assert (tmp_path / "r.json").read_text() == "someone else's"
    (tmp_path / "s.json").write_text("there first")
    with pytest.raises(FastCifarError):
        pr.OwnedResult(tmp_path / "s.json").write({"n": 1})


def test_peer_records_tiny_on_cpu(pr, store, tmp_path, peers_dir):
    """Both peers' own main() on the CPU (40 images, their batch shrunk to 40: 8 optimizer steps each) beside our
    recipe at the same 8 steps; the result file records every side, its steps and timing, and the comparisons."""
    originals = (torch.cuda.Event, torch.cuda.synchronize, torch.nn.Module.cuda, torch.compile, torch.load)
    out = pr.main(["--tiny", "--device", "cpu", "--store", str(store), "--out-dir", str(tmp_path), "--peers",
                   str(peers_dir), "--recipe", str(ROOT / "recipes" / "speedrun94_muon.toml"),
                   "--set", "model.width=8"])
    assert out.parent == tmp_path and out.name.endswith("-cpu-records-tiny.json")
    res = json.loads(out.read_text())
    assert (res["kind"], res["n"], res["tiny"], res["train_images"], res["timer"]) == ("peer-records", 1, True, 40,
                                                                                      "perf_counter")
    assert res["environment"]["device_name"] and len(res["environment"]["load_avg_end"]) == 3
    for name in PEERS:
        peer, ours = res["sides"][name], res["sides"][f"ours@{name}"]
        assert peer["status"] == "ok" and peer["mode"].startswith("their own code on the CPU in float32")
        assert peer["batch_overridden"] and peer["batch_size"] == 40
        (run,) = peer["runs"]
        assert run["steps"] == 8 and run["images"] == 320 and 0.0 <= run["acc"] <= 1.0
        assert run["time_s"] > run["eval_s"] > 0 and run["train_s"] > 0
        assert (ours["steps"], ours["batch_size"], ours["epochs"]) == (8, 40, 8)
        assert ours["runs"][0]["steps"] == 8 and ours["runs"][0]["train_s"] > 0
        c = res["comparisons"][name]
        assert c["steps"] == [8, 8] and c["epoch_time_ratio"] > 0 and set(c["acc"]) == {"delta", "se"}
    assert (torch.cuda.Event, torch.cuda.synchronize, torch.nn.Module.cuda, torch.compile, torch.load) == originals
    from fastcifar.bench import results_table

    cells = results_table.row(out)  # a committed records file gets its README row
    assert cells[2] == "records side by side (tiny)" and "ours@hiverge" in cells[4] and "at 8 / 8 steps" in cells[4]


# ---------------------------------------------------------------------------------------------- train.steps


def _tiny_run(store: Path, out: Path, *sets: str) -> int:
    base = [f'data.store="{store}"', "model.width=8", "train.batch_size=32", "optim.lookahead_every=2",
            "train.compile=false", "train.amp=false", "eval.batch_size=80", "eval.every=0"]
    argv = ["train", str(ROOT / "recipes" / "speedrun94_muon.toml"), "--device", "cpu", "--out", str(out)]
    return cli(argv + [a for s in [*base, *sets] for a in ("--set", s)])


def test_train_steps_stop_inside_the_last_epoch(store, tmp_path):
    """240 images in batches of 32: 7 steps an epoch; train.steps = 10 stops 3 steps into epoch 2, and the
    schedule and Lookahead span those 10 steps."""
    assert _tiny_run(store, tmp_path / "run", "train.epochs=2", "train.steps=10") == 0
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["scheduler"]["last_epoch"] == 10 and last["lookahead"]["steps"] == 10
    assert last["scheduler"]["_last_lr"][0] == pytest.approx(0.08 * 0.07)  # the triangle's end value at step 10
    assert json.loads((tmp_path / "run" / "result.json").read_text())["epochs_run"] == 2


def test_train_steps_outside_the_last_epoch_is_refused_before_the_run(store, tmp_path, capsys):
    assert _tiny_run(store, tmp_path / "run", "train.epochs=2", "train.steps=20") != 0
    err = capsys.readouterr().err
    assert re.search(r"train\.steps: 20 steps at fold 0's 7 steps an epoch end in epoch 3; set train\.epochs = 3",
                     err) and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
