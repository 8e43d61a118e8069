"""Property tests: random recipes, overrides and random bytes as files give a clean error or success, never a
traceback (an exception that is not a FastCifarError) and never a partial output."""

import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcifar.checkpoint import load_checkpoint
from fastcifar.data import open_store, prepare_store
from fastcifar.errors import CheckpointError, DataError, FastCifarError, RecipeError
from fastcifar.recipe import Recipe, load_recipe, recipe_from_dict

SECTIONS = {"data": ["store", "train_subset", "mean", "std"], "split": ["kind", "pool", "val_fraction", "k", "fold"],
            "model": ["name", "width", "dropout", "pretrained"],
            "augment": ["flip", "crop_padding", "resize", "erasing_p", "erasing_scale", "cutout"],
            "optim": ["name", "lr", "momentum", "nesterov", "weight_decay", "betas"],
            "schedule": ["name", "warmup_epochs", "max_lr", "pct_start", "anneal", "gamma"],
            "train": ["epochs", "batch_size", "seed", "device", "amp", "label_smoothing", "on_nonfinite"],
            "eval": ["batch_size", "metric"]}
CHOICES = ["sgd", "adam", "adamw", "onecycle", "cosine", "official", "kfold", "holdout", "cnn_bn", "resnet9",
           "train+test", "cpu", "auto", "reflect", "val_acc", "skip"]
scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.sampled_from(CHOICES), st.text(max_size=8))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=4), scalars, max_size=2))
section = st.sampled_from(list(SECTIONS)).flatmap(
    lambda name: st.tuples(st.just(name), st.dictionaries(
        st.one_of(st.sampled_from(SECTIONS[name]), st.text(max_size=6)), values, max_size=4)))
recipe_tables = st.lists(section, max_size=5).map(dict) | st.dictionaries(st.text(max_size=6), values, max_size=3)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(recipe_tables)
def test_random_recipe_tables(table):
    try:
        assert isinstance(recipe_from_dict(table), Recipe)
    except RecipeError as e:
        assert "\n" not in str(e)


@FAST
@given(st.lists(st.text(alphabet=string.printable, max_size=24), max_size=3))
def test_random_overrides(overrides):
    try:
        load_recipe(Path(__file__).parent.parent / "recipes" / "quickstart.toml", overrides)
    except RecipeError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write_tmp(root: Path, data: bytes, name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    (d / name).write_bytes(data)
    return d / name


@FAST
@given(st.binary(max_size=2048))
def test_random_bytes_as_recipe_and_checkpoint(scratch, data):
    path = _write_tmp(scratch, data, "r.toml")
    try:
        load_recipe(path)
    except RecipeError as e:
        assert "\n" not in str(e)
    try:
        load_checkpoint(path.with_name("r.toml"))
    except CheckpointError as e:
        assert "\n" not in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096), st.sampled_from(["src.tar.gz", "src.tar", "src.zip", "data_batch_1"]))
def test_random_bytes_as_sources_leave_no_store(scratch, data, name):
    path = _write_tmp(scratch, data, name)
    src = path.parent if name == "data_batch_1" else path  # a batches directory holding a random pickle
    out = path.parent.parent / (path.parent.name + "-store")
    try:
        prepare_store(src, out, log=lambda *_: None)
    except DataError as e:
        assert "\n" not in str(e)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=512))
def test_random_meta_json_is_refused(scratch, data):
    path = _write_tmp(scratch, data, "meta.json")
    try:
        open_store(path.parent)
        raise AssertionError("a store without arrays must not open")
    except DataError as e:
        assert "\n" not in str(e)
    except FastCifarError as e:  # pragma: no cover - any other clean error would do, but report which
        raise AssertionError(f"unexpected error class {type(e).__name__}: {e}")
