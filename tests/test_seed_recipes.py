"""The seed recipes train as written (only size knobs overridden): RandAugment + erasing + resize, AdamW +
OneCycle, label smoothing, grad clipping, k-fold on the merged pool."""

from pathlib import Path

import pytest
from rich.console import Console

from fastcifar.recipe import load_recipe
from fastcifar.run import run_training

RECIPES = Path(__file__).parent.parent / "recipes"
QUIET = Console(quiet=True)


@pytest.mark.parametrize("name, batch", [("seed000_resnet34", 16), ("resnet34_onecycle", 16),
                                         ("speedrun94", 16)])
def test_seed_recipe_trains_one_tiny_epoch(store, tmp_path, name, batch):
    # Size knobs only: 2 images per class (one step), one epoch, one small fold; everything the recipe augments with runs.
    overrides = [f'data.store="{store}"', "data.train_subset=2", "train.epochs=1", f"train.batch_size={batch}",
                 "eval.batch_size=64", "eval.figures=false", "train.compile=false"]
    recipe = load_recipe(RECIPES / f"{name}.toml", overrides)
    if recipe.split.kind == "kfold":  # 20 folds of the 320-image pool: a 16-image validation fold (at 224 px
        # the ImageNet-stem ResNet-34 costs ~0.1 s per image on 2 CPU cores)
        recipe = load_recipe(RECIPES / f"{name}.toml", overrides + ["split.k=20", "split.fold=0"])
    summary = run_training(recipe, tmp_path / "run", QUIET)
    result = summary["folds"][0] if "folds" in summary else summary
    assert 0.0 <= result["val_acc"] <= 1.0
    assert (tmp_path / "run" / "recipe.toml").exists()
