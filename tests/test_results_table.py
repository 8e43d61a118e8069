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
