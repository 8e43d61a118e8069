"""End-to-end training on a tiny synthetic store: loss goes down, files appear, resume is exact, eval reports."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from conftest import tiny_table
from fastcifar.checkpoint import load_checkpoint
from fastcifar.cli import main
from fastcifar.context import Hooks
from fastcifar.errors import FastCifarError, RecipeError
from fastcifar.models import create_model
from fastcifar.recipe import recipe_from_dict, recipe_to_toml
from fastcifar.run import run_training
from fastcifar.step import EpochTotals, build_step
from resume import full_and_resumed
from synth import make_store

QUIET = Console(quiet=True)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_run_learns_and_writes_csv_and_checkpoints(tiny, store, tmp_path):
    run = tmp_path / "run"
    summary = run_training(tiny(train={"epochs": 4}, eval={"figures": True}), run, QUIET)
    rows = _rows(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s",
                            "img_per_s", "skipped_steps"}
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert summary["test_acc_mean"] > 0.3  # 10 classes: chance is 0.1
    assert (run / "recipe.toml").exists() and (run / "env.json").exists() and (run / "result.json").exists()
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert last["state"]["epoch"] == 4 and 1 <= best["epoch"] <= 4
    assert {"model", "optimizer", "scheduler", "loader", "torch_rng"} <= set(last)
    result = json.loads((run / "result.json").read_text())
    assert result["metrics"]["split"] == "test" and result["metrics"]["accuracy"] == pytest.approx(result["test_acc"])
    assert result["params"] > 0 and result["inference_ms_per_image"] > 0 and result["peak_memory_mb"] > 0
    for name in ("curves", "confusion", "samples", "predictions", "mistakes", "gradcam"):
        assert (run / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (run / "report.md").read_text()
    assert "figures/confusion.png" in report and "Cohen" in report
    # the official split validates on the test set: best.pt competed on the numbers it reports; the report says
    # so exactly when an earlier epoch than the last won
    assert result["selection"] == {"validations": 4, "on_reported_set": True, "last_validated_epoch": 4}
    note = (f"> Note: best.pt is epoch {result['best_epoch']}, not the last validated (4), picked by 4 validations "
            "on this same set, so these numbers are optimistic")
    assert (note in report) == (result["best_epoch"] != 4)


@pytest.mark.parametrize("epoch, step", [(0, 1), (1, None), (2, 3)], ids=["first-epoch", "epoch-end", "mid-epoch"])
def test_interrupted_and_resumed_run_ends_with_identical_weights(tiny, store, tmp_path, epoch, step):
    recipe = tiny(model={"name": "cnn_bn", "width": 8, "dropout": 0.2},
                  augment={"erasing_p": 0.5, "cutout": 6}, schedule={"name": "cosine", "warmup_epochs": 1.0})
    full, cut, _ = full_and_resumed(recipe, tmp_path, epoch, step)  # asserts identical weights
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_time_s", "img_per_s")} for r in rows]  # noqa
    assert strip(_rows(full / "metrics.csv")) == strip(_rows(cut / "metrics.csv"))


def test_existing_run_needs_resume_and_the_same_recipe(tiny, store, tmp_path):
    run_training(tiny(train={"epochs": 1}), tmp_path / "r", QUIET)
    with pytest.raises(FastCifarError, match="already holds a run; pass --resume"):
        run_training(tiny(train={"epochs": 1}), tmp_path / "r", QUIET)
    with pytest.raises(RecipeError, match=r"^optim\.lr: differs from the run's saved"):
        run_training(tiny(train={"epochs": 1}, optim={"lr": 0.01}), tmp_path / "r", QUIET, resume=True)
    # A finished run resumed is a no-op that reports the same result.
    again = run_training(tiny(train={"epochs": 1}), tmp_path / "r", QUIET, resume=True)
    assert again["folds"][0]["epochs_run"] == 1


def test_kfold_all_folds_table_and_finished_folds_kept(tiny, store, tmp_path):
    recipe = tiny(split={"kind": "kfold", "k": 3, "pool": "train+test"}, train={"epochs": 1})
    run = tmp_path / "kf"
    def stop_in_fold1(epoch, step):
        if (run / "fold1").exists():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(recipe, run, QUIET, hooks=Hooks(on_step=stop_in_fold1))
    done = (run / "fold0" / "result.json").stat().st_mtime_ns
    summary = run_training(recipe, run, QUIET, resume=True)
    assert (run / "fold0" / "result.json").stat().st_mtime_ns == done
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    assert "test_acc" not in summary["folds"][0]  # merged pool: no untouched test set
    # each fold reports the validation set that picked its best.pt; one validation each: no pick, no flattery
    assert [f["selection"] for f in summary["folds"]] == [{"validations": 1, "on_reported_set": True,
                                                          "last_validated_epoch": 1}] * 3
    assert "optimistic" not in (run / "report.md").read_text()
    lines = (run / "folds.csv").read_text().splitlines()
    assert lines[0].startswith("fold,val_acc") and lines[-2].startswith("mean,") and lines[-1].startswith("std,")
    assert summary["val_acc_std"] >= 0 and 0 <= summary["val_acc_mean"] <= 1


def test_single_fold_and_holdout_sizes(tiny, store, tmp_path):
    s = run_training(tiny(split={"kind": "kfold", "k": 4, "fold": 2}, train={"epochs": 1}), tmp_path / "a",
                     QUIET)
    assert [f["fold"] for f in s["folds"]] == [2] and (tmp_path / "a" / "fold2" / "result.json").exists()
    assert s["folds"][0]["selection"]["on_reported_set"] is False  # the official test set stays out of the pick
    s = run_training(tiny(split={"kind": "holdout", "val_fraction": 0.25}, train={"epochs": 2}),
                     tmp_path / "b", QUIET)
    assert "test_acc" in s["folds"][0]
    assert s["folds"][0]["selection"] == {"validations": 2, "on_reported_set": False, "last_validated_epoch": 2}
    assert "optimistic" not in (tmp_path / "b" / "report.md").read_text()


def test_early_stopping_fires_on_a_flat_metric(tiny, store, tmp_path):
    # lr ~ 0 on a model without BatchNorm: val accuracy never improves after epoch 1.
    recipe = tiny(model={"name": "softmax", "width": 0}, optim={"name": "sgd", "lr": 1e-12},
                  schedule={"name": "constant"}, train={"epochs": 10, "early_stopping_patience": 2})
    s = run_training(recipe, tmp_path / "es", QUIET)
    assert s["folds"][0]["stopped_early"] and s["folds"][0]["epochs_run"] == 3


@pytest.mark.parametrize("optim, schedule", [
    ({"name": "adam", "lr": 1e-3}, {"name": "step", "step_epochs": 1, "gamma": 0.5}),
    ({"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}, {"name": "onecycle", "max_lr": 3e-3}),
    ({"name": "sgd", "lr": 0.05, "momentum": 0.0}, {"name": "onecycle"}),
])
def test_optimizers_and_schedules_train(tiny, store, tmp_path, optim, schedule):
    s = run_training(tiny(optim={**optim, "nesterov": False}, schedule=schedule, train={"epochs": 2, "grad_clip": 1.0,
                                                                         "label_smoothing": 0.1, "amp": True}),
                     tmp_path / "o", QUIET)
    assert s["folds"][0]["val_loss"] < 10


@st.composite
def _tiny_schedules(draw) -> tuple[dict, int, int]:
    """(a recipe table, steps per epoch, epochs): every schedule and optimizer, 1-8 steps an epoch, 1-4 epochs,
    a fine-tuning stage, Lookahead, warm-up longer than the run, and pct_start values that put OneCycle's
    warm-up end exactly on a step (k / T: the divisions by zero)."""
    steps, epochs = draw(st.integers(1, 8)), draw(st.integers(1, 4))
    name = draw(st.sampled_from(["onecycle", "triangle", "cosine", "step", "constant"]))
    total = steps * (epochs - (head := draw(st.integers(0, epochs - 1))))
    pct = draw(st.one_of(st.sampled_from([k / t for t in range(1, total + 1) for k in range(1, t)] or [0.5]),
                         st.floats(0.01, 0.99)))
    schedule = {"name": name, "pct_start": pct, "anneal": draw(st.sampled_from(["cos", "linear"])),
                "cycle_momentum": draw(st.booleans()), "step_epochs": draw(st.integers(1, 3)),
                "warmup_epochs": 0.0 if name in ("onecycle", "triangle") else draw(st.sampled_from([0, 0.5, 1, 5])),
                "div_factor": draw(st.sampled_from([1.0, 5.0, 25.0])), "min_lr": draw(st.sampled_from([0, 1e-3]))}
    optim = {"name": draw(st.sampled_from(["sgd", "adam", "adamw", "muon"])), "lr": 0.05,
             "lookahead_every": draw(st.sampled_from([0, 1, 5]))}
    table = {"optim": optim, "schedule": schedule, "train": {"epochs": epochs},
             "finetune": {"head_epochs": head}, "model": {"name": "cnn", "width": 4}}
    return table, steps, epochs


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(_tiny_schedules())
def test_every_schedule_steps_through_any_tiny_number_of_steps(drawn):
    """Each stage's optimizer, scheduler and Lookahead as the trainer builds them (build_step), stepped through
    the whole run on a 2-image batch: no error, every step's learning rate finite and >= 0 (0.25 of 4 steps made
    OneCycleLR divide by zero at the first step)."""
    table, steps, epochs = drawn
    recipe = recipe_from_dict(table)
    model = create_model("cnn", num_classes=3, image_size=8, width=4)
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 2])
    head, threads = recipe.finetune.head_epochs, torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-image step on a shared 2-core box: 0.4 s with every thread, 13 ms with one
    try:
        for stage, n in ((1, head), (2, epochs - head)):
            if not n:
                continue
            runner = build_step(model, model, recipe, torch.device("cpu"), None, steps_per_epoch=steps,
                                stage=stage, log=lambda _: None)
            for i in range(steps * n):
                lrs = [g["lr"] for g in runner.optimizer.param_groups]  # the step's (after the last: unused)
                assert all(math.isfinite(lr) and lr >= 0 for lr in lrs), (stage, i, lrs)
                runner.step(x, y, EpochTotals.zeros(torch.device("cpu"), 0.0), i)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("steps, sets", [
    (4, ["schedule.name=onecycle", "schedule.pct_start=0.25"]),  # the 300-image SVHN case: 4 steps, 1 epoch
    (2, ["schedule.name=onecycle", "schedule.pct_start=0.5", "optim.lookahead_every=1"]),
    (3, ["schedule.name=triangle", "schedule.pct_start=0.3333333333333333"]),
    (1, ["schedule.name=cosine", "schedule.warmup_epochs=3"]),  # warm-up longer than the run
    (2, ["schedule.name=step", "schedule.step_epochs=1", "train.epochs=2", "finetune.head_epochs=1"]),
    (1, ["schedule.name=constant", "train.epochs=2", "optim.name=muon"]),
])
def test_a_run_of_a_few_steps_trains_with_any_schedule(store, tmp_path, capsys, steps, sets):
    """The CLI trains it, 1 to 4 steps an epoch (240 images at a batch of 240 / steps), to a result."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_to_toml(recipe_from_dict(tiny_table(store, train={"epochs": 1}))))
    args = [f"--set=train.batch_size={240 // steps}", *(f"--set={s}" for s in sets)]
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), *args]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "result.json").exists()


