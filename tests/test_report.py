"""report: report.md from hand-written run directories (new, k-fold, old-style), comparisons, errors."""

import json
import re
import statistics
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcifar.cli import main
from fastcifar.errors import FastCifarError
from fastcifar.ownership import write_marker
from fastcifar.report import ReportError, combine_reports, selection_note, write_report

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RECIPE = 'name = "{name}"\n\n[model]\nname = "cnn_bn"\nwidth = 32\n'
PNG = b"\x89PNG\r\n\x1a\n"  # the report only checks that a figure exists, never decodes it
STORE_HASHES = {f"{split}_{kind}.npy": "ab12" * 16 for split in ("train", "test") for kind in ("images", "labels")}


def _metrics(acc: float, split: str = "test") -> dict:
    per = [acc + (i - 4.5) / 100 for i in range(10)]
    stat = {"micro": acc, "macro": acc - 0.01, "weighted": acc - 0.005, "per_class": per}
    return {"split": split, "accuracy": acc, "top5_accuracy": 0.99, "per_class_accuracy": per,
            "precision": stat, "recall": {**stat, "macro": acc - 0.02}, "f1": {**stat, "macro": acc - 0.03},
            "specificity": {"per_class": [0.98] * 10, "mean": 0.98}, "cohen_kappa": acc - 0.1,
            "balanced_accuracy": acc - 0.001, "auroc_macro": 0.995, "confusion": [[10] * 10] * 10,
            "log_loss": 0.3, "ece": 0.02, "n": 10000}


def _fold(d: Path, fold: int, acc: float, *, new: bool = True, test: bool = True,
          figures: tuple[str, ...] = ()) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    rows = ["epoch,train_loss,train_acc,val_loss,val_acc,lr,epoch_time_s,img_per_s,skipped_steps"]
    rows += [f"{e},1.0,0.5,0.9,{acc},0.1,10.0,{1000 * e},0" for e in (1, 2, 3)]  # mean img/s = 2000
    (d / "metrics.csv").write_text("\n".join(rows) + "\n")
    result = {"fold": fold, "best_epoch": 2 + fold, "epochs_run": 3, "stopped_early": False, "val_acc": acc,
              "val_loss": 0.4, "val_per_class_acc": [acc] * 10, "classes": CLASSES, "train_time_s": 30.0}
    if test:
        result.update(test_acc=acc, test_loss=0.35, test_per_class_acc=[acc] * 10, test_confusion=[[1] * 10] * 10)
    if new:
        result.update(metrics=_metrics(acc, "test" if test else "val"), params=123456,
                      inference_ms_per_image=0.5, peak_memory_mb=None, stage_boundary=None)
    (d / "result.json").write_text(json.dumps(result))
    if figures:
        (d / "figures").mkdir()
        for name in figures:
            (d / "figures" / name).write_bytes(PNG)
    return result


def _run(d: Path, name: str, results: list[dict], device: str = "cpu", **env) -> Path:
    write_marker(d, "run")  # as start_run does: a report is written only into fastcifar's own run folders
    (d / "recipe.toml").write_text(RECIPE.format(name=name))
    (d / "env.json").write_text(json.dumps({"python": "3.12.1", "platform": "Linux", "torch": "2.5.0",
                                            "torchvision": "0.20.0", "numpy": "2.1", "cpu_count": 2,
                                            "torch_threads": 2, "device": device, "git_commit": None,
                                            "store": {"path": "data/cifar10", "sha256": STORE_HASHES,
                                                      "source": {"kind": "folder", "path": "x", "sha256": "cd34"}},
                                            **env}))
    accs = [r["val_acc"] for r in results]
    (d / "summary.json").write_text(json.dumps({"folds": results, "recipe": name,
                                                "val_acc_mean": statistics.fmean(accs)}))
    return d


@pytest.fixture
def single(tmp_path) -> Path:
    d = tmp_path / "single"
    return _run(d, "quick", [_fold(d, 0, 0.9, figures=("curves.png", "confusion.png"))])


