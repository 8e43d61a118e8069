"""The search space of `fastcifar tune`: recipe keys with a range or a list of choices, from a small TOML file
or `--space` arguments, each checked against the recipe before any trial starts.

A space file names recipe keys as tables of their section:

    [optim]
    lr = {low = 0.01, high = 1.0, log = true}   # float range, sampled on a log scale
    momentum = {low = 0.8, high = 0.95}

    [train]
    batch_size = {choices = [128, 256, 512]}
    label_smoothing = {low = 0.0, high = 0.2, step = 0.05}

and `--space` the same in one argument: `optim.lr=0.01:1:log`, `train.epochs=2:8` (a range; a third part
that is a number is the step), `train.batch_size=128,256,512` (choices). A range on an integer key samples
integers, on a float key floats; other keys (booleans, names, lists) take choices only. Every end of a range and
every choice is applied to the recipe once here, so a value the recipe refuses fails now, in one line naming
the key, not in the middle of a study.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastcifar.errors import RecipeError
from fastcifar.recipe import Recipe, load_recipe
from fastcifar.sweep import split_values
from fastcifar.typed_toml import toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

FIELDS = {"low", "high", "log", "step", "choices"}
FIXED = {"name": "each trial is named by the study", "train.device": "where a trial runs is not a hyper-parameter"}


@dataclass(frozen=True)
class Param:
    """One searched key. kind "int" / "float": a range [low, high] (log scale or a step); "choice": choices,
    each kept as (the value Optuna records, the TOML text that sets it)."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[tuple[Any, str], ...] = ()

    def describe(self) -> dict[str, Any]:
        """What the study records of this parameter: a worker with another space is refused."""
        if self.kind == "choice":
            return {"key": self.key, "choices": [text for _, text in self.choices]}
        return {"key": self.key, "kind": self.kind, "low": self.low, "high": self.high, "log": self.log,
                "step": self.step}


def _value(recipe: Recipe, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(recipe, section), name) if name else getattr(recipe, section)


class SpaceBuilder:
    """Turns raw entries into Params, checking each value against the base recipe (path + overrides)."""

    def __init__(self, recipe_path: str, overrides: list[str]):
        self.recipe_path, self.overrides = recipe_path, list(overrides)

    def typed(self, key: str, text: str, where: str) -> Any:
        """The recipe's own value for `key` set to the TOML text `text` (checked by the recipe's types)."""
        try:
            return _value(load_recipe(self.recipe_path, self.overrides + [f"{key}={text}"]), key)
        except RecipeError as e:
            raise RecipeError(f"{where}: {str(e).split(': ', 1)[-1]}") from None

    def param(self, key: str, entry: dict[str, Any], where: str) -> Param:
        if key in FIXED:
            raise RecipeError(f"{where}: {key} cannot be searched ({FIXED[key]})")
        unknown = sorted(set(entry) - FIELDS)
        if unknown:
            raise RecipeError(f"{where}: unknown field {unknown[0]!r} (expected low/high[/log/step] or choices)")
        if "choices" in entry:
            return self._choices(key, entry, where)
        if "low" not in entry or "high" not in entry:
            raise RecipeError(f"{where}: give low and high (a range) or choices = [...]")
        return self._range(key, entry, where)

    def _choices(self, key: str, entry: dict[str, Any], where: str) -> Param:
        if set(entry) != {"choices"}:
            raise RecipeError(f"{where}: choices cannot be combined with low/high/log/step")
        raw = entry["choices"]
        if not isinstance(raw, list) or len(raw) < 2:
            raise RecipeError(f"{where}: choices must be a list of at least 2 values, got {raw!r}"[:300])
        texts = [toml_value(v) for v in raw]
        out = []
        for text in texts:
            v = self.typed(key, text, where)
            out.append((v if isinstance(v, (bool, int, float, str)) else toml_value(v), toml_value(v)))
        if len({t for _, t in out}) != len(out):
            raise RecipeError(f"{where}: choices repeat a value ({', '.join(texts)})")
        return Param(key, "choice", choices=tuple(out))

    def _range(self, key: str, entry: dict[str, Any], where: str) -> Param:
        for field in ("low", "high", "step"):
            v = entry.get(field)
            if field in entry and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise RecipeError(f"{where}: {field} must be a number, got {v!r}"[:300])
        low, high = (self.typed(key, toml_value(entry[f]), where) for f in ("low", "high"))
        if not isinstance(low, (int, float)) or isinstance(low, bool):
            raise RecipeError(f"{where}: a range needs a number key; give choices = [...] for {key}")
        kind = "int" if isinstance(low, int) else "float"
        log, step = entry.get("log", False), entry.get("step")
        if not isinstance(log, bool):
            raise RecipeError(f"{where}: log must be true or false, got {log!r}")
        if not low < high:
            raise RecipeError(f"{where}: low must be < high, got low = {low}, high = {high}")
        if log and low <= 0:
            raise RecipeError(f"{where}: a log range needs low > 0, got {low}")
        if step is not None:
            if log:
                raise RecipeError(f"{where}: a range is either log or stepped, not both")
            if not step > 0 or (kind == "int" and not isinstance(step, int)):
                raise RecipeError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}, "
                                  f"got {step!r}")
        return Param(key, kind, low=low, high=high, log=log, step=step)