def test_cli_eval_prints_accuracy_and_per_class_table(tiny, store, tmp_path, capsys):
    run_training(tiny(train={"epochs": 2}), tmp_path / "ev", QUIET)
    assert main(["eval", str(tmp_path / "ev" / "checkpoints" / "best.pt"), "--data", str(store)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert f"test accuracy {result['test_acc']:.2%}" in out
    for name in ("airplane", "truck"):
        assert name in out


def test_cli_train_says_when_best_pt_was_picked_on_the_test_set(tiny, tmp_path, capsys, monkeypatch):
    """Official split: validation is the test set. A falling score makes epoch 1 best.pt (picked on the test
    set: the note); a rising one makes the last epoch best.pt (nothing picked: no note)."""
    scores = iter([0.6, 0.5, 0.4, 0.5, 0.6])
    monkeypatch.setattr("fastcifar.train.evaluate", lambda *a, **k: {"loss": 1.0, "acc": next(scores)})
    (tmp_path / "r.toml").write_text(recipe_to_toml(tiny(train={"epochs": 2})))
    assert main(["train", str(tmp_path / "r.toml"), "--out", str(tmp_path / "falls")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert ("falls: best.pt is epoch 1, not the last validated (2), picked by 2 validations on this same set, so "
            "these numbers are optimistic for unseen images") in out
    assert "optimistic" in (tmp_path / "falls" / "report.md").read_text()
    assert main(["train", str(tmp_path / "r.toml"), "--out", str(tmp_path / "rises")]) == 0
    assert "optimistic" not in capsys.readouterr().out
    assert "optimistic" not in (tmp_path / "rises" / "report.md").read_text()


def test_cli_errors_are_one_line(store, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname = "cnn_bn"\ncolour = "blue"\n')
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastcifar: error: ") and "model.colour: unknown key" in err and "\n" not in err
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err
    evil = tmp_path / "evil.pt"
    torch.save({"format": "fastcifar-checkpoint", "f": print}, evil)
    assert main(["eval", str(evil)]) == 2
    assert "refused by weights-only loading" in capsys.readouterr().err
    out = tmp_path / "never"
    assert main(["train", "recipes/quickstart.toml", "--set", f'data.store="{tmp_path}/nostore"', "--out",
                 str(out)]) == 2
    assert "no prepared store" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    assert main(["train", "recipes/quickstart.toml", "--set", f'data.store="{store}"', "--set", "model.name=softmax",
                 "--set", "model.width=64", "--out", str(out)]) == 2
    assert "model.width: softmax has a fixed width" in capsys.readouterr().err
    assert not out.exists()


def test_eval_refuses_truncated_and_mismatched_checkpoints(tiny, store, tmp_path, capsys):
    run_training(tiny(train={"epochs": 1}), tmp_path / "r", QUIET)
    best = tmp_path / "r" / "checkpoints" / "best.pt"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    assert main(["eval", str(cut), "--data", str(store)]) == 2
    assert "cut.pt: truncated or corrupt checkpoint" in capsys.readouterr().err
    other = make_store(tmp_path / "seven", 3, 2, num_classes=7)
    assert main(["eval", str(best), "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "best.pt: trained on classes ['airplane'" in err and "holds ['class00'" in err and "\n" not in err
    ckpt = torch.load(best, weights_only=True)
    ckpt["recipe"]["model"]["name"] = "resnet9"  # weights of one model presented as another
    torch.save(ckpt, tmp_path / "swapped.pt")
    assert main(["eval", str(tmp_path / "swapped.pt"), "--data", str(store)]) == 2
    assert "swapped.pt: weights do not fit resnet9" in capsys.readouterr().err


def test_eval_every_validates_on_schedule_and_after_the_last_epoch(tiny, store, tmp_path):
    # eval.every = 2 over 5 epochs: epochs 2, 4 and the last (5); best.pt comes from those only
    run = tmp_path / "every2"
    summary = run_training(tiny(train={"epochs": 5}, eval={"every": 2, "figures": True}), run, QUIET)
    rows = _rows(run / "metrics.csv")
    assert [r["val_acc"] != "" for r in rows] == [False, True, False, True, True]
    assert all(r["train_loss"] for r in rows)  # training metrics every epoch
    assert summary["folds"][0]["best_epoch"] in (2, 4, 5)
    assert (run / "figures" / "curves.png").stat().st_size > 0  # the curves draw the validated epochs only
    # eval.every = 0: only after the last epoch, so the last epoch is the best
    assert summary["folds"][0]["selection"] == {"validations": 3, "on_reported_set": True, "last_validated_epoch": 5}
    last_only = run_training(tiny(train={"epochs": 3}, eval={"every": 0}), tmp_path / "every0", QUIET)
    assert [r["val_acc"] != "" for r in _rows(tmp_path / "every0" / "metrics.csv")] == [False, False, True]
    assert last_only["folds"][0]["best_epoch"] == 3
    # nothing was picked: the test numbers describe the last epoch's weights on unseen images
    assert last_only["folds"][0]["selection"] == {"validations": 1, "on_reported_set": True,
                                                  "last_validated_epoch": 3}
    assert "optimistic" not in (tmp_path / "every0" / "report.md").read_text()


def test_early_stopping_patience_counts_validations(tiny, store, tmp_path, monkeypatch):
    # Every validation scores the same: the first (epoch 2) is the best, the second (epoch 4) no improvement,
    # and patience 1 stops there, after 2 validation passes and 4 epochs.
    calls = []

    def same_score(*args, **kwargs):
        calls.append(1)
        return {"loss": 1.0, "acc": 0.5}

    monkeypatch.setattr("fastcifar.train.evaluate", same_score)
    recipe = tiny(train={"epochs": 8, "early_stopping_patience": 1}, eval={"every": 2})
    fold = run_training(recipe, tmp_path / "es", QUIET)["folds"][0]
    assert (fold["epochs_run"], fold["stopped_early"], fold["best_epoch"], len(calls)) == (4, True, 2, 2)


def test_eval_every_must_not_be_negative(tiny):
    with pytest.raises(RecipeError, match=r"^eval\.every: must be >= 0"):
        tiny(eval={"every": -1})
