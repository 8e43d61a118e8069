"""The end of a `fastcifar tune` worker: STUDY_DIR/tune.md (the best trial, its recipe ready to train, a table of
trials, figures), STUDY_DIR/best.toml, and the figures in STUDY_DIR/figures/ — each written atomically, from
what the study's storage holds at that moment (every worker writes them as it leaves: the last one sees all).

Figures are drawn on matplotlib Figures without pyplot (fastcifar.figures' way): the optimisation history, the
parameter importances (Optuna's PED-ANOVA: no scikit-learn needed) and a slice plot (the metric against each
parameter). A figure that cannot be drawn (too few finished trials) is named in tune.md with the reason.
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path
from typing import Any

from fastcifar.atomic import write_text
from fastcifar.errors import first_line
from fastcifar.figures import new_figure, save_png
from fastcifar.ownership import MD_MARKER
from fastcifar.recipe import load_recipe, recipe_to_toml
from fastcifar.runfiles import FIGURES_DIR
from fastcifar.tune_space import overrides_for
from fastcifar.tune_study import TuneConfig



def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)


def _folder(t, out: Path) -> str:
    path = t.user_attrs.get("run_dir")
    if path is None:
        return "–"
    if t.user_attrs.get("host") == socket.gethostname():
        try:
            return str(Path(path).relative_to(out.resolve()))
        except ValueError:
            return path
    return f"{t.user_attrs.get('host')}:{path}"


def _note(t, retries: dict[int, int]) -> str:
    note = t.user_attrs.get("note", "")
    if t.state.name == "FAIL" and not note:
        note = "its worker stopped (a signal, or no heartbeat)"
    if t.number in retries:
        note += f"; run again as trial {retries[t.number]}"
    return note


def _row(t, cfg: TuneConfig, retries: dict[int, int]) -> list[str]:
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
        t.datetime_start else None
    step = max(t.intermediate_values) if t.intermediate_values else None
    return [str(t.number), t.state.name.lower(), _fmt(t.value), *(_fmt(t.params.get(p.key)) for p in cfg.params),
            _fmt(step), "–" if seconds is None else f"{seconds:.0f}", _folder(t, cfg.out),
            _note(t, retries)]


def best_recipe_toml(cfg: TuneConfig, best) -> str:
    """The base recipe with the best trial's values, named like the base: `fastcifar train best.toml`."""
    params = list(cfg.params)
    return recipe_to_toml(load_recipe(cfg.recipe_path, [*cfg.overrides, *overrides_for(params, best.params)]))


def write_tune_report(study, cfg: TuneConfig, console) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("note") != "surplus"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    figures = _figures(study, cfg, trials, complete)
    lines = [MD_MARKER.format(kind="tune"), f"# Study {cfg.study}", "",
             f"Storage `{cfg.storage.shown}`; objective {cfg.metric} ({cfg.direction}); sampler {cfg.sampler}, "
             f"pruner {cfg.pruner}. {len(complete)} complete, "
             f"{sum(t.state == TrialState.PRUNED for t in trials)} pruned, "
             f"{sum(t.state == TrialState.FAIL for t in trials)} failed, "
             f"{sum(t.state == TrialState.RUNNING for t in trials)} running, of {cfg.trials} asked.", ""]
    if best is not None:
        toml = best_recipe_toml(cfg, best)
        write_text(cfg.out / "best.toml", toml)
        sets = " ".join(f"--set {s}" for s in overrides_for(list(cfg.params), best.params))
        lines += [f"## Best: trial {best.number}, {cfg.metric} {best.value:.4f}", "",
                  f"`{sets}` ({_folder(best, cfg.out)}). Its recipe, ready to train: "
                  f"`fastcifar train {cfg.out / 'best.toml'}`", "", "<details><summary>best.toml</summary>", "",
                  "```toml", toml.rstrip(), "```", "", "</details>", ""]
    header = ["trial", "state", cfg.metric, *(p.key for p in cfg.params), "last report", "time (s)", "folder", "note"]
    lines += ["## Trials", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    retries = {t.system_attrs["failed_trial"]: t.number for t in trials if "failed_trial" in t.system_attrs}
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _row(t, cfg, retries)) + " |" for t in trials]
    lines += ["", "last report: the pruner's last step (the epoch, counted on across k-fold's folds; the fold for "
              "the Wilcoxon pruner). A pruned or stopped trial's folder resumes by hand: `fastcifar train "
              "DIR/recipe.toml --out DIR --resume`.", "", "## Figures", ""]
    for title, path, error in figures:
        lines.append(f"![{title}]({path})" if path else f"- {title}: not drawn ({error})")
    md = cfg.out / "tune.md"
    write_text(md, "\n".join(lines) + "\n")
    _print(console, trials, cfg, best, md)
    return {"tune_md": md, "best": best.number if best else None, "best_value": best.value if best else None,
            "complete": len(complete), "trials": len(trials), "figures": [p for _, p, _ in figures if p]}


