"""Two-stage fine-tuning and one-factor-at-a-time sweeps."""

import csv

import pytest
import torch
from rich.console import Console

from conftest import tiny_table
from fastcifar.checkpoint import load_checkpoint
from fastcifar.context import Hooks
from fastcifar.errors import RecipeError
from fastcifar.models import build_model
from fastcifar.recipe import recipe_from_dict, recipe_to_toml
from fastcifar.run import run_training
from fastcifar.sweep import run_sweep, split_values
from resume import full_and_resumed

QUIET = Console(quiet=True)


def _init_weights(recipe):
    torch.manual_seed(recipe.train.seed * 1000)  # what train.build_fold does for fold 0
    return build_model(recipe, 10, 32, torch.device("cpu")).state_dict()


def test_stage_one_trains_only_the_head(tiny, tmp_path):
    recipe = tiny(finetune={"head_epochs": 1, "head_lr": 0.01}, train={"epochs": 3, "checkpoint_every": 1})
    init = _init_weights(recipe)
    snapshots = {}

    def snap(epoch):
        snapshots[epoch] = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt")

    s = run_training(recipe, tmp_path / "ft", QUIET, hooks=Hooks(on_epoch_end=snap))
    after1 = snapshots[1]["model"]
    conv = next(k for k in init if k.endswith("weight") and init[k].dim() == 4)
    head = [k for k in init if init[k].dim() == 2][-1]
    assert torch.equal(after1[conv], init[conv])  # backbone frozen in stage 1
    assert not torch.equal(after1[head], init[head])  # the head trained
    assert snapshots[1]["stage"] == 1 and snapshots[2]["stage"] == 2
    assert not torch.equal(snapshots[3]["model"][conv], init[conv])  # stage 2 trains everything
    assert s["folds"][0]["stage_boundary"] == 1
    lrs = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "ft" / "metrics.csv"))]
    assert lrs[0] == pytest.approx(0.01)


def test_two_stage_resume_across_the_boundary_is_exact(tiny, tmp_path):
    recipe = tiny(finetune={"head_epochs": 1, "head_lr": 0.01}, train={"epochs": 3})
    full_and_resumed(recipe, tmp_path, 1, 1)  # asserts identical weights across the stage boundary


def test_finetune_needs_a_second_stage():
    with pytest.raises(RecipeError, match=r"finetune\.head_epochs: must be < train\.epochs \(3\)"):
        recipe_from_dict({"finetune": {"head_epochs": 3}, "train": {"epochs": 3}})


def test_split_values_respects_brackets_and_quotes():
    assert split_values('0.0,0.1') == ["0.0", "0.1"]
    assert split_values('[0.1,0.2],[0.3, 0.4]') == ["[0.1,0.2]", "[0.3, 0.4]"]
    assert split_values('"a,b",c') == ['"a,b"', "c"]


def test_sweep_runs_each_factor_against_the_baseline(store, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(recipe_to_toml(recipe_from_dict(tiny_table(store, train={"epochs": 1}))))
    rows = run_sweep(str(path), [], ["train.label_smoothing=0.0,0.1", "augment.erasing_p=0.5"], tmp_path / "sw",
                     QUIET)
    assert [r["variant"] for r in rows] == ["baseline", "train.label_smoothing=0.1", "augment.erasing_p=0.5"]
    assert rows[0]["delta_pp"] == 0.0 and all(r["params"] > 0 and r["train_time_s"] > 0 for r in rows)
    assert rows[1]["delta_pp"] == pytest.approx(100 * (rows[1]["accuracy"] - rows[0]["accuracy"]))
    assert (tmp_path / "sw" / "train.label_smoothing=0.1" / "summary.json").exists()
    md = (tmp_path / "sw" / "sweep.md").read_text()
    assert "| baseline |" in md and "peak memory (MB)" in md
    assert len((tmp_path / "sw" / "sweep.csv").read_text().splitlines()) == 4


def test_sweep_refuses_a_bad_variant_before_running_anything(store, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(recipe_to_toml(recipe_from_dict(tiny_table(store))))
    with pytest.raises(RecipeError, match=r"optim\.lr: must be > 0"):
        run_sweep(str(path), [], ["train.label_smoothing=0.1", "optim.lr=0.1,-1"], tmp_path / "sw", QUIET)
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("values, line", [
    # two stores whose paths differ only where a folder name cannot follow: both would be data.store=_tmp_..._s
    ("{a}/s,{a}_s", "--vary: 'data.store={a}/s' and 'data.store={a}_s' would train into the same folder "),
    ("0.1,0.10", "--vary: 'optim.lr=0.10' is the same recipe as 'optim.lr=0.1'; give each value once"),
])
def test_sweep_variants_that_share_a_folder_are_refused_before_training(store, tmp_path, capsys, values, line):
    """Found only after the baseline and the first variant had trained (then: `differs from the run's saved
    recipe.toml`); now one line naming both values, and nothing written."""
    import shutil

    from fastcifar.cli import main

    a = tmp_path / "a"
    shutil.copytree(store, a / "s")
    shutil.copytree(store, tmp_path / "a_s")
    path = tmp_path / "r.toml"
    path.write_text(recipe_to_toml(recipe_from_dict(tiny_table(store, train={"epochs": 1}))))
    key = "data.store" if "{a}" in values else "optim.lr"
    vary = f"{key}={values.format(a=a)}"
    assert main(["sweep", str(path), "--vary", vary, "--out", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastcifar: error: {line.format(a=a)}") and err.count("\n") == 1, err
    assert not (tmp_path / "sw").exists()
