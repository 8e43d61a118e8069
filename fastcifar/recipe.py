"""Recipes: TOML files loaded into a tree of frozen, typed dataclasses.

Every key is checked against the dataclass fields (unknown keys are errors), every value against the field's
type, and every section's invariants in `validate()`. All errors are RecipeError with the dotted key path first.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastcifar.errors import RecipeError
from fastcifar.recipe_sections import (  # noqa: F401 - re-exported: fastcifar.recipe is where callers look
    CIFAR_MEAN, CIFAR_STD, DEFAULT_STORE, IMAGENET_MEAN, IMAGENET_STD, LIMITS, LR, NAME, SEED_MAX,
    AugmentCfg, DataCfg, EvalCfg, FinetuneCfg, ModelCfg, OptimCfg, ScheduleCfg, SplitCfg, TrainCfg)
from fastcifar.textfiles import RECIPE_BYTES, read_text
from fastcifar.typed_toml import apply_overrides, build, check, section, setting, short, table_to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class Recipe:
    """A whole recipe: its name and one table per section."""

    name: str = setting("unnamed", "the recipe's name: runs go to runs/<name> unless --out (one plain folder name)")
    data: DataCfg = section(DataCfg)
    split: SplitCfg = section(SplitCfg)
    model: ModelCfg = section(ModelCfg)
    augment: AugmentCfg = section(AugmentCfg)
    optim: OptimCfg = section(OptimCfg)
    schedule: ScheduleCfg = section(ScheduleCfg)
    train: TrainCfg = section(TrainCfg)
    eval: EvalCfg = section(EvalCfg)
    finetune: FinetuneCfg = section(FinetuneCfg)

    def validate(self) -> None:
        check(NAME.fullmatch(self.name) is not None, "name", "must be one plain folder name (letters, digits and "
              f"_ . + -, not starting with . or -, at most 100 characters), got {short(self.name)}")
        # model last: its check imports the model registry, and with it torch (seconds), so every other bad
        # value is reported before that
        for f in sorted(dataclasses.fields(self), key=lambda f: f.name == "model"):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        if self.train.compile_step:
            from fastcifar.fused_step import check_recipe  # late, as ModelCfg's models import

            check_recipe(self)
        check(self.finetune.head_epochs < self.train.epochs, "finetune.head_epochs",
              f"must be < train.epochs ({self.train.epochs}) so stage 2 has epochs, got {self.finetune.head_epochs}")
        for key, (lo, hi) in LIMITS.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            for i, v in enumerate(value if isinstance(value, tuple) else (value,)):
                check(isinstance(v, str) or lo <= v <= hi, f"{key}[{i}]" if isinstance(value, tuple) else key,
                      f"must be in [{lo:g}, {hi:g}], got {short(v)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loading


def recipe_from_dict(table: dict[str, Any]) -> Recipe:
    recipe = build(Recipe, table, "")
    recipe.validate()
    return recipe


def builtin_recipes() -> dict[str, str]:
    """name -> TOML text of the recipes installed with fastcifar (the package fastcifar.recipes)."""
    folder = importlib.resources.files("fastcifar.recipes")
    return {p.name[:-len(".toml")]: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir(), key=str)
            if p.name.endswith(".toml")}


def recipe_description(text: str) -> str:
    """A recipe file's leading comment block, whole: what it is (`fastcifar recipes` lists it)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(" ".join(lines).split())


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe file, or a built-in recipe by name ("quickstart" or "quickstart.toml") when no such file exists."""
    path = Path(path)
    try:
        builtin = builtin_recipes() if not path.exists() and path.parent == Path(".") else {}
        name = path.name.removesuffix(".toml")
        text = builtin[name] if name in builtin else read_text(path, "recipe", RECIPE_BYTES, RecipeError)
        table = tomllib.loads(text)
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found (built-in recipes: {', '.join(builtin_recipes())})") \
            from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:  # tomllib recurses once per nesting level of arrays / inline tables
        raise RecipeError(f"{path}: not valid TOML (nested too deeply)") from None
    try:
        return recipe_from_dict(apply_overrides(table, overrides or []))
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------- saving


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe, every key explicit, so a run directory says exactly what ran."""
    return table_to_toml(recipe.to_dict())


def recipe_diff(a: Recipe, b: Recipe) -> list[str]:
    """Dotted keys whose values differ between two recipes."""
    out = []
    da, db = a.to_dict(), b.to_dict()
    for k in da:
        if isinstance(da[k], dict):
            out.extend(f"{k}.{kk}" for kk in da[k] if da[k][kk] != db[k][kk])
        elif da[k] != db[k]:
            out.append(k)
    return out
