"""Shared fixtures: one tiny synthetic store per session and a builder for tiny recipes on it."""

from pathlib import Path

import pytest

from fastcifar.recipe import Recipe, recipe_from_dict
from synth import make_store


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("data") / "store", 24, 8)


def tiny_table(store: Path, **sections) -> dict:
    """A recipe table that trains in about a second: 240 images, a width-8 BatchNorm CNN, batch 32."""
    table = {
        "name": "tiny",
        "data": {"store": str(store)},
        "model": {"name": "cnn_bn", "width": 8},
        "optim": {"name": "sgd", "lr": 0.05, "nesterov": True},
        "train": {"epochs": 3, "batch_size": 32, "seed": 1},
        "eval": {"batch_size": 64, "figures": False},  # figures: ~2 s a run; test_train checks them once
    }
    for k, v in sections.items():
        table[k] = {**table.get(k, {}), **v}
    return table


@pytest.fixture
def tiny(store):
    def build(**sections) -> Recipe:
        return recipe_from_dict(tiny_table(store, **sections))

    return build
