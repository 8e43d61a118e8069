"""Fail before starting, or leave a run that --resume can finish: every refusal is one short line, before the
run folder exists; a failing figure or report never loses the model or result.json."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_table
from fastcifar.cli import MAX_ERROR, main
from fastcifar.data.readers import Dataset
from fastcifar.data.store import _write_store
from fastcifar.ownership import write_marker
from fastcifar.recipe import recipe_from_dict, recipe_to_toml
from fastcifar.report import ReportError, load_run
from synth import make_image_folder

SMALL = {"train": {"epochs": 1, "batch_size": 8}, "data": {"train_subset": 4}, "model": {"name": "cnn_bn", "width": 4}}


def write_recipe(path, store, **sections):
    table = tiny_table(store, **{k: {**SMALL.get(k, {}), **v} for k, v in {**SMALL, **sections}.items()})
    path.write_text(recipe_to_toml(recipe_from_dict(table)))
    return path


def refused(capsys, args, out) -> str:
    """The command exits 2 with one short line and leaves no run folder behind."""
    assert main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastcifar: error: ") and "\n" not in err and len(err) < MAX_ERROR + 40, err
    assert "Traceback" not in err and " at 0x" not in err
    assert not out.exists(), f"{out} was created"
    return err


@pytest.mark.parametrize("override,expect", [
    ('eval.gradcam_layer="features.99"', "eval.gradcam_layer: 'features.99' not found"),
    ('eval.gradcam_layer="24"', "eval.gradcam_layer: '24' outputs [2, 10], not a (N, C, H, W) feature map"),
    ("split.k=25", "split.k: 25 folds need at least 25 images of every class in the pool, but class"),
    ("train.batch_size=512", "train.batch_size: 512 is more than fold 0's 40 training images"),
    ('split.kind="holdout"', None),  # a valid split, for contrast: must train
    ("split.val_fraction=0.001", None),
    ("train.seed=18446744073709551616", "train.seed: must fit in 64 bits"),
    ("train.seed=18446744073709551615", "train.seed: must fit in 64 bits"),
    ("train.seed=4294967296", "train.seed: must be in [0, 4294967295]"),
    ("train.threads=100000000000000000000", "train.threads: must fit in 64 bits"),
    ("split.seed=-1", "split.seed: must be in [0, 4294967295]"),
    ("model.width=100000000", "model.width: cnn_bn with width 100000000 has"),
    ('model.name="resnet18"', None),
])
def test_refused_before_the_run_folder_exists(store, tmp_path, capsys, override, expect):
    recipe = write_recipe(tmp_path / "r.toml", store, eval={"figures": True}, split={"k": 5, "pool": "train"},
                          data={"train_subset": 4})
    args = ["train", str(recipe), "--set", override]
    if override.startswith("split.val_fraction"):
        args += ["--set", 'split.kind="holdout"']
        expect = "split.val_fraction: 0.001 holds out no image"
    if override.startswith("split.k"):
        args += ["--set", 'split.kind="kfold"']
    if "resnet" in override:
        args += ["--set", "model.width=0"]
    if expect is None:
        assert main(args + ["--out", str(tmp_path / "ok"), "--set", "eval.figures=false"]) == 0
        return
    assert expect in refused(capsys, args, tmp_path / "run")


def test_images_too_small_for_the_model(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src, 4, 1, "png", classes=("a", "b"), size=8)  # 8x8: the smallest prepare stores
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "store")]) == 0
    recipe = write_recipe(tmp_path / "r.toml", tmp_path / "store", train={"batch_size": 4})
    err = refused(capsys, ["train", str(recipe), "--set", 'model.name="speedrun_net"'], tmp_path / "run")
    assert "model.name: speedrun_net cannot take the store's 8x8 images (Given input size:" in err
    err = refused(capsys, ["train", str(recipe), "--set", "augment.crop_padding=8"], tmp_path / "run")
    assert "augment.crop_padding: reflect padding 8 must be smaller than the image (8x8)" in err


def test_a_store_with_one_class_is_refused_at_prepare_and_at_train(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src, 2, 1, "png", classes=("only",))
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "never")]) == 2
    assert "holds 1 class (only); a classifier needs at least 2" in capsys.readouterr().err
    one = tmp_path / "one"  # a one-class store written some other way (e.g. an older fastcifar)
    one.mkdir()
    write_marker(one, "store")
    x = np.zeros((8, 32, 32, 3), np.uint8)
    _write_store(one, Dataset("image-folder", ["only"], x, np.zeros(8, np.int64), x[:2], np.zeros(2, np.int64)),
                 {"path": "x", "kind": "image-folder", "sha256": "0"})
    recipe = write_recipe(tmp_path / "r.toml", one)
    assert "holds 1 class; a classifier needs at least 2" in refused(capsys, ["train", str(recipe)], tmp_path / "r")


def test_deeply_nested_toml_and_huge_values_are_one_short_line(store, tmp_path, capsys):
    deep = tmp_path / "deep.toml"
    deep.write_text("[train]\nepochs = " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in refused(capsys, ["train", str(deep)], tmp_path / "run")
    huge = write_recipe(tmp_path / "r.toml", store)
    huge.write_text(huge.read_text().replace('loader = "device"', f'loader = "{"x" * 10_000_000}"'))
    assert "train.loader: must be one of" in refused(capsys, ["train", str(huge)], tmp_path / "run")
    assert "nested too deeply" in refused(capsys, ["train", str(huge), "--set", "train.epochs=" + "[" * 5000],
                                          tmp_path / "run")


def test_class_names_matplotlib_cannot_parse_still_get_figures(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src, 4, 2, "png", classes=("$\\foo{", "b$c"))
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "store")]) == 0
    recipe = write_recipe(tmp_path / "r.toml", tmp_path / "store", eval={"figures": True}, train={"batch_size": 4})
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert "figures_error" not in result and "figures/confusion.png" in result["figures"]


def test_a_failing_figure_or_report_keeps_the_model_and_result(store, tmp_path, monkeypatch, capsys):
    import fastcifar.artifacts
    import fastcifar.run

    def broken(*_, **__):
        raise RuntimeError("font cache exploded")

    monkeypatch.setattr(fastcifar.artifacts, "write_figures", broken)
    monkeypatch.setattr(fastcifar.run, "write_report", broken)
    recipe = write_recipe(tmp_path / "r.toml", store, eval={"figures": True})
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "figures not written (font cache exploded)" in out and "fastcifar report" in out
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["figures_error"] == "font cache exploded" and "test_acc" in result
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file() and (tmp_path / "run" / "summary.json").is_file()
    monkeypatch.undo()
    assert main(["report", str(tmp_path / "run")]) == 0 and (tmp_path / "run" / "report.md").is_file()


def test_missing_beton_is_refused_before_the_run_folder(store, tmp_path, capsys, monkeypatch):
    import fastcifar.backends.ffcv as ffcv

    monkeypatch.setattr(ffcv, "require_ffcv", lambda *a: None)  # as if FFCV were installed
    recipe = write_recipe(tmp_path / "r.toml", store, train={"loader": "ffcv"})
    assert "no FFCV file" in refused(capsys, ["train", str(recipe)], tmp_path / "run")


JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["folds", "fold", "metrics", "val_acc", "test_acc", "recipe", "accuracy",
                                         "train_time_s", "classes", "per_class_accuracy", "split", "figures"]),
                        inner, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(summary=JSON, result=JSON)
def test_malformed_run_files_give_a_report_or_one_line(tmp_path_factory, summary, result):
    run = tmp_path_factory.mktemp("run")
    write_marker(run, "run")
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "result.json").write_text(json.dumps(result))
    (run / "metrics.csv").write_text("epoch,val_acc\n1,abc\n")
    from fastcifar.report import render_report

    try:
        render_report(load_run(run))
    except ReportError as e:
        assert "\n" not in str(e)


def test_deeply_nested_summary_json_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "run")
    (run / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["report", str(run)]) == 2
    assert "summary.json: corrupt JSON" in capsys.readouterr().err

