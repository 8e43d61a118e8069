"""Where a `fastcifar tune` study lives: Optuna storage named by a URL, shared by every worker of the study.

- `sqlite:///PATH` (the default: STUDY_DIR/study.db): one machine, or a few workers on it.
- any RDB URL SQLAlchemy knows (`postgresql://user:pass@host/db`, `mysql+pymysql://...`): many machines.
- `journal:PATH`: Optuna's journal file (an append-only log with file locks; on a shared file system it needs no
  database server).

Every storage gets a heartbeat: a worker's trial records one every `heartbeat` seconds, and a RUNNING trial
whose last one is older than twice that is failed by the next worker that looks, and queued again with the same
parameters (Optuna's RetryFailedTrialCallback). Optuna's RDB storage does this itself; its journal storage has
no heartbeat, so _journal_class adds one as a trial system attribute (wall-clock seconds: the workers'
clocks must agree to well within the grace period, as NTP keeps them).

Everything that can be wrong with a URL (its form, an unknown database kind, a missing driver, a folder that does
not exist, a file that is not an Optuna storage, a server that refuses) is one line, raised before any trial.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fastcifar.errors import FastCifarError, first_line

HEARTBEAT_ATTR = "fastcifar:heartbeat"
OPEN_TRIES = 4  # 0 + 0.5 + 1 + 1.5 s of waiting: enough for another worker to finish creating the schema
# the missing driver module -> what installs it
DRIVERS = {"psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'", "pymysql": "pymysql",
           "MySQLdb": "mysqlclient", "asyncpg": "asyncpg"}


class StorageError(FastCifarError):
    """A --storage URL that cannot hold a study."""


@dataclass(frozen=True)
class StorageSpec:
    kind: str  # "rdb" or "journal"
    url: str  # the RDB URL, or the journal file's path
    shown: str  # for messages and tune.md: the password hidden
    sqlite_file: str | None = None  # a local SQLite database: its workers take turns creating the schema


def parse_storage(url: str | None, study_dir: Path) -> StorageSpec:
    """The storage --storage names (default: SQLite in the study folder), checked without writing anything."""
    if url is None:
        path = (study_dir / "study.db").resolve()
        return StorageSpec("rdb", f"sqlite:///{path}", f"sqlite:///{path}", str(path))
    if url.startswith("journal:"):
        return _journal_spec(url)
    return _rdb_spec(url)


def _journal_spec(url: str) -> StorageSpec:
    path = Path(url[len("journal:"):]).expanduser()
    if not str(path) or str(path) == ".":
        raise StorageError(f"--storage {url}: expected journal:PATH (a journal file)")
    if not path.parent.is_dir():
        raise StorageError(f"--storage {url}: folder {path.parent} does not exist")
    if path.exists():
        if not path.is_file():
            raise StorageError(f"--storage {url}: {path} is not a file")
        with open(path, "rb") as f:
            first = f.readline(1 << 16)
        try:
            ok = not first or "op_code" in json.loads(first)
        except (ValueError, TypeError, RecursionError):
            ok = False
        if not ok:  # appending to a file that is not a journal would damage it
            raise StorageError(f"--storage {url}: {path} is not an Optuna journal file")
    return StorageSpec("journal", str(path), f"journal:{path}")


def _rdb_spec(url: str) -> StorageSpec:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"--storage {url[:200]}: not a database URL (expected sqlite:///PATH, "
                           "postgresql://USER:PASS@HOST/DB, mysql+pymysql://..., or journal:PATH)") from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise StorageError(f"--storage {shown}: unknown database kind {backend!r} (sqlite, postgresql, mysql, ...; "
                           "or journal:PATH)") from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        hint = DRIVERS.get(e.name or "", e.name or "its driver")
        raise StorageError(f"--storage {shown}: the {backend} driver is not installed ({first_line(e)}); "
                           f"pip install {hint}") from None
    if backend == "sqlite":
        _check_sqlite(parsed.database, shown)
        return StorageSpec("rdb", url, shown, str(Path(parsed.database).resolve()))
    return StorageSpec("rdb", url, shown)


def _check_sqlite(database: str | None, shown: str) -> None:
    if not database or database == ":memory:":
        raise StorageError(f"--storage {shown}: an in-memory database cannot be shared; name a file "
                           "(sqlite:///PATH/study.db)")
    path = Path(database)
    if not path.parent.is_dir():
        raise StorageError(f"--storage {shown}: folder {path.parent} does not exist")
    if path.exists() and not path.is_file():
        raise StorageError(f"--storage {shown}: {path} is not a file")
    if path.exists() and path.stat().st_size:  # an existing database must be an Optuna one: never add to others
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise StorageError(f"--storage {shown}: {path} is not an SQLite database ({first_line(e)})") from None
        if not {"studies", "trials", "version_info"} <= tables:
            raise StorageError(f"--storage {shown}: {path} is an SQLite database but not an Optuna storage")


def open_storage(spec: StorageSpec, heartbeat: int, max_retry: int = 2):
    """The Optuna storage, with the heartbeat and the retry of stale trials."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    retry = retry_callback(max_retry)
    if spec.kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        return _journal_class()(JournalFileBackend(spec.url), heartbeat, retry)
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(OPEN_TRIES):
        try:
            with _quiet():
                return optuna.storages.RDBStorage(spec.url, heartbeat_interval=heartbeat,
                                                  grace_period=2 * heartbeat, **{_stale_keyword(): retry})
        except (IntegrityError, OperationalError) as e:
            # workers starting together race to create the schema (alembic_version is written once): the loser
            # finds it made a moment later; a server that is not there fails every try
            if attempt == OPEN_TRIES - 1:
                raise StorageError(f"--storage {spec.shown}: cannot open it ({first_line(e)[:200]})") from None
            time.sleep(0.5 * (attempt + 1))
        except (SQLAlchemyError, OSError, RuntimeError, ValueError) as e:
            raise StorageError(f"--storage {spec.shown}: cannot open it ({first_line(e)[:200]})") from None


