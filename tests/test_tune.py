"""fastcifar tune: workers sharing one study, a worker killed mid-trial, pruning, one-line refusals."""

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from conftest import tiny_table
from fastcifar.cli import _parser, main
from fastcifar.recipe import recipe_from_dict, recipe_to_toml

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from fastcifar.tune import run_tune, start_study  # noqa: E402
from fastcifar.tune_study import plan_tune  # noqa: E402

QUIET = Console(quiet=True)
SPACE = ["--space", "optim.lr=0.005:0.2:log"]


def _recipe(tmp_path: Path, store, name="tiny", **sections) -> Path:
    path = tmp_path / f"{name}.toml"
    table = tiny_table(store, **sections)
    table["train"] = {**table["train"], "threads": 1, **sections.get("train", {})}
    path.write_text(recipe_to_toml(recipe_from_dict(table)))
    return path


def _worker(recipe: Path, out: Path, storage: str, trials: int = 4, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastcifar", "tune", str(recipe), *SPACE, "--trials", str(trials), "--out",
           str(out), "--storage", storage, "--study", "s", "--heartbeat", "1", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _storage(url: str):
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
    return url


def _study(url: str):
    return optuna.load_study(study_name="s", storage=_storage(url))


def _epochs(run_dir: Path) -> list[str]:
    with open(run_dir / "metrics.csv") as f:
        return [row["epoch"] for row in csv.DictReader(f)]


def _trained(log: str) -> list[int]:
    """Trial numbers a worker finished, from its own lines ("trial 3: val_acc 0.8125")."""
    return [int(n) for n in re.findall(r"^trial (\d+): val_acc ", log, re.M)]


def _finished(study) -> list:
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_two_workers_share_one_study_and_finish_exactly_n_trials(store, tmp_path):
    recipe = _recipe(tmp_path, store, train={"epochs": 2})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    workers = [_worker(recipe, tmp_path / "s", url) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    study = _study(url)
    done = _finished(study)
    assert len(done) == 4  # exactly --trials, over both workers
    for t in study.get_trials():  # any other trial was asked in a race and left unrun, without a folder
        assert t in done or (t.state == TrialState.FAIL and t.user_attrs["note"] == "surplus"
                             and "run_dir" not in t.user_attrs)
    dirs = [Path(t.user_attrs["run_dir"]) for t in done]
    assert len(set(dirs)) == 4 and all(_epochs(d) == ["1", "2"] for d in dirs)  # each trained once, start to end
    per_worker = [_trained(log) for log in logs]
    assert all(per_worker), logs  # both workers trained trials of the one study...
    assert sorted(per_worker[0] + per_worker[1]) == sorted(t.number for t in done)  # ...none of them twice
    assert not any("resumed" in log for log in logs)
    md = (tmp_path / "s" / "tune.md").read_text()
    assert md.startswith("<!-- written by fastcifar: tune -->") and "## Best: trial" in md
    assert all(f"| {t.number} | complete |" in md for t in done)
    assert (tmp_path / "s" / "best.toml").exists() and (tmp_path / "s" / "figures" / "history.png").exists()


def _wait(proc, condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = condition()
        if found:
            return found
        time.sleep(0.005)
    return None


def test_a_worker_killed_mid_trial_loses_only_that_trial(store, tmp_path):
    recipe = _recipe(tmp_path, store, train={"epochs": 3})
    url = f"journal:{tmp_path / 'journal.log'}"  # the journal gets its heartbeat from fastcifar
    out = tmp_path / "s"
    survivor, victim = _worker(recipe, out, url), _worker(recipe, out, url)

    def victim_trial():  # a trial whose run lock the victim holds, after its first epoch: mid-trial
        for lock in out.glob("trial-*/.lock"):
            try:
                if lock.read_text().strip() == str(victim.pid) and (lock.parent / "checkpoints" / "last.pt").exists():
                    return lock.parent
            except OSError:
                pass
        return None

    held = _wait(victim, victim_trial, 300)
    assert held is not None, "the second worker never started a trial"
    victim.send_signal(signal.SIGKILL)  # no handler runs: its trial stays RUNNING until its heartbeat is stale
    victim.communicate()
    log = survivor.communicate(timeout=600)[0]
    assert survivor.returncode == 0, log
    killed = int(held.name.split("-")[1])
    study = _study(url)
    assert len(_finished(study)) == 4
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed].state == TrialState.FAIL  # failed by the survivor once its heartbeat went stale
    again = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed]
    assert len(again) == 1 and again[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert again[0].params == trials[killed].params  # the same parameters, run again by the survivor
    assert f"(retry of trial {killed})" in log and again[0].number in _trained(log)
    assert (held / "checkpoints" / "last.pt").exists()  # the killed trial's folder is kept (resumable by hand)
    assert f"run again as trial {again[0].number}" in (out / "tune.md").read_text()


def _plan(recipe: Path, out: Path, *extra: str):
    args = _parser().parse_args(["tune", str(recipe), "--out", str(out), "--study", "p", *extra])
    return plan_tune(args)


def _seeded_study(cfg, reports: dict[int, float], value: float):
    """The study with one finished trial of these reports, and the next trial's lr queued at 1e-5 (too low to
    learn anything in a few epochs: its validation accuracy stays near chance)."""
    study = start_study(cfg)
    dist = {"optim.lr": optuna.distributions.FloatDistribution(1e-5, 0.2, log=True)}
    study.add_trial(optuna.trial.create_trial(params={"optim.lr": 0.05}, distributions=dist, value=value,
                                              intermediate_values=reports))
    study.enqueue_trial({"optim.lr": 1e-5})
    return study


@pytest.mark.parametrize("earlier", [0.95, 0.0])
def test_pruning_stops_a_trial_whose_reports_are_worse(store, tmp_path, earlier):
    recipe = _recipe(tmp_path, store, train={"epochs": 3})
    out = tmp_path / "s"
    cfg = _plan(recipe, out, "--space", "optim.lr=1e-5:0.2:log", "--trials", "2", "--startup-trials", "1")
    _seeded_study(cfg, {1: earlier, 2: earlier, 3: earlier}, earlier)
    run_tune(cfg, QUIET)
    trial = optuna.load_study(study_name="p", storage=cfg.storage.url).trials[1]
    run_dir = Path(trial.user_attrs["run_dir"])
    if earlier == 0.95:  # its epoch-1 accuracy is below the median of the earlier trial's: stopped there
        assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
        assert trial.intermediate_values[1] < 0.95 and trial.user_attrs["note"].startswith("pruned after epoch 1")
        assert _epochs(run_dir) == ["1"] and (run_dir / "checkpoints" / "last.pt").exists()
        assert not (run_dir / "summary.json").exists()  # an unfinished run: resumable by hand
    else:  # the same trial against worse reports runs to the end
        assert trial.state == TrialState.COMPLETE and _epochs(run_dir) == ["1", "2", "3"]


def test_wilcoxon_prunes_fold_by_fold(store, tmp_path):
    recipe = _recipe(tmp_path, store, split={"kind": "kfold", "k": 5}, train={"epochs": 1})
    cfg = _plan(recipe, tmp_path / "s", "--space", "optim.lr=1e-5:0.2:log", "--trials", "2", "--pruner",
                "wilcoxon")
    _seeded_study(cfg, {f: 0.95 for f in range(5)}, 0.95)
    run_tune(cfg, QUIET)
    trial = optuna.load_study(study_name="p", storage=cfg.storage.url).trials[1]
    assert trial.state == TrialState.PRUNED
    # a one-sided signed-rank test on 4 worse folds has p = 1/16 < 0.1: fold 4 never trains
    assert sorted(trial.intermediate_values) == [0, 1, 2, 3]
    run_dir = Path(trial.user_attrs["run_dir"])
    assert (run_dir / "fold3" / "metrics.csv").exists() and not (run_dir / "fold4").exists()


def _foreign_files(tmp_path: Path) -> dict[str, Path]:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE mine (x INTEGER)")
    (tmp_path / "bad.toml").write_text("[optim]\nlr = {lo = 0.1, high = 1.0}\n")
    return {"notes": notes, "other": other, "bad": tmp_path / "bad.toml"}


REFUSALS = [  # (arguments after the recipe, a piece of the one-line error)
    (["--storage", "notaurl"], "not a database URL"),
    (["--storage", "foo://host/db"], "unknown database kind 'foo'"),
    (["--storage", "sqlite:///{tmp}/missing/s.db"], "does not exist"),
    (["--storage", "sqlite://"], "in-memory database cannot be shared"),
    (["--storage", "journal:{tmp}/notes.txt"], "is not an Optuna journal file"),
    (["--storage", "journal:{tmp}/missing/j.log"], "does not exist"),
    (["--storage", "sqlite:///{tmp}/other.db"], "is an SQLite database but not an Optuna storage"),
    (["--storage", "sqlite:///{tmp}"], "is not a file"),  # a folder: it would hang or fail in SQLite
    (["--space", "optim.lr=1:0.1"], "low must be < high"),
    (["--space", "train.label_smoothing=0:0.2:log"], "a log range needs low > 0"),
    (["--space", "optim.bogus=1:2"], "optim.bogus: unknown key"),
    (["--space", "optim.momentum=0.5:1.0"], "optim.momentum: must be in [0, 1)"),
    (["--space", "train.batch_size=16:64.5"], "expected an integer"),
    (["--space", "optim.lr=0.1"], "one value is not a search"),
    (["--space", "train.batch_size=32,4096"], "train.batch_size: 4096 is more than fold 0's 240 training images"),
    (["--space", "optim.lr=0.1:1", "--space", "optim.lr=0.2,0.3"], "optim.lr: given twice"),
    (["--space-file", "{tmp}/bad.toml"], "unknown field 'lo'"),
    ([], "no search space"),
    (["--space", "optim.lr=0.1:1", "--pruner", "wilcoxon"], "--pruner wilcoxon: compares trials fold by fold"),
    (["--space", "optim.lr=0.1:1", "--trials", "0"], "--trials: must be >= 1"),
    (["--space", "optim.lr=0.1:1", "--study", "../up"], "--study '../up': must be one plain name"),
]


@pytest.mark.parametrize("extra,expected", REFUSALS, ids=[e for _, e in REFUSALS])
def test_bad_storage_and_space_are_one_line_before_any_trial(store, tmp_path, capsys, extra, expected):
    recipe = _recipe(tmp_path, store)
    files = _foreign_files(tmp_path)
    before = {p: p.read_bytes() for p in files.values()}
    extra = [e.format(tmp=tmp_path) for e in extra]
    if not any(e.startswith("--space") for e in extra) and "--space-file" not in extra and extra:
        extra = [*SPACE, *extra]
    rc = main(["tune", str(recipe), "--out", str(tmp_path / "s"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fastcifar: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not (tmp_path / "s").exists()  # no study folder, so no trial either
    assert {p: p.read_bytes() for p in files.values()} == before  # the files it refused are untouched


def test_a_database_password_never_reaches_the_error_line(store, tmp_path, capsys):
    recipe = _recipe(tmp_path, store)
    # the driver is missing (one line naming it) or the server is not there (one line): the password is hidden
    rc = main(["tune", str(recipe), *SPACE, "--out", str(tmp_path / "s"), "--storage",
               "postgresql://me:s3cret@127.0.0.1:9/db"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "s3cret" not in err and "me:***@" in err, err
    assert not (tmp_path / "s").exists()


def test_a_worker_with_another_space_is_refused(store, tmp_path, capsys):
    recipe = _recipe(tmp_path, store)
    start_study(_plan(recipe, tmp_path / "s", *SPACE))
    rc = main(["tune", str(recipe), "--out", str(tmp_path / "s"), "--study", "p", "--space", "optim.lr=0.01:0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "was made with another space" in err and err.count("\n") == 1, err
    assert not list((tmp_path / "s").glob("trial-*"))


def test_without_optuna_tune_is_one_line_and_the_rest_runs(store, tmp_path):
    recipe = _recipe(tmp_path, store, train={"epochs": 1})
    code = ("import sys; sys.modules['optuna'] = None\n"  # import optuna now raises ImportError
            "from fastcifar.cli import main\n"
            f"rc = main(['tune', {str(recipe)!r}, '--space', 'optim.lr=0.01:0.1', '--out', {str(tmp_path / 's')!r}])\n"
            f"assert main(['train', {str(recipe)!r}, '--out', {str(tmp_path / 'run')!r}]) == 0\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("fastcifar: error: fastcifar tune needs Optuna, which is not installed: "
                                   "pip install 'fastcifar[tune]'")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["val_acc_mean"] >= 0


def test_a_space_file_and_arguments_give_typed_parameters(store, tmp_path):
    from fastcifar.tune_space import build_space, overrides_for

    recipe = _recipe(tmp_path, store)
    space = tmp_path / "space.toml"
    space.write_text('[optim]\nlr = {low = 0.01, high = 1.0, log = true}\nnesterov = {choices = [true, false]}\n'
                     '[train]\nlabel_smoothing = {low = 0.0, high = 0.2, step = 0.05}\n')
    params = build_space(str(recipe), [], str(space), ["train.batch_size=16:64:16", "augment.color_jitter="
                                                       "[0.1,0.1,0.1,0.0],[0.0,0.0,0.0,0.0]"])
    kinds = {p.key: (p.kind, p.low, p.high, p.log, p.step) for p in params if p.kind != "choice"}
    assert kinds == {"optim.lr": ("float", 0.01, 1.0, True, None), "train.label_smoothing": ("float", 0.0, 0.2,
                     False, 0.05), "train.batch_size": ("int", 16, 64, False, 16)}
    jitter = next(p for p in params if p.key == "augment.color_jitter")
    assert [text for _, text in jitter.choices] == ["[0.1, 0.1, 0.1, 0.0]", "[0.0, 0.0, 0.0, 0.0]"]
    sets = overrides_for(params, {"optim.lr": 0.1, "optim.nesterov": False, "train.label_smoothing": 0.05,
                                  "train.batch_size": 32, "augment.color_jitter": "[0.1, 0.1, 0.1, 0.0]"})
    assert sets == ["optim.lr=0.1", "optim.nesterov=false", "train.label_smoothing=0.05", "train.batch_size=32",
                    "augment.color_jitter=[0.1, 0.1, 0.1, 0.0]"]


def test_timeout_starts_no_trial_and_still_writes_tune_md(store, tmp_path):
    recipe = _recipe(tmp_path, store)
    cfg = _plan(recipe, tmp_path / "s", *SPACE, "--timeout", "1e-9")
    result = run_tune(cfg, QUIET)
    assert result["trials"] == 0 and result["best"] is None
    md = (tmp_path / "s" / "tune.md").read_text()
    assert "0 complete" in md and "- optimisation history: not drawn (no complete trial yet)" in md
    assert not list((tmp_path / "s").glob("trial-*"))


def _open_new_storage(url: str, barrier, results) -> None:
    """One worker's start: every worker waits at the barrier, then opens the new database at once."""
    from fastcifar import tune_storage

    tune_storage.OPEN_TRIES = 1  # no retries: only the turn-taking can keep the workers apart
    spec = tune_storage.parse_storage(url, Path("."))
    barrier.wait()
    try:
        with tune_storage.opening(spec):
            optuna.create_study(storage=tune_storage.open_storage(spec, 1), study_name="s", load_if_exists=True)
        results.put("ok")
    except Exception as e:  # noqa: BLE001 — the test reports whatever a worker met
        results.put(f"{type(e).__name__}: {e}"[:300])


def test_workers_starting_together_on_a_new_sqlite_file_all_open_it(tmp_path):
    # Optuna creates its schema table by table: six workers on one new file, without turns, collide in
    # nearly every round ("table studies already exists"); CI once ran out of retries on two.
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        url, barrier, results = f"sqlite:///{tmp_path / f'study{round_}.db'}", ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_new_storage, args=(url, barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        got = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert got == ["ok"] * 6, got
        assert len(optuna.get_all_study_summaries(url)) == 1
