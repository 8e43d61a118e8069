"""Installed like any package: a wheel built from this tree, installed into a fresh environment and run outside
the checkout, knows its recipes by name."""

import os
import subprocess
import sys

from boxes import box_python, tree_copy


def test_a_wheel_installed_elsewhere_trains_a_builtin_recipe(store, tmp_path):
    src, wheels, work = tmp_path / "src", tmp_path / "wheels", tmp_path / "elsewhere"
    tree_copy(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(src)], check=True, capture_output=True)
    (wheel,) = wheels.glob("fastcifar-*.whl")
    python = box_python(tmp_path / "venv")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}

    def fastcifar(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-m", "fastcifar", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)

    where = subprocess.run([str(python), "-c", "import fastcifar; print(fastcifar.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "venv"))  # the installed copy, not this checkout
    listing = fastcifar("recipes")
    assert listing.returncode == 0 and "quickstart" in listing.stdout and "svhn_quickstart" in listing.stdout
    run = fastcifar("train", "quickstart", "--out", "run", "--set", f'data.store="{store}"', "--set", "train.epochs=1",
                    "--set", "data.train_subset=4", "--set", "train.batch_size=16", "--set", "eval.figures=false")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "run: test accuracy" in run.stdout and (work / "run" / "result.json").is_file()
    missing = fastcifar("train", "no_such_recipe")
    assert missing.returncode == 2 and "built-in recipes: cifar100_resnet18, quickstart" in missing.stderr
