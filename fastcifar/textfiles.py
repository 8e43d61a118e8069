"""The small text files fastcifar reads back: recipes, a run's JSON / CSV / TOML files, its lock.

Each is untrusted: a FIFO given as a recipe blocked `fastcifar train` forever, /dev/zero was read until memory ran
out, and an editor's UTF-8 byte-order mark made a recipe "Invalid statement (line 1, column 1)". So: regular files
only (opened without blocking, then checked on the open descriptor), at most `limit` bytes, UTF-8 with a leading
BOM dropped; anything else is one line naming the file, in the caller's error class.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastcifar.errors import FastCifarError

RECIPE_BYTES = 2**20  # the largest built-in recipe is 4 KB
RUN_FILE_BYTES = 64 * 2**20  # a result or a summary, not data (as ownership.json_ours)
BOM = "\ufeff"


def read_text(path: str | os.PathLike, what: str, limit: int, error: type[FastCifarError] = FastCifarError,
              errors: str = "strict") -> str:
    """The text of `path`, a `what` ("recipe", "run file", ...). FileNotFoundError passes through (callers
    word a missing file themselves); a folder, FIFO, socket or device, a file over `limit` bytes, or bytes that
    are not UTF-8 (unless errors="replace") raise `error`."""
    path = Path(path)
    # O_NONBLOCK: opening a FIFO for reading waits for a writer otherwise; on a regular file it changes nothing.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode, size = os.fstat(fd).st_mode, os.fstat(fd).st_size
        if stat.S_ISDIR(mode):
            raise error(f"{path}: is a folder, not a {what}")
        if not stat.S_ISREG(mode):
            raise error(f"{path}: not a regular file (a FIFO, socket or device); a {what} must be a file")
        if size > limit:
            raise error(f"{path}: {size:,} bytes, more than a {what} may hold ({limit:,})")
        chunks, total = [], 0
        while total <= limit:  # a file growing while read is still held to the limit
            chunk = os.read(fd, min(limit + 1 - total, 2**20))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > limit:
        raise error(f"{path}: more than a {what} may hold ({limit:,} bytes)")
    try:
        text = b"".join(chunks).decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    return text.removeprefix(BOM)