@pytest.fixture
def kfold(tmp_path) -> Path:
    d = tmp_path / "kf"
    figures = [("confusion.png", "curves.png"), ("curves.png",), ("confusion.png",)]
    results = [_fold(d / f"fold{i}", i, acc, test=False, figures=figures[i]) for i, acc in enumerate([0.8, 0.85, 0.9])]
    return _run(d, "kfold5", results, device="cuda", gpu="NVIDIA H100")


def _row(text: str, first_cell: str) -> list[str]:
    line = next(l for l in text.splitlines() if l.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_single_fold_report(single):
    path = write_report(single)
    assert path == single / "report.md"
    text = path.read_text()
    assert text.startswith("# quick\n")
    assert "```toml\n" + RECIPE.format(name="quick").rstrip() + "\n```" in text
    assert _row(text, "torch")[1] == "2.5.0" and _row(text, "cpu_count")[1] == "2"
    assert _row(text, "0")[1:5] == ["3", "2", "30.0", "2,000"]  # epochs, best, train time, mean img/s
    assert "Total wall (train time over all folds): 30.0 s" in text
    assert "## Final metrics (test set, 10,000 images)" in text
    assert _row(text, "accuracy")[1] == "90.00%"
    assert _row(text, "top-5 accuracy")[1] == "99.00%"
    assert _row(text, "precision (macro)")[1] == "0.8900"
    assert _row(text, "Cohen's kappa")[1] == "0.8000"
    assert _row(text, "ECE")[1] == "0.0200"
    assert _row(text, "cat")[1:] == ["88.50%", "0.8850", "0.8850", "0.8850", "0.9800"]
    assert "![curves](figures/curves.png)" in text and "![confusion](figures/confusion.png)" in text
    assert "samples.png" not in text and "gradcam" not in text
    assert "## Folds" not in text


def test_kfold_report_mean_std(kfold):
    text = write_report(kfold).read_text()
    assert text.startswith("# kfold5\n")
    assert "## Folds (3, val metrics)" in text
    folds = text.split("## Folds")[1].split("\n## ")[0]
    assert [_row(folds, str(i))[2] for i in range(3)] == ["80.00%", "85.00%", "90.00%"]
    mean, std = _row(folds, "**mean**"), _row(folds, "**std**")
    assert mean[1] == "3.0" and std[1] == "1.0000"  # best epochs 2, 3, 4
    assert mean[2] == "85.00%" and std[2] == f"{statistics.stdev([0.8, 0.85, 0.9]):.2%}" == "5.00%"
    assert mean[3] == "0.8400"  # precision macro = acc - 0.01
    assert std[7] == "0.0500"  # kappa: sample std, not population (0.0408)
    assert _row(text, "accuracy")[1:] == ["85.00%", "5.00%"]  # final metrics: mean and std columns
    assert "Confusion matrices: [fold 0](fold0/figures/confusion.png) · [fold 2](fold2/figures/confusion.png)" in text
    assert "![curves](fold0/figures/curves.png)" in text and "![curves](fold1/figures/curves.png)" in text
    assert "fold1/figures/confusion.png" not in text and "fold2/figures/curves.png" not in text
    assert "Total wall (train time over all folds): 90.0 s" in text


def test_old_style_run_without_metrics(tmp_path):
    d = tmp_path / "old"
    _run(d, "old", [_fold(d, 0, 0.75, new=False)])
    (d / "env.json").unlink()
    text = write_report(d).read_text()
    assert _row(text, "accuracy")[1] == "75.00%"  # test_acc fallback
    assert _row(text, "log-loss")[1] == "0.3500"  # test_loss fallback
    assert _row(text, "top-5 accuracy")[1] == "–" and _row(text, "AUROC (macro)")[1] == "–"
    assert _row(text, "cat")[1:] == ["75.00%", "–", "–", "–", "–"]
    assert _row(text, "0")[5:] == ["–", "–", "–", "–"]  # inference time, params, memory, compile
    assert "env.json is missing." in text and "## Figures" not in text


def test_old_style_without_test_set_uses_val(tmp_path):
    d = tmp_path / "oldval"
    _run(d, "oldval", [_fold(d, 0, 0.6, new=False, test=False)])
    text = write_report(d).read_text()
    assert "## Final metrics (val set)" in text and _row(text, "accuracy")[1] == "60.00%"


def test_combine_two_runs(single, kfold, tmp_path):
    out = combine_reports([single, kfold], tmp_path / "cmp" / "report.md")
    text = out.read_text()
    head = _row(text, "")
    assert head[1:] == ["single (cpu)", "kf (NVIDIA H100)"]
    assert _row(text, "accuracy")[1:] == ["90.00%", "85.00% ± 5.00%"]
    assert _row(text, "train time, all folds (s)")[1:] == ["30.0", "90.0"]
    assert _row(text, "train time vs first")[1:] == ["1.00×", "3.00×"]
    assert _row(text, "img/s vs first")[1:] == ["1.00×", "1.00×"]
    assert _row(text, "device")[1:] == ["cpu", "cuda"] and _row(text, "gpu")[1:] == ["–", "NVIDIA H100"]
    assert not (single / "report.md").exists()  # comparing writes only `out`


def test_combine_one_run_rebuilds_its_report(single, tmp_path):
    assert combine_reports([single], tmp_path / "unused.md") == single / "report.md"
    assert (single / "report.md").is_file() and not (tmp_path / "unused.md").exists()


def test_errors_are_one_line(tmp_path, single):
    missing = tmp_path / "nope"
    with pytest.raises(ReportError, match=r"nope: not a run directory \(no metrics.csv or result.json\)"):
        write_report(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="empty: not a run directory"):
        combine_reports([single, empty])
    (single / "result.json").write_text('{"fold": 0, "val_acc": ')
    with pytest.raises(ReportError, match="single/result.json: corrupt JSON") as e:
        write_report(single)
    assert "\n" not in str(e.value) and isinstance(e.value, FastCifarError)
    (single / "result.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="result.json: corrupt JSON"):
        write_report(single)


def test_summary_only_and_in_progress_runs(tmp_path):
    d = tmp_path / "partial"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"folds": [{"fold": 0, "val_acc": 0.5}], "recipe": "p"}))
    text = write_report(d).read_text()
    assert _row(text, "accuracy")[1] == "50.00%" and "recipe.toml is missing." in text
    d2 = tmp_path / "running"
    d2.mkdir()
    (d2 / "metrics.csv").write_text("epoch,img_per_s,epoch_time_s\n1,500,2.5\n2,oops,2.5\n")
    text = write_report(d2).read_text()
    assert text.startswith("# running\n") and _row(text, "0")[1:5] == ["2", "–", "5.0", "500"]


