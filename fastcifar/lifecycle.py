"""What keeps a run safe from its surroundings: a lock on the run directory and graceful SIGINT / SIGTERM.

- PidLock / RunLock: an flock'ed file holding the owner's pid (`RUN_DIR/.lock`, `.<store>.lock` beside a store
  being prepared); a second writer is refused naming that pid, a lock whose owner died is taken over.
- GracefulStop: the first SIGINT / SIGTERM only sets a flag, so the trainer finishes its current step and writes a
  resumable checkpoint; a second signal gets the default behaviour (stop now: the atomic writes keep the last
  checkpoint loadable either way).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import stat
import threading
from pathlib import Path
from types import FrameType
from typing import Callable, Iterator, Protocol

from fastcifar.atomic import disk_full
from fastcifar.errors import DiskFullError, FastCifarError
from fastcifar.ownership import NotOurs, pid_alive


class RunInUse(FastCifarError):
    pass


class Interrupted(FastCifarError):
    """Raised after the checkpoint is written; exit code 128 + signal number, as a shell reports it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class _StopNow(BaseException):
    """What stop_raises' handler raises wherever the signal lands. A BaseException, as KeyboardInterrupt is, so
    that the catch-alls on the way cannot turn the stop into another error or swallow it: the ONNX / TorchScript
    exporters' `except Exception` (a SIGTERM during export said "cannot export to ONNX opset 18 (...)", exit 2),
    a checkpoint or pickle reader's "corrupt file", export's store probe (`except FastCifarError: pass` went on
    exporting). stop_raises turns it into Interrupted where the stoppable work ends."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    def __reduce__(self):  # a forked writer hands it to its parent through a pipe
        return type(self), (self.args[0], self.signum)


class PidLock:
    """An exclusive lock on `path`, a small file holding the owner's pid.

    flock(2) decides who holds it, so two processes can never both take it, and the kernel releases it however
    its owner dies (kill -9 included): a lock file left behind is taken over by the next writer. The pid is only
    for the message a second writer gets. A lock file written by a fastcifar from before flock, whose pid is
    alive, is respected too. The file is fastcifar's own (a pid or nothing): anything else at `path` is refused,
    never truncated, and on release it is removed only while it is still the file this process locked."""

    def __init__(self, path: Path, busy: Callable[[int | None], FastCifarError]):
        self.path = Path(path)
        self.busy = busy  # the error a second writer gets, given the owner's pid (None: unknown)
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

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
        for _ in range(10):  # a previous owner may remove the file between our open and our flock: open again
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_pid(fd)
                os.close(fd)
                raise self.busy(owner) from None
            try:
                current = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)  # we locked a file its owner has just removed; the lock is the new file at `path`
                continue
            owner = _read_pid(fd)
            if owner is not None and owner != os.getpid() and pid_alive(owner):
                os.close(fd)  # written by a fastcifar from before flock, whose owner still runs
                raise self.busy(owner)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                with contextlib.suppress(OSError):
                    if os.path.samestat(mine, os.stat(self.path, follow_symlinks=False)):  # not a successor's
                        os.unlink(self.path)
                os.close(fd)
                raise
            self.fd = fd
            return
        raise self.busy(None)

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise NotOurs(f"{self.path}: is a link, not fastcifar's lock file; remove it or choose another "
                              "--out") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode) or _read_pid(fd, strict=True) is False:
            os.close(fd)
            raise NotOurs(f"{self.path}: exists and is not a lock file fastcifar wrote (a pid); not touching it, "
                          "choose another --out")
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            mine, current = os.fstat(self.fd), os.stat(self.path, follow_symlinks=False)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)  # still the file we hold locked: ours to remove
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __enter__(self) -> "PidLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int, strict: bool = False):
    """The pid in a lock file (None when empty or unreadable). strict: False when the content is not a lock's
    (digits and a newline at most), so a user's file is never taken for one."""
    try:
        head = os.pread(fd, 33, 0)
    except OSError:
        return None
    text = head.decode("ascii", errors="replace")
    if len(head) > 32 or re.fullmatch(r"\d*\n?", text) is None:
        return False if strict else None
    return int(text) if text.strip() else None


class WriterInUse(FastCifarError):
    pass


def writer_lock(target: Path, what: str, shown: Path | None = None) -> PidLock:
    """`.<name>.lock` beside a file or folder being written (a store, a .beton): a second writer of the same
    target is refused, naming the first (`what`: who that is, for the message)."""
    target = Path(target)
    return PidLock(target.parent / f".{target.name}.lock", lambda owner: WriterInUse(
        f"{shown or target}: being written by pid {owner if owner is not None else '?'} ({what}); wait for it to "
        "finish or stop it"))


class RunLock(PidLock):
    """`RUN_DIR/.lock`: one process writes a run directory at a time."""

    def __init__(self, run_dir: Path):
        path = Path(run_dir) / ".lock"
        super().__init__(path, lambda owner: RunInUse(
            f"{path.parent}: in use by pid {owner if owner is not None else '?'} (lock file {path}); wait for "
            "that run or stop it"))


# The stop of each active stop_raises block, innermost last (None until its signal). A signal that lands while a
# finaliser or weakref callback runs (gc.collect() calling numba's, in CI) raises inside it, where Python reports
# the exception as unraisable and goes on: the stop is lost unless a later check raises it again.
_PENDING: list[_StopNow | None] = []


@contextlib.contextmanager
def stop_raises(what: str) -> Iterator[None]:
    """For work with nothing to checkpoint (`prepare`, `export`, ...): SIGINT / SIGTERM raise at once (_StopNow,
    past any `except Exception` inside; Interrupted once it leaves this block), so the caller's cleanup
    (`except BaseException: remove the temp folder`) runs, and the CLI prints one line and exits 128 + n, as
    `train` does, instead of dying silently with its temp files left behind."""
    def handle(signum: int, frame: FrameType | None) -> None:
        _PENDING[-1] = _StopNow(f"{what} stopped by {signal.Signals(signum).name}; nothing was written (temp "
                                "files removed)", signum)
        raise _PENDING[-1]

    previous = {}
    _PENDING.append(None)  # before the handler is set and popped after it is gone: it always has its slot
    try:
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, handle) for s in GracefulStop.SIGNALS}
        yield
    except _StopNow as e:  # past every catch-all inside: now the CLI's one line and exit 128 + n
        raise Interrupted(str(e), e.signum) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _PENDING.pop()


def raise_if_stopped() -> None:
    """Raise again a stop that stop_raises' handler raised where it could not propagate; blocking waits under
    stop_raises poll this (the forked writer's wait hung in CI without it)."""
    stop = _PENDING[-1] if _PENDING else None
    if stop is not None:
        raise _StopNow(str(stop), stop.signum)


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


class StopFlag(Protocol):
    """What the step loop reads once per step: GracefulStop, or a flag the DDP ranks agree on
    (fastcifar.distributed.AgreedStop)."""

    signum: int | None

    @property
    def requested(self) -> bool: ...


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
