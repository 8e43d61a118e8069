"""What keeps a run safe from its surroundings: a lock on the run directory and graceful SIGINT / SIGTERM.

- RunLock: `RUN_DIR/.lock` holds the owner's pid; a second run on the same directory is refused, a lock whose pid
  is dead (the owner was SIGKILLed) is taken over.
- GracefulStop: the first SIGINT / SIGTERM only sets a flag, so the trainer finishes its current step and writes a
  resumable checkpoint; a second signal gets the default behaviour (stop now: the atomic writes keep the last
  checkpoint loadable either way).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Iterator

from fastcifar.atomic import disk_full
from fastcifar.errors import DiskFullError, FastCifarError
from fastcifar.ownership import pid_alive
from fastcifar.textfiles import read_text


class RunInUse(FastCifarError):
    pass


class Interrupted(FastCifarError):
    """Raised after the checkpoint is written; exit code 128 + signal number, as a shell reports it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def acquire(self) -> None:
        created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._take()
        except OSError as e:  # the pid did not fit on the disk (its lock file is gone): no folder left either
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(self.path.parent)  # only ever an empty folder
            full = disk_full(e, self.path.parent if self.path.parent.exists() else self.path.parent.parent)
            if full is None:
                raise
            raise DiskFullError(f"{self.path}: disk full while writing ({full}); nothing was written, free some "
                                "space and start again") from None

    def _take(self) -> None:
        for _ in range(3):  # create, or take over a stale lock and retry
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != os.getpid() and pid_alive(owner):
                    raise RunInUse(f"{self.path.parent}: in use by pid {owner} (lock file {self.path}); "
                                   f"wait for that run or stop it") from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # stale: its owner is dead
                continue
            made = os.fstat(fd)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError:
                with contextlib.suppress(OSError):
                    if os.path.samestat(made, os.stat(self.path)):  # still the file made above, not a successor's
                        os.unlink(self.path)
                raise
            self.held = True
            return
        raise RunInUse(f"{self.path}: could not take the run lock (another process keeps re-creating it)")

    def _owner(self) -> int | None:
        """The pid in the lock file; None where it is unreadable or half-written (stale). A FIFO or device in
        its place would block or never end: that is one line, not a guess."""
        try:
            return int(read_text(self.path, "run lock", 4096, RunInUse).strip() or "0") or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        try:
            if self.held and self._owner() == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        except RunInUse:  # our lock replaced by a FIFO or a device: not ours to remove
            pass
        finally:
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def stop_raises(what: str) -> Iterator[None]:
    """For work with nothing to checkpoint (`prepare`): SIGINT / SIGTERM raise Interrupted at once, so the
    caller's cleanup (`except BaseException: remove the temp folder`) runs, and the CLI prints one line and exits
    128 + n, as `train` does, instead of dying silently with its temp files left behind."""
    def handle(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(f"{what} stopped by {signal.Signals(signum).name}; nothing was written (temp files "
                          "removed)", signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handle) for s in GracefulStop.SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM back for a few renames that must happen together (a store's swap): a signal then
    arrives just after them, not between them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, GracefulStop.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class GracefulStop:
    """Context manager: while active, SIGINT/SIGTERM set `signum` instead of interrupting the step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        for s, handler in self._previous.items():  # a second signal stops at once
            signal.signal(s, handler)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signals can only be set from there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