def test_results_come_first_and_the_environment_is_collapsed(kfold):
    text = write_report(kfold).read_text()
    lines = text.splitlines()
    assert lines[2] == "**val accuracy: 85.00% ± 5.00% over 3 folds**"  # line 3, before anything else
    order = [text.index(s) for s in ("<details>\n<summary>Environment</summary>", "<summary>Recipe</summary>",
                                     "## Timing", "## Final metrics", "## Folds", "## Figures",
                                     "## Per-class metrics")]
    assert order == sorted(order)
    folded = re.sub(r"<details>.*?</details>", "", text[: text.index("## Final metrics")], flags=re.S)
    assert len(folded.splitlines()) <= 20  # unfolded (3 folds: title, headline, timing table), within a screen


def test_selection_note_only_when_an_earlier_epoch_was_picked_on_the_reported_set():
    def fold(validations, on_reported, best=3, last=10):
        return {"best_epoch": best, "selection": {"validations": validations, "on_reported_set": on_reported,
                                                  "last_validated_epoch": last}}

    assert selection_note([fold(4, True, best=3, last=4)]).startswith(
        "best.pt is epoch 3, not the last validated (4), picked by 4 validations on this same set")
    assert selection_note([fold(10, True)] * 5).startswith("in 5 of 5 folds best.pt is not the last validated")
    assert "in 2 of 3 folds" in selection_note([fold(10, True), fold(9, True), fold(10, True, best=10)])
    assert "picked by 9-10 validations" in selection_note([fold(10, True), fold(9, True)])
    assert selection_note([fold(10, True, best=10)]) is None  # the last epoch won: nothing was picked on the set
    assert selection_note([fold(10, False)]) is None  # a held-out test set was reported
    assert selection_note([fold(1, True, best=3, last=3)]) is None  # eval.every = 0: one validation, the last
    assert selection_note([{}, {"selection": "?"}]) is None  # runs from before result.json recorded it


