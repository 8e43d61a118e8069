"""`fastcifar tune RECIPE`: hyper-parameter search with Optuna, one ordinary run folder per trial.

A worker (one `fastcifar tune` process) loops: fail the trials whose worker stopped sending heartbeats (they are
queued again with the same parameters), count the study's trials, start one more if the study still needs it,
else wait for the trials other workers are running (so a trial whose worker dies is retried by a survivor), and
leave when the study has `--trials` finished (complete or pruned) trials. Any number of workers on any number of
machines share a study through its storage (fastcifar.tune_storage). Each trial trains with
fastcifar.run.run_training into STUDY_DIR/trial-NNNN (recipe.toml, metrics.csv, checkpoints, report.md), reports
each validated epoch to the pruner, and returns a metric of summary.json (the mean over folds for k-fold).

Exactly `--trials`: workers that ask for a trial at the same moment may both get one; a trial that finds
`--trials` unfailed trials numbered before it is left unrun (marked failed, note "surplus") before it samples or
writes anything.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import warnings
from typing import Any

from fastcifar.errors import DataError, RecipeError
from fastcifar.lifecycle import Interrupted
from fastcifar.recipe import Recipe, load_recipe
from fastcifar.run import run_training
from fastcifar.state import EarlyStopping
from fastcifar.step import NonFiniteError, OutOfMemory
from fastcifar.context import Hooks
from fastcifar.tune_space import overrides_for, suggest
from fastcifar.tune_storage import open_storage, opening, retry_callback
from fastcifar.tune_study import METRICS, TuneConfig, make_study_dir, open_study, require_optuna


def build_sampler(cfg: TuneConfig):
    optuna = require_optuna()
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    with warnings.catch_warnings():  # constant_liar is "experimental" in Optuna; it is what parallel workers need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: a running trial counts as a poor result, so parallel workers do not all sample one point
        return optuna.samplers.TPESampler(seed=cfg.seed, constant_liar=True)


def build_pruner(cfg: TuneConfig):
    optuna = require_optuna()
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials)
    if cfg.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if cfg.pruner == "wilcoxon":  # per-fold scores against the best trial's, fold by fold (a paired test)
        with warnings.catch_warnings():  # "experimental" in Optuna since 3.6
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1)
    return optuna.pruners.NopPruner()


class Reporter:
    """Hooks.on_epoch_row: report each validated epoch (step = epoch, counted on across k-fold's folds), or for
    the Wilcoxon pruner each fold's score at its best epoch (step = fold), and ask the pruner after each report."""

    def __init__(self, trial, recipe: Recipe, key: str, by_fold: bool):
        self.trial, self.recipe, self.key, self.by_fold = trial, recipe, key, by_fold
        self.all_folds = recipe.split.kind == "kfold" and recipe.split.fold == -1
        self.best: dict[int, dict] = {}
        self.reported: set[int] = set()

    def __call__(self, fold: int, row: dict[str, Any]) -> None:
        if row[self.key] is None:  # eval.every: not validated this epoch
            return
        if not self.by_fold:
            step = (fold if self.all_folds else 0) * self.recipe.train.epochs + int(row["epoch"])
            return self._report(row[self.key], step, f"epoch {row['epoch']}" + (f" of fold {fold}"
                                                                               if self.all_folds else ""))
        score = EarlyStopping(self.recipe.eval.metric, 0).score
        if fold not in self.best or score(row) > score(self.best[fold]):
            self.best[fold] = row  # the epoch best.pt holds: result.json's number for this fold
        for f in sorted(f for f in self.best if f not in self.reported and (f < fold or (
                f == fold and int(row["epoch"]) == self.recipe.train.epochs))):
            self.reported.add(f)
            self._report(self.best[f][self.key], f, f"fold {f}")

    def _report(self, value: float, step: int, where: str) -> None:
        import optuna

        self.trial.report(float(value), step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after {where}: {self.key} {value:.4f}")


class _Surplus(Exception):
    """A trial asked for after the study had its trials: left unrun."""


class Objective:
    def __init__(self, cfg: TuneConfig, console):
        self.cfg, self.console = cfg, console
        self.current: int | None = None

    def __call__(self, trial) -> float:
        import optuna

        cfg, n = self.cfg, trial.number
        self.current = n
        if surplus(trial.study, n, cfg.trials):
            trial.set_user_attr("note", "surplus")
            raise _Surplus(f"the study had its {cfg.trials} trials when trial {n} was asked for; left unrun")
        values = suggest(trial, list(cfg.params))
        sets = overrides_for(list(cfg.params), values)
        run_dir = cfg.out / f"trial-{n:04d}"
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("host", socket.gethostname())
        retry = retried_from(trial.study, n)
        self.console.print(f"[bold]trial {n}[/bold]" + (f" (retry of trial {retry})" if retry is not None else "")
                           + f": {' '.join(sets)} -> {run_dir}")
        try:
            name = f"{cfg.recipe.name[:80]}-trial{n:04d}"
            recipe = load_recipe(cfg.recipe_path, [*cfg.overrides, *sets, f'name="{name}"'])
            key = METRICS[cfg.metric][1]
            reporter = Reporter(trial, recipe, key, by_fold=cfg.pruner == "wilcoxon")
            summary = run_training(recipe, run_dir, self.console, hooks=Hooks(on_epoch_row=reporter))
        except optuna.TrialPruned as e:
            return self._pruned(trial, str(e))
        except NonFiniteError as e:
            return self._pruned(trial, f"diverged: {e}")
        except OutOfMemory as e:
            return self._pruned(trial, f"out of memory: {e}")
        except (RecipeError, DataError) as e:  # this trial's values refused (checked before its folder exists)
            return self._pruned(trial, f"refused: {e}")
        value = float(summary[f"{cfg.metric}_mean"])
        self.console.print(f"trial {n}: {cfg.metric} {value:.4f}")
        return value

    def _pruned(self, trial, note: str):
        import optuna

        trial.set_user_attr("note", note[:300])
        self.console.print(f"[yellow]trial {trial.number}: {note[:300]}[/yellow]")
        raise optuna.TrialPruned(note)


def retried_from(study, number: int) -> int | None:
    """The trial this one runs again (queued by the retry callback), if any."""
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    return None if frozen is None else frozen.system_attrs.get("failed_trial")


def surplus(study, number: int, trials: int) -> bool:
    """True when `trials` unfailed trials are numbered before this one (numbers are given out in order)."""
    from optuna.trial import TrialState

    ahead = [t for t in study.get_trials(deepcopy=False) if t.number < number and t.state != TrialState.FAIL]
    return len(ahead) >= trials


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {"finished": sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states),
            "running": states.count(TrialState.RUNNING), "waiting": states.count(TrialState.WAITING),
            "failed": states.count(TrialState.FAIL)}


def fail_stale(study) -> None:
    optuna = require_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def start_study(cfg: TuneConfig):
    """The study folder and the study, in the order that keeps every failure before anything is written: a
    storage of the user's is opened first; the default SQLite file lives in the study folder, made first."""
    if cfg.default_storage:
        make_study_dir(cfg.out, cfg.study, cfg.storage.shown)
    with opening(cfg.storage):
        study = open_study(cfg, open_storage(cfg.storage, cfg.heartbeat), build_sampler(cfg), build_pruner(cfg))
    if not cfg.default_storage:
        make_study_dir(cfg.out, cfg.study, cfg.storage.shown)
    return study


def run_tune(cfg: TuneConfig, console) -> dict[str, Any]:
    """One worker, until the study has cfg.trials finished trials (or --timeout passes); then tune.md."""
    from fastcifar.tune_report import write_tune_report

    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a worker prints its own lines per trial
    logging.getLogger("optuna.study._optimize").addFilter(_no_trial_failed)
    study = start_study(cfg)
    objective = Objective(cfg, console)
    deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
    worker = f"{socket.gethostname()}:{os.getpid()}"
    console.print(f"tune {cfg.study} ({cfg.storage.shown}): worker {worker}, {cfg.trials} trials, {cfg.metric} "
                  f"({cfg.direction}), sampler {cfg.sampler}, pruner {cfg.pruner}")
    waiting = False
    while True:
        fail_stale(study)
        c = counts(study)
        if c["finished"] >= cfg.trials:
            break
        if deadline is not None and time.monotonic() >= deadline:
            console.print(f"tune: --timeout reached; {c['finished']} of {cfg.trials} trials finished")
            break
        if c["waiting"] or c["finished"] + c["running"] < cfg.trials:
            waiting = False
            one_trial(study, objective, cfg)
            continue
        if not waiting:
            console.print(f"tune: {c['running']} trial(s) still running in other workers; waiting (a trial whose "
                          f"worker stops sending heartbeats for {2 * cfg.heartbeat} s is run again here)")
        waiting = True
        time.sleep(min(cfg.heartbeat, 5))
    return write_tune_report(study, cfg, console)


def _no_trial_failed(record: logging.LogRecord) -> bool:
    """Optuna's "Trial N failed ..." warnings (with a traceback) repeat what the worker prints in one line: a
    stopped trial, a surplus one, or an error the command line reports itself."""
    return not re.match(r"Trial \d+ failed", record.getMessage())


def one_trial(study, objective: Objective, cfg: TuneConfig) -> None:
    """study.optimize for one trial (it records the heartbeat); a worker stopped by a signal queues its trial
    again for the study before it leaves."""
    objective.current = None
    try:
        with warnings.catch_warnings():  # Optuna 4.3 calls its "experimental" fail_stale_trials unsilenced
            warnings.simplefilter("ignore", require_optuna().exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=1, catch=(_Surplus,))
    except (Interrupted, KeyboardInterrupt) as e:
        if objective.current is None:
            raise
        n = objective.current
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == n), None)
        if trial is not None and trial.state.name == "FAIL":
            retry_callback(2)(study, trial)
        where = cfg.out / f"trial-{n:04d}"
        if isinstance(e, Interrupted):
            raise Interrupted(f"tune worker stopped in trial {n} ({where}, checkpoint kept); the trial is queued "
                              "again for the study; rerun the same command to carry on", e.exit_code - 128) from None
        raise
