"""Setting a `fastcifar tune` worker up: every check before the first trial (recipe, space, objective, pruner,
storage, study folder), the study folder itself, and the study in its storage with the identity all its workers
must share."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastcifar.atomic import write_json
from fastcifar.errors import FastCifarError, RecipeError, first_line
from fastcifar.ownership import NotOurs, check_own_dir, marker, write_marker
from fastcifar.preflight import check_inputs
from fastcifar.recipe import NAME, Recipe, load_recipe
from fastcifar.tune_space import Param, build_space, overrides_for, space_signature
from fastcifar.tune_storage import StorageSpec, parse_storage

STUDY_JSON = "study.json"
# objective -> (direction, the per-epoch validation number reported to the pruner)
METRICS = {"val_acc": ("maximize", "val_acc"), "val_loss": ("minimize", "val_loss"),
           "test_acc": ("maximize", "val_acc"), "test_loss": ("minimize", "val_loss")}
PRUNERS = ("median", "halving", "wilcoxon", "none")
SAMPLERS = ("tpe", "random")
INSTALL = "pip install 'fastcifar[tune]'"


class TuneError(FastCifarError):
    pass


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise TuneError(f"fastcifar tune needs Optuna, which is not installed: {INSTALL}") from None
    return optuna


@dataclass(frozen=True)
class TuneConfig:
    recipe_path: str
    overrides: tuple[str, ...]
    params: tuple[Param, ...]
    recipe: Recipe  # the base recipe (before the store's "auto" statistics are filled in)
    data_sha256: dict[str, str]
    study: str
    out: Path
    storage: StorageSpec
    default_storage: bool
    metric: str = "val_acc"
    trials: int = 20
    timeout: float | None = None
    sampler: str = "tpe"
    seed: int | None = None
    pruner: str = "median"
    startup_trials: int = 5
    heartbeat: int = 30

    @property
    def direction(self) -> str:
        return METRICS[self.metric][0]

    def identity(self) -> dict[str, Any]:
        """What every worker of a study must agree on: recipe (where it runs aside), data, space, objective."""
        recipe = json.loads(json.dumps(self.recipe.to_dict()))
        recipe["data"].pop("store")
        recipe["train"].pop("device")
        recipe["train"].pop("threads")
        return {"recipe": recipe, "data_sha256": self.data_sha256, "space": json.loads(space_signature(
            list(self.params))), "metric": self.metric, "version": 1}


def plan_tune(args) -> TuneConfig:
    """A worker's settings from the command line, every refusal raised here: nothing is written yet."""
    require_optuna()
    recipe = load_recipe(args.recipe, args.overrides)
    params = build_space(args.recipe, args.overrides, args.space_file, args.space)
    _check_numbers(args)
    kfold_all = recipe.split.kind == "kfold" and recipe.split.fold == -1
    if args.pruner == "wilcoxon":
        _check_wilcoxon(recipe, kfold_all)
    if args.metric.startswith("test_") and recipe.split.pool == "train+test":
        raise RecipeError(f"--metric {args.metric}: split.pool = \"train+test\" leaves no test set; use val_acc")
    # The base recipe against its store, then each end of the space (trial folders are checked as they are made).
    store = check_inputs(recipe, Path("."), check_dir=False).store
    for extreme in _extremes(params):
        check_inputs(load_recipe(args.recipe, [*args.overrides, *extreme]), Path("."), check_dir=False)
    study = args.study or f"{recipe.name}-tune"
    if NAME.fullmatch(study) is None:
        raise RecipeError(f"--study {study[:100]!r}: must be one plain name (letters, digits and _ . + -)")
    out = Path(args.out or Path("runs") / study)
    spec = parse_storage(args.storage, out)
    check_own_dir(out, "study")
    _check_study_json(out, study, spec.shown)
    return TuneConfig(recipe_path=args.recipe, overrides=tuple(args.overrides), params=tuple(params),
                      recipe=recipe, data_sha256=dict(store.meta["sha256"]), study=study, out=out, storage=spec,
                      default_storage=args.storage is None, metric=args.metric, trials=args.trials,
                      timeout=args.timeout, sampler=args.sampler, seed=args.seed, pruner=args.pruner,
                      startup_trials=args.startup_trials, heartbeat=args.heartbeat)