@contextlib.contextmanager
def opening(spec: StorageSpec) -> Iterator[None]:
    """Workers of one local SQLite study open it one at a time. Optuna creates the schema table by table and
    stamps its version without a transaction around it all; six workers started at once on a new file failed
    (`table studies already exists`, `UNIQUE constraint failed: alembic_version`) in 15 of 15 tries here, and
    a loaded CI machine ran out of retries. An flock on the database file itself (made empty, as SQLite would
    make it) does not touch SQLite's own locks, which are fcntl byte ranges; other databases keep the retries."""
    if spec.sqlite_file is None:
        yield
        return
    try:
        fd = os.open(spec.sqlite_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StorageError(f"--storage {spec.shown}: cannot open it ({first_line(e)[:200]})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna marks the heartbeat and the retry callback "experimental" (since v2.8); they are what we use."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def retry_callback(max_retry: int):
    """Queues a failed trial again with its parameters (Optuna 4.9 renamed the class; both are supported)."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    with _quiet():
        return cls(max_retry=max_retry)


def _stale_keyword() -> str:
    import inspect

    import optuna

    names = inspect.signature(optuna.storages.RDBStorage).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in names else "failed_trial_callback"


def _journal_class():
    """JournalStorage with Optuna's heartbeat interface (its base class is internal to Optuna, hence the lazy
    import): study.optimize then records heartbeats and fails stale trials exactly as it does for RDB."""
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    class _Journal(optuna.storages.JournalStorage, BaseHeartbeat):
        def __init__(self, backend, interval: int, callback):
            super().__init__(backend)
            self.interval, self.callback = interval, callback

        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now, stale = time.time(), []
            for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                beat = t.system_attrs.get(HEARTBEAT_ATTR)
                if beat is not None and now - float(beat) > 2 * self.interval:
                    stale.append(t._trial_id)
            return stale

        def get_heartbeat_interval(self) -> int | None:
            return self.interval

        def get_heartbeat_stale_trial_callback(self):
            return self.callback

        def get_failed_trial_callback(self):  # the name before Optuna 4.9
            return self.callback

    return _Journal

