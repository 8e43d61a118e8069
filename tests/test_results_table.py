"""The README results table is generated from bench/results/*.json only."""

import json

from fastcifar.bench import results_table as RT


def _loader_result(path, img_s=60000.0, ratio=20.0):
    env = {"date": "2026-11-22T19:00:00+00:00", "device_name": "NVIDIA H100 80GB HBM3",
           "command": "fastcifar bench loader --json x.json"}
    rows = [{"preset": "crop+flip", "loader": "fastcifar", "img_s": img_s, "ratio_vs_seeds": ratio},
            {"preset": "crop+flip", "loader": "seeds", "img_s": img_s / ratio, "ratio_vs_seeds": 1.0}]
    path.write_text(json.dumps({"kind": "fastcifar-bench", "what": "loader", "environment": env, "rows": rows}))


def test_table_lists_each_result_file_with_its_command_and_figures(tmp_path):
    _loader_result(tmp_path / "a.json")
    (tmp_path / "junk.json").write_text("{not json")
    text = RT.table(tmp_path)
    lines = text.splitlines()
    assert len(lines) == 3  # header, rule, one row: unreadable files are left out
    assert "NVIDIA H100 80GB HBM3" in lines[2] and "`fastcifar bench loader --json x.json`" in lines[2]
    assert "crop+flip: 60,000 img/s (20.0x the seeds' loader)" in lines[2]


def test_write_replaces_only_the_marked_block(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _loader_result(res / "a.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{RT.BEGIN}\nold table\n{RT.END}\noutro\n")
    assert RT.main(["--results", str(res), "--write", str(readme)]) == 0
    body = readme.read_text()
    assert body.startswith("intro\n") and body.endswith(f"{RT.END}\noutro\n") and "old table" not in body
    assert "60,000 img/s" in body
    readme.write_text("no markers\n")
    assert RT.main(["--results", str(res), "--write", str(readme)]) == 2


def test_empty_results_say_so(tmp_path):
    assert "no result files committed yet" in RT.table(tmp_path)


def test_a_pack_result_lists_its_packed_rows_with_their_ratios(tmp_path):
    env = {"date": "2026-12-06T16:00:00+00:00", "device_name": "CPU: AMD EPYC", "command": "fastcifar bench pack"}
    rows = [{"model": "cnn_bn", "precision": "fp32", "batch": 16, "k": 1, "packed_img_s": 100.0, "seq_img_s": 100.0,
             "ratio": 1.0, "mem_ratio": 1.0},
            {"model": "cnn_bn", "precision": "fp32", "batch": 16, "k": 5, "packed_img_s": 250.0, "seq_img_s": 100.0,
             "ratio": 2.5, "mem_ratio": 3.1},
            {"model": "resnet18", "precision": "fp32", "batch": 16, "k": 5, "note": "skipped: global time budget"}]
    (tmp_path / "p.json").write_text(json.dumps({"kind": "fastcifar-bench", "what": "pack", "environment": env,
                                                 "rows": rows}))
    line = RT.table(tmp_path).splitlines()[2]
    assert "| packed k-fold |" in line and "`fastcifar bench pack`" in line
    assert "cnn_bn fp32 b16 k=5: 250 img/s packed vs 100 sequential (2.50x, memory 3.10x)" in line
    assert "k=1" not in line and "resnet18" not in line  # the solo control and rows without figures add nothing


def _pooled(path, epochs):
    env = {"date": "2026-12-06T16:00:00+00:00", "device_name": "CPU: AMD EPYC", "command": "python bench/peer_pool.py"}
    side = {"n": 5, "acc_mean": 0.68, "acc_std": 0.006, "acc_no_tta_mean": 0.67, "acc_no_tta_std": 0.005}
    path.write_text(json.dumps({"kind": "peer-airbench-pooled", "environment": env, "epochs": epochs, "ours": side,
                                "airbench": {**side, "acc_mean": 0.677}, "acc": {"delta": 0.003, "se": 0.0038},
                                "acc_no_tta": {"delta": 0.0, "se": 0.0036},
                                "epoch_time_ratio": {"per_source": [0.9, 1.1]}}))


def test_a_pooled_result_gives_both_sides_and_the_difference_with_its_standard_error(tmp_path):
    _pooled(tmp_path / "e1.json", 1)
    line = RT.table(tmp_path).splitlines()[2]
    assert "| speedrun vs airbench, pooled |" in line
    assert ("1 epoch, n=5 seeds; TTA: ours 68.00% ± 0.60%, airbench 67.70% ± 0.60%, ours - airbench +0.30 ± 0.38 pp"
            in line)
    assert "no TTA: ours 67.00% ± 0.50%" in line and "epoch-time ratio ours/airbench 0.90–1.10" in line
    _pooled(tmp_path / "e1.json", 2)
    assert "2 epochs, n=5 seeds" in RT.table(tmp_path)
