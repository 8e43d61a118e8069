"""Real-data smoke test: runs only when FASTCIFAR_SOURCE names a real CIFAR-10 archive (.ci/run sets it)."""

import os
from pathlib import Path

import pytest
from rich.console import Console

from fastcifar.data import open_store, prepare_store
from fastcifar.recipe import load_recipe
from fastcifar.run import run_training

SOURCE = os.environ.get("FASTCIFAR_SOURCE", "")
RECIPES = Path(__file__).parent.parent / "recipes"

pytestmark = pytest.mark.skipif(not SOURCE or not Path(SOURCE).exists(),
                                reason="FASTCIFAR_SOURCE does not name a real CIFAR-10 archive")


def test_prepare_and_train_quickstart_on_a_subset(tmp_path):
    store_dir = tmp_path / "store"
    prepare_store(Path(SOURCE), store_dir, log=lambda *_: None)
    store = open_store(store_dir, verify=True)
    assert store.train_images.shape == (50000, 32, 32, 3) and store.test_images.shape == (10000, 32, 32, 3)
    assert len(store.classes) == 10
    # 300 images per class and 4 epochs: a minute on 2 cores, evaluated on the full official test set.
    recipe = load_recipe(RECIPES / "quickstart.toml",
                         [f'data.store="{store_dir}"', "data.train_subset=300", "train.epochs=4"])
    summary = run_training(recipe, tmp_path / "run", Console(quiet=True))
    assert summary["test_acc_mean"] > 0.30, summary["test_acc_mean"]  # chance is 0.10
