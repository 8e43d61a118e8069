import dataclasses
import typing
from pathlib import Path

import pytest

from fastcifar.cli import main
from fastcifar.errors import RecipeError
from fastcifar.recipe import (LIMITS, Recipe, apply_overrides, load_recipe, recipe_diff, recipe_from_dict,
                              recipe_to_toml)

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    saved = tmp_path / "recipe.toml"
    saved.write_text(recipe_to_toml(recipe))
    assert load_recipe(saved) == recipe


def test_required_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.toml", "seed000_resnet34.toml", "resnet34_onecycle.toml"} <= names


def test_seed000_is_faithful():
    r = load_recipe(Path(__file__).parent.parent / "recipes" / "seed000_resnet34.toml")
    assert (r.model.name, r.augment.resize, r.train.batch_size, r.train.epochs) == ("tv_resnet34", 224, 64, 2000)
    assert (r.split.kind, r.split.pool, r.split.k) == ("kfold", "train+test", 5)
    assert (r.optim.name, r.optim.lr, r.optim.weight_decay) == ("adamw", 1e-4, 2e-3)
    assert (r.schedule.name, r.schedule.max_lr, r.schedule.pct_start) == ("onecycle", 5e-4, 0.1)
    assert r.augment.randaugment and (r.augment.randaugment_num_ops, r.augment.randaugment_magnitude) == (2, 9)
    assert (r.augment.erasing_p, r.augment.erasing_scale, r.augment.erasing_ratio) == (0.25, (0.02, 0.33), (0.3, 3.3))
    assert r.train.label_smoothing == 0.1 and r.train.early_stopping_patience == 200 and r.train.grad_clip > 0


def _err(table) -> str:
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(table)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("table, starts", [
    ({"optim": {"lrr": 0.1}}, "optim.lrr: unknown key"),
    ({"optimizer": {}}, "optimizer: unknown key"),
    ({"optim": {"lr": -0.1}}, "optim.lr: must be > 0"),
    ({"optim": {"lr": "fast"}}, "optim.lr: expected a number"),
    ({"optim": {"lr": float("nan")}}, "optim.lr: must be finite"),
    ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer"),
    ({"train": {"amp": 1}}, "train.amp: expected true or false"),
    ({"split": {"kind": "kfold", "k": 5, "fold": 5}}, "split.fold: must be in [-1, 4]"),
    ({"optim": {"name": "lion"}}, "optim.name: must be one of 'sgd', 'adam', 'adamw'"),
    ({"model": {"name": "vgg99"}}, "model.name: unknown model 'vgg99'"),
    ({"augment": {"erasing_scale": [0.5]}}, "augment.erasing_scale: expected a list of 2 numbers"),
    ({"augment": {"erasing_scale": [0.5, 0.1]}}, "augment.erasing_scale: must satisfy"),
    ({"data": "x"}, "data: expected a table"),
    # keys added with the device data path and the engine
    ({"augment": {"translate": 40}}, "augment.translate: must be in [0, 16]"),
    ({"augment": {"rotation": -5.0}}, "augment.rotation: must be in [0, 180]"),
    ({"augment": {"color_jitter": [0.4, 0.4, 0.4, 0.9]}}, "augment.color_jitter: brightness, contrast"),
    ({"augment": {"color_jitter": [0.4, 0.4]}}, "augment.color_jitter: expected a list of 4 numbers"),
    ({"augment": {"randaugment_magnitude": 31}}, "augment.randaugment_magnitude: must be in [0, "),
    ({"augment": {"randaugment": True, "trivialaugment": True}}, "augment.trivialaugment: cannot be on together"),
    ({"augment": {"flip_mode": "sometimes"}}, "augment.flip_mode: must be one of 'random', 'alternate'"),
    ({"augment": {"erasing_value": "noise"}}, "augment.erasing_value: must be one of"),
    ({"augment": {"mix_p": 1.5}}, "augment.mix_p: must be in [0, 1]"),
    ({"train": {"loader": "pil"}}, "train.loader: must be one of 'device', 'torchvision', 'dali', 'ffcv'"),
    ({"train": {"workers": -1}}, "train.workers: must be in [0, 1024]"),
    ({"train": {"ema_decay": 1.0}}, "train.ema_decay: must be in [0, 1)"),
    ({"train": {"compile_mode": "fast"}}, "train.compile_mode: must be one of"),
    ({"eval": {"tta": "all"}}, "eval.tta: must be one of 'none', 'flip', 'flip_translate'"),
    # integers whose size is work or memory: 1e9 RandAugment ops hung preflight, 1e12 bins asked for 4 TB
    ({"augment": {"randaugment_num_ops": 10**9}}, "augment.randaugment_num_ops: must be in [0, 100], got 1000000000"),
    ({"augment": {"randaugment_num_bins": 10**12}}, "augment.randaugment_num_bins: must be in [2, 1000]"),
    ({"data": {"mean": [125.3, 123.0, 113.9]}}, "data.mean[0]: must be in [0, 1], got 125.3"),  # 0-255 units
])
def test_bad_values_name_the_dotted_key(table, starts):
    assert _err(table).startswith(starts)