def _check_wilcoxon(recipe: Recipe, kfold_all: bool) -> None:
    if not kfold_all:
        raise RecipeError('--pruner wilcoxon: compares trials fold by fold; it needs split.kind = "kfold" with '
                          f'split.fold = -1 (this recipe: kind = "{recipe.split.kind}", fold = {recipe.split.fold})')
    if recipe.split.k < 4:  # a one-sided signed-rank test on n pairs has p >= 2^-n: p < 0.1 needs n >= 4
        raise RecipeError(f"--pruner wilcoxon: with split.k = {recipe.split.k} folds it can never prune (p < 0.1 "
                          "needs at least 4 paired fold scores); use --pruner median")
    try:
        import scipy.stats  # noqa: F401 - Optuna's WilcoxonPruner needs it; Optuna itself does not install it
    except ImportError:
        raise RecipeError("--pruner wilcoxon: needs scipy (pip install scipy)") from None


def _check_numbers(args) -> None:
    for flag, value, lo in (("--trials", args.trials, 1), ("--heartbeat", args.heartbeat, 1),
                            ("--startup-trials", args.startup_trials, 0)):
        if value < lo:
            raise RecipeError(f"{flag}: must be >= {lo}, got {value}")
    if args.timeout is not None and not args.timeout > 0:
        raise RecipeError(f"--timeout: must be > 0 seconds, got {args.timeout}")


def _extremes(params) -> list[list[str]]:
    """One override list per end of each range and per choice, the other keys at the recipe's values."""
    out = []
    for p in params:
        values = [v for v, _ in p.choices] if p.kind == "choice" else [p.low, p.high]
        out += [overrides_for([p], {p.key: v}) for v in values]
    return out


def _check_study_json(out: Path, study: str, storage: str) -> None:
    try:
        saved = json.loads((out / STUDY_JSON).read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise FastCifarError(f"{out / STUDY_JSON}: unreadable ({first_line(e)}); choose another --out") from None
    if not isinstance(saved, dict) or saved.get("study") != study or saved.get("storage") != storage:
        raise FastCifarError(f"{out}: holds study {saved.get('study')!r} of {saved.get('storage')}, not {study!r} "
                             f"of {storage}; choose another --out")


def make_study_dir(out: Path, study: str, storage: str) -> None:
    """The study folder, appearing at once with its marker and study.json (a temp folder renamed into place), so
    a second worker starting beside this one never sees it half made."""
    if check_own_dir(out, "study"):
        _check_study_json(out, study, storage)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    write_marker(tmp, "study")
    write_json(tmp / STUDY_JSON, {"study": study, "storage": storage})
    try:
        os.rename(tmp, out)  # onto a missing or empty folder; refused if another worker's is already there
    except OSError:
        for name in (marker(tmp, "study").name, STUDY_JSON):
            with contextlib.suppress(FileNotFoundError):
                (tmp / name).unlink()
        tmp.rmdir()
        if not check_own_dir(out, "study"):
            raise NotOurs(f"{out}: could not be made a study folder; choose another --out") from None
        _check_study_json(out, study, storage)


def open_study(cfg: TuneConfig, storage, sampler, pruner):
    """Create or join the study; a study made with another recipe, data, space or objective is refused."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        study = optuna.create_study(storage=storage, study_name=cfg.study, direction=cfg.direction,
                                    load_if_exists=True, sampler=sampler, pruner=pruner)
    except (SQLAlchemyError, OSError, ValueError, RuntimeError) as e:
        raise FastCifarError(f"--storage {cfg.storage.shown}: cannot open study {cfg.study!r} "
                             f"({first_line(e)[:200]})") from None
    if study.direction.name.lower() != cfg.direction:
        raise FastCifarError(f"study {cfg.study!r} in {cfg.storage.shown} is to {study.direction.name.lower()}, "
                             f"not {cfg.direction} ({cfg.metric}); use its metric or another --study")
    want = cfg.identity()
    have = study.user_attrs.get("fastcifar")
    if have is None:
        if study.trials:
            raise FastCifarError(f"study {cfg.study!r} in {cfg.storage.shown} was not made by fastcifar tune "
                                 f"({len(study.trials)} trials); choose another --study")
        study.set_user_attr("fastcifar", want)
        # two workers starting together may both set it: the value stored last is the study's
        have = optuna.load_study(study_name=cfg.study, storage=storage).user_attrs["fastcifar"]
    if (diff := first_difference(have, want)) is not None:
        raise FastCifarError(f"study {cfg.study!r} in {cfg.storage.shown} was made with another {diff}; start this "
                             "worker with the study's recipe, --set, space and --metric, or choose another --study")
    return study


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first dotted key where two JSON values differ (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if (d := first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)) is not None:
                return d
        return None
    return None if a == b else (path or "value")
