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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
            raise DiskFullError(f"{path}: disk full while writing ({e.strerror}); {kept}, free some space and "
                                f"{again}") from None
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", guard: Callable[[], None] | None = None) -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync it and rename it onto `path` (atomic_path)."""
    with atomic_path(path, guard) as tmp, open(tmp, mode) as f:
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


def write_text(path: str | os.PathLike, text: str, guard: Callable[[], None] | None = None) -> None:
    with atomic_open(path, "w", guard) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, guard: Callable[[], None] | None = None) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", guard)


def write_with(path: str | os.PathLike, writer: Callable[[IO], None]) -> None:
    """Atomic write through a callback that takes a binary file object (e.g. torch.save, np.save)."""
    with atomic_open(path, "wb") as f:
        writer(f)
