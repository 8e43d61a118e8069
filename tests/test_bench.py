"""`fastcifar bench`, `fastcifar bench loader`, --compare and the device suite, on the tiny synthetic store (CPU).

Speeds are never asserted (the box is shared); what is checked is that every row and field is there, positive
where measured, empty with a reason where it cannot be measured, and that FLOPs match a hand count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcifar.bench.compare import compare
from fastcifar.bench.env import gpu_family, peak_hbm_gbs, peak_tflops
from fastcifar.bench.flops import count_flops, flops_per_image
from fastcifar.bench.nvml import NvmlProbe
from fastcifar.bench.presets import PRESETS
from fastcifar.bench.timing import measure_latency, measure_rate
from fastcifar.cli import main

FAST = ["--device", "cpu", "--seconds", "0.1", "--warmup", "1", "--workers", "1"]


@pytest.fixture(scope="module")
def model_json(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "model.json"
    rc = main(["bench", "--data", str(store), "--model", "cnn_bn", "--batch", "16", "--serve-batch", "8",
               "--json", str(out), *FAST])
    assert rc == 0
    return out


def test_loader_bench_every_preset(store, tmp_path):
    out = tmp_path / "loader.json"
    assert main(["bench", "loader", "--data", str(store), "--batch", "32", "--json", str(out), *FAST]) == 0
    result = json.loads(out.read_text())
    env = result["environment"]
    for k in ("device_name", "torch", "torchvision", "cpu", "cpu_cores", "git_commit", "date", "python"):
        assert env[k] not in (None, ""), k
    rows = {(r["loader"], r["preset"]): r for r in result["rows"]}
    for preset in PRESETS:
        ours, seeds = rows[("fastcifar", preset)], rows[("seeds", preset)]
        assert seeds["img_s"] > 0 and seeds["img_s_repeats"] >= 3
        if ours["img_s"] is None:  # only a batched op module still missing may leave a preset out
            assert ours["note"].startswith("n/a (not available")
            continue
        assert ours["img_s"] > 0 and ours["img_s_spread"] >= 0
        assert ours["ratio_vs_seeds"] == pytest.approx(ours["img_s"] / seeds["img_s"])
        size = 224 if PRESETS[preset].resize else 32
        assert ours["shape"] == [3, size, size] and seeds["shape"] == [3, size, size]
        for lib in ("dali", "ffcv"):  # not installed here: the row says why in one line
            row = rows[(lib, preset)]
            assert row["img_s"] is not None or (row["note"].startswith("n/a") and "\n" not in row["note"])
        assert ours["gb_s"] is None  # the bandwidth figure is a CUDA one


def test_model_bench_fields(model_json):
    result = json.loads(model_json.read_text())
    assert result["what"] == "model" and result["environment"]["device"] == "cpu"
    (row,) = result["rows"]
    assert row["model"] == "cnn_bn" and row["precision"] == "fp32" and row["note"] == ""
    assert row["params"] == sum(p.numel() for p in __import__("fastcifar.models", fromlist=["x"])
                                .create_model("cnn_bn").parameters())
    assert 0 < row["flops_fwd_per_img"] < row["flops_fwdbwd_per_img"]
    for k in ("train_img_s", "model_only_img_s", "infer_img_s", "seeds_train_img_s", "ratio_vs_seeds",
              "train_tflops", "peak_mem_mb"):
        assert row[k] > 0, k
    for lat in ("lat_b1", "lat_serve"):
        assert 0 < row[f"{lat}_p50_ms"] <= row[f"{lat}_p99_ms"] and row[f"{lat}_calls"] >= 20
    assert row["serve_batch"] == 8
    for k in ("gpu_util_pct", "power_w", "nvml_mem_used_mb", "energy_j_per_1k_img", "mfu", "peak_tflops",
              "compile_s"):
        assert row[k] is None, k
    assert "CUDA-only" in row["nvml_note"] and "RSS" in row["peak_mem_source"]


def test_compare_prints_ratios(model_json, tmp_path, capsys):
    this = json.loads(model_json.read_text())
    other = json.loads(model_json.read_text())
    for r in other["rows"]:
        r["train_img_s"] /= 4
    other["environment"]["device_name"] = "another box"
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    pairs = compare(this, other)
    train = [p for p in pairs if p["metric"] == "train_img_s"]
    assert len(train) == 1 and train[0]["ratio"] == pytest.approx(4.0)
    assert all(p["ratio"] == pytest.approx(1.0) for p in pairs if p["metric"] != "train_img_s")
    capsys.readouterr()
    assert main(["bench", "--compare", str(model_json), str(other_path)]) == 0
    out = capsys.readouterr().out
    assert "4.00x" in out and "1.00x" in out and "another box" in out


def test_flops_match_a_hand_count():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(2, 8)
    # forward: 2 FLOPs per multiply-add: 2*B*in*out per layer = 2*2*8*4 + 2*2*4*2 (bias adds are not counted)
    assert count_flops(lin, x, backward=False) == 128 + 32
    # backward: layer 2 needs grad W and grad input (32 + 32); layer 1 only grad W (its input needs no grad): 128
    assert count_flops(lin, x, backward=True) == 160 + 32 + 32 + 128
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    xc = torch.randn(2, 3, 8, 8)
    per_out = 2 * 3 * 3 * 3  # 2 FLOPs x C_in x k x k per output element
    fwd = per_out * 2 * 4 * 8 * 8  # x B x C_out x H x W
    assert count_flops(conv, xc, backward=False) == fwd
    assert count_flops(conv, xc, backward=True) == 2 * fwd  # + grad W only
    assert flops_per_image(conv, xc) == (fwd / 2, 2 * fwd / 2)


def test_unknown_model_is_one_line_exit_2(store, capsys):
    assert main(["bench", "--data", str(store), "--model", "nope", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown model 'nope'" in err and "cnn_bn" in err


@pytest.mark.parametrize("content", [None, "{not json", '{"kind": "something else", "rows": []}'])
def test_bad_compare_file_is_one_line_exit_2(store, tmp_path, capsys, content):
    path = tmp_path / "other.json"
    if content is not None:
        path.write_text(content)
    # Checked before anything is timed: a bad file costs no benchmark time.
    assert main(["bench", "--data", str(store), "--compare", str(path), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err


def test_device_tables_and_probe():
    assert gpu_family("NVIDIA H100 80GB HBM3") == "H100 SXM" and gpu_family("NVIDIA H100 PCIe") == "H100 PCIe"
    assert gpu_family("NVIDIA H200") == "H200" and gpu_family("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu_family("NVIDIA GeForce RTX 4090") is None and peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0 and peak_tflops("NVIDIA H100 PCIe", "fp32") == 51.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "bf16") == 312.0 and peak_hbm_gbs("NVIDIA H200") == 4800.0
    assert peak_hbm_gbs("NVIDIA A100-SXM4-40GB") == 1555.0 and peak_hbm_gbs("some CPU") is None
    probe = NvmlProbe(torch.device("cpu"))
    probe.start()
    fields = probe.stop(100)
    assert fields["power_w"] is None and fields["energy_j_per_1k_img"] is None and "cpu" in fields["nvml_note"]


def test_timing_repeats_and_percentiles():
    cpu = torch.device("cpu")
    rate = measure_rate(lambda: 4, cpu, seconds=0.03, repeats=3, warmup=2)
    assert rate.repeats == 3 and rate.images % 4 == 0 and rate.lo <= rate.mean <= rate.hi
    lat = measure_latency(lambda: None, cpu, seconds=0.01, warmup=1, min_calls=25)
    assert lat.calls >= 25 and 0 <= lat.p50_ms <= lat.p99_ms


def test_pack_bench_rows_through_the_cli(store, tmp_path, capsys):
    """`fastcifar bench pack`: per model, one row per k with the packed and the sequential (solo, k = 1) img/s and
    peak memory, their ratios, and the same figures in the JSON, the Markdown and the printed table."""
    out, md = tmp_path / "pack.json", tmp_path / "pack.md"
    assert main(["bench", "pack", "--data", str(store), "--model", "cnn_bn", "mlp", "--batch", "8", "--k", "2", "1",
                 "--json", str(out), "--md", str(md), *FAST]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["what"] == "pack" and result["settings"]["ks"] == [1, 2]
    rows = result["rows"]
    assert [(r["model"], r["k"]) for r in rows] == [("cnn_bn", 1), ("cnn_bn", 2), ("mlp", 1), ("mlp", 2)]
    for r in rows:
        assert r["note"] == "" and r["batch"] == 8 and r["precision"] == "fp32"
        for key in ("packed_img_s", "seq_img_s", "ratio", "time_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["model"], r["k"], key)
        for key in ("packed_peak_mb", "seq_peak_mb"):  # RSS above the cell's start: 0 when nothing new was touched
            assert math.isfinite(r[key]) and r[key] >= 0, (r["model"], r["k"], key)
        assert r["packed_img_s_repeats"] == 3 and r["packed_img_s_images"] % (8 * r["k"]) == 0
        assert r["ratio"] == pytest.approx(r["packed_img_s"] / r["seq_img_s"])
        assert r["time_ratio"] == pytest.approx(r["k"] / r["ratio"])
        assert "peak RSS above the cell's start" in r["peak_mem_source"]
    for solo, packed in (rows[0:2], rows[2:4]):  # the sequential side is the solo (k = 1) measurement
        assert solo["ratio"] == 1.0 and solo["packed_img_s"] == solo["seq_img_s"] == packed["seq_img_s"]
        assert packed["seq_peak_mb"] == solo["packed_peak_mb"]
    text = md.read_text()
    assert "| model | px | prec | batch | compile | CL | k | packed img/s | sequential img/s | packed / seq |" in text
    assert text.count("| cnn_bn | 32 | fp32 | 8 |") == 2 and f"{rows[1]['ratio']:.2f}x" in text
    assert "packed k-fold" in printed and f"{rows[3]['ratio']:.2f}x" in printed
    pairs = compare(result, result)  # --compare matches pack rows on their configuration and k
    assert len(pairs) == 4 * 5 and {p["key"]["k"] for p in pairs} == {1, 2}


@pytest.mark.parametrize("args, message", [
    (["pack", "--model", "efficientnet_b2"], "--model: efficientnet_b2 cannot be packed (choose from"),
    (["pack", "--k", "0"], "--k: must be >= 1, got 0"),
    (["--k", "2"], "--k: the pack sizes of `fastcifar bench pack`; not with `bench model`"),
], ids=["unstackable", "zero", "not-pack"])
def test_pack_bench_refusals_are_one_line(store, capsys, args, message):
    assert main(["bench", *args, "--data", str(store), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fastcifar: error: {message}" or (len(err.splitlines()) == 1 and message in err), err


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak-RSS window is Linux's")
def test_a_peak_rss_window_leaves_the_process_peak_alone():
    """bench pack resets the kernel's peak resident set per cell (which getrusage follows down); the peak
    memory a run or a model-bench row reports stays the process's since it started."""
    from fastcifar.artifacts import peak_memory_mb, peak_rss_mb, reset_peak_rss

    big = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    before, _ = peak_memory_mb(torch.device("cpu"))
    del big
    start = reset_peak_rss()
    assert start is not None and peak_rss_mb() < before - 32  # the window forgot the 64 MiB
    assert peak_memory_mb(torch.device("cpu"))[0] >= before