JSON_LEAF = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


def _paths(obj, prefix=()):
    """Every place in a JSON tree: the root, each key of each object, each of the first 4 items of each list."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj[:4]) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


def _replace(obj, path, value):
    if not path:
        return value
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return obj


def _mutate(data, run: Path) -> None:
    """One to three damaged files of a run: a JSON value replaced anywhere by any JSON (types, nesting, NaN,
    huge numbers), a metrics.csv cell by junk, or recipe.toml bytes (a NUL, a BOM, a stray table)."""
    files = sorted(p for p in run.rglob("*") if p.suffix in (".json", ".csv", ".toml") and p.name != ".fastcifar-run")
    rnd = data.draw(st.randoms(use_true_random=False))  # uniform picks: sampled_from favours the first, the root
    for _ in range(data.draw(st.integers(1, 3))):
        path = rnd.choice(files)
        if path.suffix == ".json":
            obj = json.loads(path.read_text())
            where = rnd.choice(list(_paths(obj)))
            path.write_text(json.dumps(_replace(obj, where, data.draw(JSON_VALUE))))
        elif path.suffix == ".csv":
            lines = [line.split(",") for line in path.read_text().splitlines()]
            row = data.draw(st.integers(0, len(lines) - 1))
            lines[row][data.draw(st.integers(0, len(lines[row]) - 1))] = data.draw(
                st.sampled_from(["", "nan", "-inf", "1e309", "x", '"', "9" * 400, "1e308"]))
            path.write_text("\n".join(",".join(cells) for cells in lines) + "\n")
        else:
            text = path.read_text()
            at = data.draw(st.integers(0, len(text)))
            path.write_text(text[:at] + data.draw(st.sampled_from(["\x00", "\ufeff", "[[x", 'name = 5\n'])) + text[at:])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_damaged_run_files_give_one_line_or_a_clean_report(tmp_path_factory, capsys, data):
    """Every file `report` reads back is untrusted: any value of result.json, summary.json, env.json replaced
    by any JSON, metrics.csv cells and recipe.toml bytes damaged, for one run and for a comparison of two. The
    CLI writes a report whose numbers hold no nan / inf (a value it cannot use reads as "–"; the environment and
    recipe sections copy the files), or prints one line naming a file of the run, exit 2; never a traceback
    (env.json's hashes as numbers raised TypeError, two folds' 1e308 OverflowError)."""
    tmp = tmp_path_factory.mktemp("damaged")
    kfold = data.draw(st.booleans())
    if kfold:
        run = _run(tmp / "run", "kf", [_fold(tmp / "run" / f"fold{i}", i, 0.8 + i / 10) for i in range(2)])
    else:
        run = _run(tmp / "run", "one", [_fold(tmp / "run", 0, 0.9)])
    _mutate(data, run)
    other = _run(tmp / "other", "other", [_fold(tmp / "other", 0, 0.7)])
    args = ["report", str(run)] + (data.draw(st.sampled_from([[], [str(other), "--out", str(tmp / "cmp.md")]])))
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    if code == 0:
        text = (run / "report.md" if len(args) == 2 else tmp / "cmp.md").read_text()
        computed = re.sub(r"<details>.*?</details>", "", text, flags=re.S)  # env.json, recipe.toml: as written
        if len(args) > 2:
            computed = computed.split("| device |")[0]  # the comparison's environment rows, as written
        assert err == "" and not re.search(r"\b(nan|inf)\b", computed, re.I), text
    else:
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"fastcifar: error: {run}"), err


def test_env_json_with_numbers_for_hashes(single, capsys):
    env = json.loads((single / "env.json").read_text())
    env["store"] = {"path": 7, "sha256": {"train_images.npy": 12345}, "source": {"sha256": None}}
    (single / "env.json").write_text(json.dumps(env))
    assert main(["report", str(single)]) == 0
    assert _row((single / "report.md").read_text(), "sha256 train_images.npy")[1] == "`12345…`"
