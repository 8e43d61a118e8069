"""fastcifar bench --find-batch: the best measured img/s that fits, not the largest batch; the search on CUDA
(out of memory, the margin) and the CPU's bound, with the timing replaced by a known curve."""

import json
import math
import re

import torch
from rich.console import Console

from conftest import tiny_table
from fastcifar.bench import batch_finder
from fastcifar.bench.model_bench import Plan
from fastcifar.cli import main
from fastcifar.recipe import Recipe, recipe_from_dict, recipe_to_toml
from fastcifar.step import OutOfMemory

QUIET = Console(quiet=True)
PLAN = Plan(recipe=Recipe(name="bench"), models=["cnn_bn"], batches=[64], precisions=["fp32"])


def test_find_batch_picks_the_fastest_measured_batch(store, tmp_path, capsys):
    path = tmp_path / "r.toml"
    table = tiny_table(store)
    path.write_text(recipe_to_toml(recipe_from_dict(table)))
    out = tmp_path / "batch.json"
    rc = main(["bench", "--find-batch", "--recipe", str(path), "--data", str(store), "--batch", "16", "32", "64",
               "--seconds", "0.3", "--repeats", "1", "--warmup", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    timed = [r for r in result["rows"] if r.get("img_s")]
    assert [r["batch"] for r in timed] == [16, 32, 64] and all(r["fits"] for r in timed)
    fastest = max(timed, key=lambda r: r["img_s"])
    assert result["best"]["batch"] == fastest["batch"] and result["largest_fit"]["batch"] == 64
    assert all(r["peak_bytes"] > 0 for r in timed)  # measured peak resident memory
    text = " ".join(capsys.readouterr().out.split())
    assert f"--set train.batch_size={fastest['batch']}" in text


class FakeMemory:
    """A device whose peak grows by 1 MiB an image over a fixed 100 MiB."""

    def __init__(self, device, margin):
        self.device, self.margin, self.kind = device, margin, "fake"
        self.limit, self.last = 700 * 2**20, 0

    def start(self):
        pass

    def peak(self):
        return (100 + self.last) * 2**20


def _fake_rate(mem_holder, oom_above: int | None, best: int, calls: list):
    """img/s peaking at `best` (1000 / (1 + |log2(batch / best)|)), out of memory above `oom_above`."""
    def rate(store, device, plan, cell, log=print):
        calls.append(cell.batch)
        mem_holder[0].last = cell.batch
        if oom_above is not None and cell.batch > oom_above:
            raise OutOfMemory(f"out of memory at train.batch_size = {cell.batch}")
        return {"train_img_s": 1000.0 / (1 + abs(math.log2(cell.batch / best))), "train_img_s_spread": 1.0}

    return rate


def _run(monkeypatch, device: str, oom_above, best, candidates):
    holder, calls = [None], []

    def memory(dev, margin):
        holder[0] = FakeMemory(dev, margin)
        return holder[0]

    monkeypatch.setattr(batch_finder, "Memory", memory)
    monkeypatch.setattr(batch_finder, "training_rate", _fake_rate(holder, oom_above, best, calls))
    return batch_finder.find_batch(None, torch.device(device), PLAN, candidates, 0.1, log=lambda _: None), calls


def test_cuda_binary_search_finds_the_largest_fit_and_keeps_the_fastest(monkeypatch):
    # 600 MiB of images fit under the 700 MiB limit (100 MiB fixed); out of memory above 1000 images
    result, calls = _run(monkeypatch, "cuda", 1000, 256, [32, 64, 128, 256, 512, 1024])
    assert calls[:6] == [32, 64, 128, 256, 512, 1024]  # 1024: out of memory, the doubling stops
    assert result["largest_fit"]["batch"] == 600  # bisected between 512 and 1024, in multiples of 8
    assert all(b % 8 == 0 for b in calls) and 608 in calls  # 608 was tried: over the margin
    assert result["best"]["batch"] == 256  # the fastest, not the largest that fits
    notes = {r["batch"]: r["note"] for r in result["rows"]}
    assert notes[1024].startswith("out of memory") and notes[608] == "peak over the 90% limit"


def test_cpu_never_runs_a_batch_predicted_past_the_limit(monkeypatch):
    result, calls = _run(monkeypatch, "cpu", None, 4096, [64, 128, 256, 512, 1024])
    assert calls == [64, 128, 256, 512]  # 1024 would need 1124 MiB > 700: predicted from 256 -> 512, not run
    note = next(r["note"] for r in result["rows"] if r["batch"] == 1024)
    assert re.match(r"not run: predicted peak 1\.1 GiB over the limit", note)
    assert result["best"]["batch"] == 512


def test_cpu_stops_once_bigger_batches_stop_paying(monkeypatch):
    result, calls = _run(monkeypatch, "cpu", None, 64, [32, 64, 128, 256, 512])
    assert calls == [32, 64, 128, 256]  # 128 (500 img/s) and 256 (333) both under 90 % of 64's 1000: stop
    assert result["best"]["batch"] == 64 and result["largest_fit"]["batch"] == 256
