"""Small things users noticed (issue 24 item 9): figures that say what they show, the lr inside an epoch, run
comparisons that show how the recipes differ, bench lines that do not claim a GPU, eval --help."""

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fastcifar import figures
from fastcifar.bench.compare import print_comparison
from fastcifar.bench.table import env_line
from fastcifar.checkpoint import load_checkpoint
from fastcifar.cli import main
from fastcifar.run import run_training

ROOT = Path(__file__).resolve().parents[1]
QUIET = Console(quiet=True)


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The matplotlib figures the plot functions would save."""
    out: list = []
    monkeypatch.setattr(figures, "save_png", lambda fig, path: out.append(fig) or Path(path))
    return out


def test_row_normalised_confusion_shows_percent_in_cells_and_colour_bar(drawn, tmp_path):
    figures.plot_confusion([[8, 2], [1, 3]], ["cat", "dog"], tmp_path / "c.png")
    (fig,) = drawn
    heat_counts, heat_pct = fig.axes[0], fig.axes[1]
    bar_pct = fig.axes[3]
    assert [t.get_text() for t in heat_pct.texts] == ["80", "20", "25", "75"]
    assert heat_pct.images[0].get_clim() == (0.0, 100.0) and bar_pct.get_ylabel() == "% of true class"
    assert heat_pct.images[0].get_array()[0, 0] == pytest.approx(80.0)  # the colour is the number in the cell
    assert [t.get_text() for t in heat_counts.texts] == ["8", "2", "1", "3"] and fig.axes[2].get_ylabel() == "images"


def test_mistakes_and_predictions_say_true_then_predicted(drawn, tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    figures.plot_mistakes(images, labels, probs, ["cat", "dog"], tmp_path / "m.png")
    figures.plot_predictions(images, labels, probs.argmax(1), probs, ["cat", "dog"], tmp_path / "p.png")
    mistakes, predictions = drawn
    assert "true class → predicted class" in mistakes.get_suptitle()
    assert mistakes.axes[0].get_title() == "dog → cat (80%)"  # label 1 (dog) predicted 0 (cat)
    assert "true class → predicted class" in predictions.get_suptitle()


def test_the_lr_curve_has_points_inside_each_epoch_so_a_warm_up_shows(tiny, tmp_path, drawn):
    run_training(tiny(train={"epochs": 2}, schedule={"name": "cosine", "warmup_epochs": 1.0}), tmp_path / "r", QUIET)
    history = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["state"]["history"]
    first = history[0]["lr_steps"]  # 7 steps an epoch (240 images, batch 32): each one recorded
    assert len(first) == 7 and first[0][0] == pytest.approx(1 / 7) and first[-1][0] == pytest.approx(1.0)
    lrs = [v for _, v in first]
    assert lrs == sorted(lrs) and lrs[0] == pytest.approx(0.05 / 7)  # the linear warm-up, step by step
    assert history[1]["lr_steps"][0][0] == pytest.approx(1 + 1 / 7)
    figures.plot_curves(history, tmp_path / "curves.png")
    lr_axis = drawn[0].axes[2]
    (line,) = lr_axis.get_lines()
    assert len(line.get_xdata()) == 14 and min(line.get_xdata()) < 0.5 and lr_axis.get_xlim()[0] == 0.0


def test_report_of_two_runs_lists_the_recipe_keys_that_differ(tiny, tmp_path, capsys):
    run_training(tiny(train={"epochs": 1}), tmp_path / "a", QUIET)
    run_training(tiny(train={"epochs": 2, "label_smoothing": 0.1}), tmp_path / "b", QUIET)
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp.md")]) == 0
    text = (tmp_path / "cmp.md").read_text()
    section = text[text.index("## How the recipes differ"):]
    assert "| `train.epochs` | `1` | `2` |" in section and "| `train.label_smoothing` | `0.0` | `0.1` |" in section
    assert "`train.seed`" not in section and "`model.name`" not in section  # the same in both: not listed
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "same.md")]) == 0
    assert "Every key is the same in all recipes." in (tmp_path / "same.md").read_text()


def test_bench_header_names_the_cuda_build_only_as_such_without_a_gpu():
    env = {"device": "cpu", "device_name": "CPU: AMD EPYC", "cuda": "13.0", "torch": "2.14.1+cu130"}
    assert "torch built for CUDA 13.0; no GPU used" in env_line(env) and ", CUDA 13.0" not in env_line(env)
    assert ", CUDA 13.0," in env_line({**env, "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"})
    assert "CUDA" not in env_line({**env, "cuda": None})


def test_bench_compare_without_matching_rows_says_which_settings_differ(tmp_path, capsys):
    committed = ROOT / "bench" / "results" / "2026-11-22-cpu-2core-quickstart.json"
    mine = json.loads(committed.read_text())
    for row in mine["rows"]:
        row.update(batch=64, augment="crop+flip")  # `fastcifar bench` with its CPU defaults, not --recipe
    (tmp_path / "mine.json").write_text(json.dumps(mine))
    assert main(["bench", "--compare", str(tmp_path / "mine.json"), str(committed)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "no matching rows" in out and "augment crop+flip vs recipe:quickstart; batch 64 vs 256" in out
    pairs = print_comparison(mine, mine, QUIET)
    assert pairs  # the same settings still match


def test_eval_help_explains_its_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("a checkpoint written by fastcifar train", "--data STORE", "the store the run recorded",
                 "--device {auto,cpu,cuda,mps} where to evaluate", "--json [FILE]"):
        assert text in out
