"""What a user sees from the command line: whole lines in log files, fast one-line errors, --version, JSON for
scripts (issue 24, items 3, 5 and 7)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import fastcifar
from fastcifar.cli import main
from fastcifar.recipe import recipe_to_toml
from fastcifar.run import run_training

ROOT = Path(__file__).resolve().parents[1]
QUIET = Console(quiet=True)


def fastcifar_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m fastcifar ARGS` with stdout and stderr pipes (not a terminal), as in `make train > log`."""
    return subprocess.run([sys.executable, "-m", "fastcifar", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "80", **(env or {})}, timeout=600)


# ---------------------------------------------------------------------------------------------- item 3: logs


def test_a_pipe_gets_whole_epoch_lines_and_uncut_sweep_tables(tiny, tmp_path):
    """COLUMNS=80 and a pipe: rich used to lay out for 80 columns, splitting the ~110-character epoch line and
    cutting the sweep table's variant names to `optim.l…`."""
    (tmp_path / "r.toml").write_text(recipe_to_toml(tiny(train={"epochs": 1})))
    variant = "optim.lr=0.0400000000000000000000001"  # 37 characters: more than an 80-column table gives it
    done = fastcifar_cli("sweep", "r.toml", "--vary", variant, "--out", "sw", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    epoch = [line for line in done.stdout.splitlines() if line.startswith("fold 0 epoch")]
    assert len(epoch) == 2 and all(len(line) > 80 and line.rstrip().endswith("img/s") for line in epoch), epoch
    rows = [line for line in done.stdout.splitlines() if variant in line]
    assert rows and "…" not in rows[0]  # the table row holds the whole variant name, on one line
    assert not any(len(line) > 80 for line in done.stdout.splitlines() if "…" in line)
    # item 9: the column sums the folds' epoch times: it is called what it is
    assert "train time (s)" in done.stdout and "wall time" not in done.stdout
    assert (tmp_path / "sw" / "sweep.csv").read_text().splitlines()[0].endswith(",params,train_time_s")


# ---------------------------------------------------------------------------------------------- item 5: errors


def test_a_misspelt_key_is_reported_before_torch_is_imported(tmp_path):
    """Measured on the loaded 2-core box: 22 s before (torch first), 0.3 s after."""
    code = ("import sys\nfrom fastcifar.cli import main\nrc = main(sys.argv[1:])\n"
            "print(rc, 'torch' in sys.modules)")
    for args in (["train", "quickstart", "--set", "train.epoch=3"],
                 ["train", "quickstart", "--set", "augment.erasing_p=2"],  # a value error in a later section
                 ["sweep", "quickstart", "--set", "optim.lr=-1", "--vary", "train.epochs=1,2"]):
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert done.stdout.split() == ["2", "False"], (args, done.stdout, done.stderr)
        assert done.stderr.startswith("fastcifar: error: quickstart: ") and done.stderr.count("\n") == 1
    assert "train.epoch: unknown key (did you mean train.epochs? known keys:" in \
        subprocess.run([sys.executable, "-c", code, "train", "quickstart", "--set", "train.epoch=3"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300).stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastcifar {fastcifar.__version__}"
    import tomllib

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == fastcifar.__version__


def test_eval_of_an_export_says_eval_takes_a_checkpoint(tiny, tmp_path, capsys):
    run_training(tiny(train={"epochs": 1}), tmp_path / "r", QUIET)
    best = tmp_path / "r" / "checkpoints" / "best.pt"
    assert main(["export", str(best), "--format", "torchscript", "--out", str(tmp_path / "m.torchscript.pt")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m.torchscript.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" not in err
    assert f"m.torchscript.pt: is an exported model (exported from {best}); eval takes a checkpoint" in err
    assert "fastcifar predict" in err
    (tmp_path / "other.onnx").write_bytes(b"\x08\x07")  # not even ours: still not a checkpoint
    assert main(["eval", str(tmp_path / "other.onnx")]) == 2
    assert "other.onnx: is an exported model; eval takes a checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_named_as_the_flag(tiny, tmp_path, capsys):
    run_training(tiny(train={"epochs": 1}), tmp_path / "r", QUIET)
    best = str(tmp_path / "r" / "checkpoints" / "best.pt")
    for cmd in (["eval", best], ["predict", best, str(tmp_path)]):
        assert main([*cmd, "--device", "cuda"]) == 2
        assert capsys.readouterr().err.startswith("fastcifar: error: --device: 'cuda' requested but torch sees no")


# ---------------------------------------------------------------------------------------------- item 7: JSON


def test_eval_and_predict_json_to_stdout_and_to_a_file(tiny, store, tmp_path, capsys):
    from PIL import Image

    run_training(tiny(train={"epochs": 1}), tmp_path / "r", QUIET)
    best = str(tmp_path / "r" / "checkpoints" / "best.pt")
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    capsys.readouterr()
    assert main(["eval", best, "--json"]) == 0  # stdout holds the JSON alone
    got = json.loads(capsys.readouterr().out)
    assert got["kind"] == "fastcifar-eval" and got["images"] == 80 and got["accuracy"] == result["test_acc"]
    assert [r["class"] for r in got["per_class"]][:2] == ["airplane", "automobile"]
    assert got["store"] == str(store.resolve()) and sum(map(sum, got["confusion"])) == 80
    assert main(["eval", best, "--json", str(tmp_path / "e.json")]) == 0  # a file: the table still prints
    out = capsys.readouterr().out
    assert "test accuracy" in out and f"wrote {tmp_path / 'e.json'}" in out
    assert json.loads((tmp_path / "e.json").read_text()) == got
    assert main(["eval", best, "--json", str(tmp_path / "e.json")]) == 0  # its own file: replaced

    for i in range(3):
        Image.new("RGB", (40, 30), (80 * i, 20, 200)).save(tmp_path / f"im{i}.png")
    images = [str(tmp_path / f"im{i}.png") for i in range(3)]
    capsys.readouterr()
    assert main(["predict", best, *images, "--top-k", "2", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["kind"] == "fastcifar-predict" and [p["image"] for p in pred["predictions"]] == images
    assert all(len(p["top"]) == 2 and p["top"][0]["probability"] >= p["top"][1]["probability"]
               for p in pred["predictions"])
    assert main(["predict", best, *images, "--json", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["predictions"][0]["image"] == images[0]

    # Files fastcifar did not write, or of the other kind, are never replaced; refused before any work.
    (tmp_path / "mine.json").write_text('{"kind": "my-notes"}')
    for cmd in (["eval", best, "--json", str(tmp_path / "mine.json")],
                ["predict", best, images[0], "--json", str(tmp_path / "e.json")]):
        assert main(cmd) == 2
        assert "exists and is not a" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == '{"kind": "my-notes"}'
    assert main(["predict", best, "--json", *images]) == 2  # --json took im0.png as its file: refused, unharmed
    assert "--json " + images[0] + ": is an image" in capsys.readouterr().err
