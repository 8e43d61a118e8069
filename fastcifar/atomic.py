"""Atomic file output: write to a temp file in the same directory, fsync, then rename over the target.

A reader (or a crash) therefore sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from fastcifar.errors import DiskFullError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, guard: Callable[[], None] | None = None,
                again: str = "resume") -> Iterator[Path]:
    """A temp path beside `path` for writers that take a file name (the ONNX exporter, torch.jit.save); on clean
    exit the file is fsynced and renamed onto `path`, on any error (a failed check included) removed.

    `guard`: called just before the rename, to check again that `path` may be replaced (what the user named
    may have appeared or changed while the file was being written); an error it raises leaves `path` alone.
    `again`: what the disk-full line tells the user to do once space is freed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file a plain open()'s mode
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if guard is not None:
            guard()
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_full(e, path.parent)  # before the unlink, which frees the space the write took
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full is not None:
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
            raise DiskFullError(f"{path}: disk full while writing ({full}); {kept}, free some space and {again}") \
                from None
        raise
    fsync_dir(path.parent)


FULL_BYTES = 2**20  # "no space left": a failed write leaves the disk full to the block, so less than this is free


def disk_full(e: BaseException, folder: Path) -> str | None:
    """The reason to print when `e`, raised by a write into `folder`, means the disk (or quota) is full, else
    None. Writers wrap the OSError: torch.save's zip writer raises RuntimeError('[enforce fail at
    inline_container.cc:672] . unexpected pos 704 vs 598') with the ENOSPC OSError as its context, and numpy
    writing to a real file raises OSError('1000000 requested and 131056 written') with no errno at all. So: an
    ENOSPC / EDQUOT anywhere in the exception's chain, or a failed write on a file system left without space."""
    seen: list[BaseException] = []
    while e is not None and len(seen) < 32 and e not in seen:
        seen.append(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e.strerror or os.strerror(e.errno)
        e = e.__cause__ or e.__context__
    if isinstance(seen[0], (OSError, RuntimeError)) and free_bytes(folder) < FULL_BYTES:
        return os.strerror(errno.ENOSPC)
    return None


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes this process may still write in `folder`'s file system (root may use the reserved blocks too)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return FULL_BYTES  # unknown: never call a failure "disk full" on a guess
    return st.f_frsize * (st.f_bfree if os.geteuid() == 0 else st.f_bavail)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", guard: Callable[[], None] | None = None,
                again: str = "resume") -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync it and rename it onto `path` (atomic_path)."""
    with atomic_path(path, guard, again) as tmp, open(tmp, mode) as f:
        yield f


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str, guard: Callable[[], None] | None = None,
               again: str = "resume") -> None:
    with atomic_open(path, "w", guard, again) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, guard: Callable[[], None] | None = None,
               again: str = "resume") -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", guard, again)


def write_with(path: str | os.PathLike, writer: Callable[[IO], None]) -> None:
    """Atomic write through a callback that takes a binary file object (e.g. torch.save, np.save)."""
    with atomic_open(path, "wb") as f:
        writer(f)