def _print(console, trials, cfg: TuneConfig, best, md: Path) -> None:
    from rich.table import Table

    table = Table(title=f"study {cfg.study}")
    for h in ["trial", "state", cfg.metric, *(p.key for p in cfg.params), "last report", "time (s)", "folder"]:
        table.add_column(h, justify="right")
    for t in trials:
        table.add_row(*_row(t, cfg, {})[:-1])
    console.print(table)
    if best is not None:
        sets = " ".join(f"--set {s}" for s in overrides_for(list(cfg.params), best.params))
        console.print(f"best: trial {best.number}, {cfg.metric} {best.value:.4f}: {sets}")
        console.print(f"train it: fastcifar train {cfg.out / 'best.toml'}")
    console.print(f"wrote {md}")


def _figures(study, cfg: TuneConfig, trials, complete) -> list[tuple[str, str | None, str | None]]:
    out = []
    for title, name, draw in (("optimisation history", "history.png", _history),
                              ("parameter importances", "importance.png", _importance),
                              ("slice", "slice.png", _slice)):
        try:
            draw(study, cfg, trials, complete, cfg.out / FIGURES_DIR / name)
            out.append((title, f"{FIGURES_DIR}/{name}", None))
        except Exception as e:  # noqa: BLE001 - a figure never costs the study's report
            out.append((title, None, first_line(e)[:200]))
    return out


def _history(study, cfg: TuneConfig, trials, complete, path: Path) -> None:
    if not complete:
        raise ValueError("no complete trial yet")
    fig = new_figure(6.5, 3.6)
    ax = fig.add_subplot()
    xs, ys = [t.number for t in complete], [t.value for t in complete]
    ax.scatter(xs, ys, label="complete", color="#1f77b4", zorder=3)
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.intermediate_values]
    if pruned:
        ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                   marker="x", color="#888888", label="pruned (last report)", zorder=2)
    pick = max if cfg.direction == "maximize" else min
    best, running = [], None
    for t in sorted(complete, key=lambda t: t.number):
        running = t.value if running is None else pick(running, t.value)
        best.append(running)
    ax.step(sorted(xs), best, where="post", color="#c62828", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(cfg.metric)
    ax.set_title(f"{cfg.study}: optimisation history")
    ax.legend(fontsize=8)
    save_png(fig, path)


def _importance(study, cfg: TuneConfig, trials, complete, path: Path) -> None:
    import optuna

    if len(complete) < 2:
        raise ValueError(f"{len(complete)} complete trial(s); importances need at least 2")
    cls = getattr(optuna.importance, "PedAnovaImportanceEvaluator", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" and small-sample warnings: the figure says what it is
        imp = optuna.importance.get_param_importances(study, evaluator=cls() if cls else None)
    names = list(imp)[::-1]
    fig = new_figure(6.5, 0.5 + 0.45 * max(len(names), 2))
    ax = fig.add_subplot()
    ax.barh(names, [imp[n] for n in names], color="#1f77b4")
    ax.set_xlabel("importance (PED-ANOVA, normalised)" if cls else "importance (normalised)")
    ax.set_title(f"{cfg.study}: parameter importances ({len(complete)} trials)")
    save_png(fig, path)


def _slice(study, cfg: TuneConfig, trials, complete, path: Path) -> None:
    if not complete:
        raise ValueError("no complete trial yet")
    params = list(cfg.params)
    fig = new_figure(3.2 * len(params) + 0.5, 3.2)
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, p in zip(axes, params):
        done = [t for t in complete if p.key in t.params]
        xs = [t.params[p.key] if p.kind != "choice" else str(t.params[p.key]) for t in done]
        ax.scatter(xs, [t.value for t in done], c=[t.number for t in done], cmap="viridis")
        if p.log:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # "2x10^-2 3x10^-2 ..." labels would overlap
        ax.set_xlabel(p.key)
    axes[0].set_ylabel(cfg.metric)
    fig.suptitle(f"{cfg.study}: {cfg.metric} against each parameter (colour: trial number)")
    save_png(fig, path)
