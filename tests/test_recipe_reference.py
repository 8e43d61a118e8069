"""Recipes a newcomer can discover (issue 24 item 4): whole descriptions, one recipe resolved with --set, and a key
reference generated from the recipe dataclasses (so a test, not a reviewer, keeps it complete)."""

import dataclasses
import subprocess
import sys
import typing

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from fastcifar.cli import main
from fastcifar.recipe import Recipe, builtin_recipes, load_recipe, recipe_description, recipe_from_dict
from fastcifar.typed_toml import MEANING, key_reference


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(hints[f.name])}


def _all_keys() -> list[str]:
    top = [f.name for f in dataclasses.fields(Recipe) if f.name not in _sections()]
    return top + [f"{name}.{f.name}" for name, cls in _sections().items() for f in dataclasses.fields(cls)]


def test_every_key_and_section_has_a_meaning():
    for f in dataclasses.fields(Recipe):
        assert len(f.metadata.get(MEANING, "")) > 10, f.name
    for name, cls in _sections().items():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get(MEANING, "")) > 10, f"{name}.{f.name} has no meaning in fastcifar/recipe_sections.py"
    assert "PER CLASS" in dict((r["key"], r["meaning"]) for r in key_reference(Recipe))["data.train_subset"]


def test_recipes_keys_lists_every_key_with_type_default_and_meaning(capsys):
    assert main(["recipes", "keys"]) == 0
    out = capsys.readouterr().out
    listed = [line.split(" = ")[0] for line in out.splitlines() if line and not line.startswith("#")]
    assert listed == _all_keys()
    assert 'train.device = "auto"' in out and '# "auto" | "cpu" | "cuda" | "mps": where to train' in out
    # The reference is TOML (dotted keys): read back, its defaults are exactly the dataclasses' defaults.
    assert recipe_from_dict(tomllib.loads(out)) == Recipe()


def test_recipes_lists_whole_descriptions(capsys):
    assert main(["recipes"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, text in builtin_recipes().items():
        assert name in out and recipe_description(text) in out
    assert "RandAugment makes `train` refuse it." in out  # the third line of resnet34_onecycle's comment


def test_recipes_into_a_file_is_one_short_line_a_recipe():
    """Into a pipe or file the list is `name  description` lines, not a table as wide as its longest cell
    (1,608 characters a line before)."""
    proc = subprocess.run([sys.executable, "-m", "fastcifar", "recipes"], capture_output=True, text=True,
                          timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0].startswith("# built-in recipes")
    names = builtin_recipes()
    assert [line.split()[0] for line in lines[1:]] == list(names)
    for line, text in zip(lines[1:], names.values()):
        assert line.rstrip().endswith(recipe_description(text)) and line == line.rstrip()


def test_recipe_show_prints_the_resolved_recipe_with_overrides(capsys, tmp_path):
    assert main(["recipe", "show", "quickstart", "--set", "train.epochs=1", "--set", "data.train_subset=20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# fastcifar recipes show quickstart --set train.epochs=1 --set data.train_subset=20:")
    shown = recipe_from_dict(tomllib.loads(out))
    assert shown == load_recipe("quickstart", ["train.epochs=1", "data.train_subset=20"])
    assert "\nepochs = 1\n" in out and "label_smoothing = 0.1" in out  # every key explicit, the file's own too
    (tmp_path / "r.toml").write_text(out)  # what it prints trains as is
    assert load_recipe(tmp_path / "r.toml") == shown
    assert main(["recipes", "show", "quickstart", "--set", "train.epoch=1"]) == 2
    err = capsys.readouterr().err
    assert "train.epoch: unknown key (did you mean train.epochs?" in err and err.count("\n") == 1
