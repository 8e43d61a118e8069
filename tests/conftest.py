"""Shared fixtures: one tiny synthetic store per session and a builder for tiny recipes on it."""

from pathlib import Path

import pytest

from fastcifar.recipe import Recipe, recipe_from_dict
from synth import make_store


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory):
    """train.amp = "auto" caches its CPU measurements in $FASTCIFAR_CACHE: a session folder, not the user's home."""
    import os

    saved = os.environ.get("FASTCIFAR_CACHE")
    os.environ["FASTCIFAR_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        os.environ.pop("FASTCIFAR_CACHE", None)
    else:
        os.environ["FASTCIFAR_CACHE"] = saved


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


@pytest.fixture(scope="session")
def peers_dir() -> Path:
    """The folder of the unchanged peer scripts (../shared/peers beside the checkout, carry/peers, or
    $FASTCIFAR_PEERS); their tests skip, saying so, where they are not."""
    from fastcifar.bench.peers import find_peers

    repo = Path(__file__).resolve().parents[1]
    folder = find_peers(None, [repo / "carry" / "peers", repo.parent / "shared" / "peers"])
    if folder is None:
        pytest.skip("the peer scripts are not here (../shared/peers, carry/peers or $FASTCIFAR_PEERS)")
    return folder


@pytest.fixture(scope="session")
def peer(peers_dir):
    """peer(name) -> the peer script loaded on the CPU (fp32 for its fp16, torch.compile off), once a session."""
    from fastcifar.bench.peers import PEERS, load_peer

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_peer(peers_dir / PEERS[name].path, cpu=True)
        return loaded[name]

    return get