def parse_space_file(path: Path, builder: SpaceBuilder) -> list[Param]:
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: search space file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    params = []
    for section, keys in table.items():
        if not isinstance(keys, dict) or not all(isinstance(v, dict) for v in keys.values()):
            raise RecipeError(f"{path}: {section}: expected [{section}] with key = {{low = .., high = ..}} or "
                              "key = {choices = [..]}")
        params += [builder.param(f"{section}.{k}", v, f"{path}: {section}.{k}") for k, v in keys.items()]
    return params


def parse_space_arg(text: str, builder: SpaceBuilder) -> Param:
    """`key=lo:hi[:log|:STEP]` or `key=a,b,c`."""
    key, sep, spec = text.partition("=")
    key, spec, where = key.strip(), spec.strip(), f"--space {text}"[:200]
    if not sep or not key or not spec:
        raise RecipeError(f"{where}: expected section.key=lo:hi[:log] or section.key=a,b,c")
    values = split_values(spec)
    if len(values) > 1:
        return builder.param(key, {"choices": [_literal(v) for v in values]}, where)
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise RecipeError(f"{where}: expected lo:hi[:log] or a,b,c (one value is not a search)")
    entry: dict[str, Any] = {"low": _literal(parts[0]), "high": _literal(parts[1])}
    if len(parts) == 3:
        third = parts[2].strip()
        if third == "log":
            entry["log"] = True
        else:
            entry["step"] = _literal(third)
    return builder.param(key, entry, where)


def _literal(text: str) -> Any:
    """A TOML literal (`0.1`, `true`, `[1, 2]`, `"x"`); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def build_space(recipe_path: str, overrides: list[str], space_file: str | None, space_args: list[str]) -> list[Param]:
    """The whole space: the file's keys, then --space's (a key given twice is an error)."""
    builder = SpaceBuilder(recipe_path, overrides)
    params = parse_space_file(Path(space_file), builder) if space_file else []
    params += [parse_space_arg(a, builder) for a in space_args]
    if not params:
        raise RecipeError("tune: no search space; give --space section.key=lo:hi (or a,b,c) or --space-file FILE")
    seen = set()
    for p in params:
        if p.key in seen:
            raise RecipeError(f"{p.key}: given twice in the search space")
        seen.add(p.key)
    return params


def suggest(trial, params: list[Param]) -> dict[str, Any]:
    """Sample every parameter on an Optuna trial; returns key -> the value Optuna records."""
    out = {}
    for p in params:
        if p.kind == "choice":
            out[p.key] = trial.suggest_categorical(p.key, [v for v, _ in p.choices])
        elif p.kind == "int":
            out[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            out[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
    return out


def overrides_for(params: list[Param], values: dict[str, Any]) -> list[str]:
    """`--set` strings for a trial's values (choices by their TOML text, numbers as TOML numbers)."""
    out = []
    for p in params:
        v = values[p.key]
        text = dict(p.choices).get(v) if p.kind == "choice" else toml_value(v)
        out.append(f"{p.key}={text}")
    return out


def space_signature(params: list[Param]) -> str:
    return json.dumps([p.describe() for p in params], sort_keys=True)
