"""Smoke runs (issue 24 item 6): data.eval_subset caps validation and test per class, and every number from a
capped set says so; the train command's closing lines (item 9: one line when validation is the test set)."""

import json

from fastcifar.cli import main
from conftest import tiny_table
from fastcifar.recipe import recipe_to_toml
from fastcifar.typed_toml import table_to_toml


def _train(tiny, tmp_path, capsys, **sections) -> tuple[int, list[str]]:
    (tmp_path / "r.toml").write_text(recipe_to_toml(tiny(**sections)))
    capsys.readouterr()
    code = main(["train", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run")])
    return code, [line for line in capsys.readouterr().out.splitlines() if "accuracy" in line]


def test_official_split_capped_says_on_n_of_m_test_images_in_one_line(tiny, tmp_path, capsys):
    code, lines = _train(tiny, tmp_path, capsys, train={"epochs": 1}, data={"eval_subset": 3})
    assert code == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    acc = f"{result['test_acc']:.2%}"
    # 8 test images per class in the fixture store: 3 of each = 30 of 80; validation is that same set
    assert lines == [f"{tmp_path / 'run'}: test accuracy {acc} on 30 of 80 test images (the official split "
                     "validates on the test set)"]
    assert (result["test_images"], result["test_images_total"], result["val_images"]) == (30, 80, 30)
    assert result["metrics"]["n"] == 30 and sum(map(sum, result["test_confusion"])) == 30
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"**test accuracy: {acc}** on 30 of 80 test images (data.eval_subset: not the whole set)" in report
    assert "## Final metrics (test set, 30 of 80 test images)" in report


def test_uncapped_official_split_prints_one_closing_line(tiny, tmp_path, capsys):
    code, lines = _train(tiny, tmp_path, capsys, train={"epochs": 1})
    assert code == 0 and len(lines) == 1 and "test accuracy" in lines[0] and " of " not in lines[0]
    assert "## Final metrics (test set, 80 images)" in (tmp_path / "run" / "report.md").read_text()


def test_holdout_caps_validation_and_test_separately(tiny, tmp_path, capsys):
    code, lines = _train(tiny, tmp_path, capsys, train={"epochs": 1}, data={"eval_subset": 2},
                         split={"kind": "holdout", "val_fraction": 0.25})
    assert code == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert (result["val_images"], result["val_images_total"]) == (20, 60)  # 6 held out per class, 2 kept
    assert lines[0].endswith(f"test accuracy {result['test_acc']:.2%} on 20 of 80 test images")
    assert lines[1].endswith(f"validation accuracy {result['val_acc']:.2%} on 20 of 60 validation images")


def test_a_negative_eval_subset_is_refused_before_the_run_folder_exists(store, tmp_path, capsys):
    (tmp_path / "r.toml").write_text(table_to_toml(tiny_table(store, data={"eval_subset": -1})))
    assert main(["train", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    assert "data.eval_subset: must be >= 0 (0 = all), got -1" in capsys.readouterr().err
