"""Run a library call that forks worker processes (FFCV's DatasetWriter) in a child process of its own, so that
a worker's death is an error rather than a hang, and no worker finalises the parent's garbage.

Why: FFCV's writer starts `multiprocessing.Process` workers (fork on Linux), then polls a shared counter until
every row is written; it never checks on the workers. A worker that dies (killed for memory, a segfault) leaves
the parent polling forever. That happened in CI: a DALI pipeline left in a reference cycle was finalised by the
cyclic GC inside a forked worker, where DALI's Shutdown() joins threads that exist only in the parent; the worker
segfaulted and the suite hung until its 5400 s limit.

So: the parent forks one child, which makes the call (its workers are forked from the child's main thread, as
numba's threading layer wants); a watcher thread in the child stops everything, exit code 3, when a worker
exits non-zero; the parent waits on the child and gets back the call's exception, or the worker's fate.

Stopping: the child leads a process group of its own, its workers in it. When the parent's wait ends in an
exception (`prepare`'s SIGINT / SIGTERM handler raises one) the parent kills that group before it cleans up;
without that it waited for the whole write (minutes for 60k images) and the workers wrote on after a Ctrl-C.
Should the parent die outright (SIGKILL, the OOM killer), Linux's parent-death signal ends the child, and the
child's end ends each worker, instead of orphans writing a file nobody will rename.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable

from fastcifar.errors import FastCifarError
from fastcifar.lifecycle import raise_if_stopped

WORKER_DIED = 3


def _reason(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing)."""
    if sys.platform != "linux":
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(WORKER_DIED)


def _child(call: Callable[[], object], module, conn, poll_s: float, parent: int) -> None:
    os.setpgrp()  # the parent can end this process and every worker with one killpg
    _die_with_parent(parent)
    me = os.getpid()
    started: list = []
    finished = threading.Event()
    lock = threading.Lock()  # one message: the watcher's or the call's, never both

    class Recorded(module.Process):
        def start(self):
            super().start()
            started.append(self)

        def run(self):
            _die_with_parent(me)
            super().run()

    def watch():
        while not finished.wait(poll_s):
            dead = [p.exitcode for p in list(started) if p.exitcode not in (None, 0)]
            if dead:
                with lock:
                    if finished.is_set():
                        return
                    for p in started:
                        if p.exitcode is None:
                            p.kill()
                    conn.send(("died", dead[0]))
                    os._exit(WORKER_DIED)  # the call's thread is stuck polling; nothing here is worth keeping

    module.Process = Recorded  # the child's copy of the module: the parent's is untouched
    threading.Thread(target=watch, daemon=True).start()
    try:
        call()
        outcome = ("ok", None)
    except BaseException as e:  # handed to the parent, which raises it
        outcome = ("error", e)
    for p in started:
        p.join()
    with lock:
        finished.set()
        dead = [p.exitcode for p in started if p.exitcode != 0]
        if dead and outcome[0] == "ok":
            outcome = ("died", dead[0])
        try:
            conn.send(outcome)
        except Exception:  # an exception that does not pickle travels as its text
            conn.send(("error", FastCifarError(f"{type(outcome[1]).__name__}: {outcome[1]}")))


def _kill_group(pid: int) -> None:
    """SIGKILL the child's process group; the child alone if it has not made its group yet."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
            return
        except ProcessLookupError:
            continue


def run_with_watched_workers(call: Callable[[], object], module, what: str, poll_s: float = 0.1) -> None:
    """`call()` in a forked child whose `module.Process` workers are watched (see the module docstring).
    Raises what the call raised, or FastCifarError naming `what` and how a worker (or the child) died.

    gc.collect() first finalises the parent's garbage in the parent; gc.freeze() keeps every object that exists
    now out of the child's and workers' collections (the CPython docs' advice for fork without exec)."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    gc.collect()
    gc.freeze()
    try:
        child = ctx.Process(target=_child, args=(call, module, send, poll_s, os.getpid()), name=f"fastcifar {what}")
        child.start()
    finally:
        gc.unfreeze()
    try:
        send.close()
        while not receive.poll(poll_s):  # True at a message or at EOF (then recv raises EOFError)
            raise_if_stopped()  # a stop that a finaliser swallowed (lifecycle._PENDING) ends the wait here
        message = receive.recv()
    except EOFError:  # the child died before it could say why
        message = None
    except BaseException:  # a signal's exception (Ctrl-C, prepare's SIGTERM): end the write now, not after it
        _kill_group(child.pid)
        raise
    finally:
        child.join()
        receive.close()
    if message is None:
        raise FastCifarError(f"{what}: the writing process died ({_reason(child.exitcode)}); nothing was written")
    kind, detail = message
    if kind == "died":
        raise FastCifarError(f"{what}: a worker process died ({_reason(detail)}); nothing was written")
    if kind == "error":
        raise detail