def _number_keys() -> dict[str, tuple]:
    """Every recipe key that holds numbers, found from the dataclasses (a key added later is covered too):
    dotted key -> (the number type, the field's length when it is a fixed-length list, else None)."""
    out = {}
    for section in dataclasses.fields(Recipe):
        cls = section.default_factory if section.default_factory is not dataclasses.MISSING else None
        if cls is None:
            continue
        for f, tp in typing.get_type_hints(cls).items():
            options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, type(int | str)) else (tp,)
            for option in options:
                args = typing.get_args(option) if typing.get_origin(option) is tuple else (option,)
                if args and all(a is float for a in args):
                    out[f"{section.name}.{f}"] = (float, len(args) if typing.get_origin(option) is tuple else None)
    return out


NUMBER_KEYS = _number_keys()


@pytest.mark.parametrize("key", sorted(NUMBER_KEYS))
@pytest.mark.parametrize("value", [1e40, -1e40, float("inf"), float("nan")])
def test_every_float_key_refuses_what_cannot_be_represented(key, value):
    """+-1e40 (beyond float32, which the optimizer and the augmentations compute in), inf and nan: one line
    naming the key, for every float key of every section; the bound itself is accepted."""
    section, name = key.split(".")
    n = NUMBER_KEYS[key][1]
    table = {section: {name: [value] * n if n else value}}
    if key == "augment.color_jitter":
        table = {section: {name: [value, 0.0, 0.0, 0.0]}}  # hue has its own rule; brightness is the test
    msg = _err(table)
    assert msg.startswith(key), msg
    if key in LIMITS:  # the bounds themselves pass (a section's own stricter rule, such as lr > 0, may not)
        lo, hi = LIMITS[key]
        for bound in (lo, hi):
            good = [bound, bound, bound, 0.0] if key == "augment.color_jitter" else [bound] * n if n else bound
            try:
                recipe_from_dict({section: {name: good}})
            except RecipeError as e:
                assert f"must be in [{lo:g}, {hi:g}]" not in str(e), e


def test_lr_1e40_is_refused_before_the_run_folder_exists(tmp_path, capsys):
    assert main(["train", "quickstart", "--set", "optim.lr=1e40", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "fastcifar: error: quickstart: optim.lr: must be in [0, 1000], got 1e+40\n"
    assert not (tmp_path / "run").exists()


def test_a_recipe_saved_with_a_utf8_bom_is_read(store, tmp_path, capsys):
    """Windows editors save UTF-8 with a byte-order mark, which tomllib refuses ("Invalid statement (line 1,
    column 1)"): dropped for a recipe, for the run's saved recipe.toml on --resume, and for the report."""
    from conftest import tiny_table

    plain = recipe_to_toml(recipe_from_dict(tiny_table(store, train={"epochs": 1})))
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.encode())
    assert load_recipe(bom) == recipe_from_dict(tiny_table(store, train={"epochs": 1}))
    run = tmp_path / "run"
    assert main(["train", str(bom), "--out", str(run)]) == 0
    saved = run / "recipe.toml"
    saved.write_bytes(b"\xef\xbb\xbf" + saved.read_bytes())
    assert main(["train", str(saved), "--out", str(run), "--resume"]) == 0
    (run / "summary.json").unlink()  # the report then takes the name from recipe.toml's first line
    assert main(["report", str(run)]) == 0 and (run / "report.md").read_text().startswith("# tiny\n")
    assert capsys.readouterr().err == ""


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[train]\nepochz = 3\n")
    with pytest.raises(RecipeError,
                       match=r"r\.toml: train\.epochz: unknown key \(did you mean train\.epochs\? known keys: "):
        load_recipe(p)


def test_missing_and_invalid_toml(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[train\nepochs=")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(p)


def test_overrides_are_type_checked(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[optim]\nlr = 0.1\n")
    r = load_recipe(p, ["optim.lr=0.5", "model.name=resnet18", "train.amp=true", "augment.erasing_scale=[0.1,0.2]"])
    assert (r.optim.lr, r.model.name, r.train.amp, r.augment.erasing_scale) == (0.5, "resnet18", True, (0.1, 0.2))
    with pytest.raises(RecipeError, match=r"train\.epochs: expected an integer, got 'ten'"):
        load_recipe(p, ["train.epochs=ten"])
    with pytest.raises(RecipeError, match=r"train\.nope: unknown key"):
        load_recipe(p, ["train.nope=1"])
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(p, ["train.epochs"])
    assert load_recipe(p).optim.lr == 0.1  # overrides never mutate the loaded table


def test_apply_overrides_copies_and_diff():
    base = {"optim": {"lr": 0.1}}
    out = apply_overrides(base, ["optim.lr=0.2"])
    assert base == {"optim": {"lr": 0.1}} and out == {"optim": {"lr": 0.2}}
    assert recipe_diff(recipe_from_dict(base), recipe_from_dict(out)) == ["optim.lr"]


def test_recipes_are_frozen():
    r = recipe_from_dict({})
    with pytest.raises(Exception):
        r.optim.lr = 1.0  # type: ignore[misc]
