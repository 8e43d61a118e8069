"""What fastcifar may delete or overwrite: only what it wrote itself, recognised by a marker it wrote with it.

- A store, a run, a sweep, a tuning study and an lr-find directory each hold a marker file (`.fastcifar-store`,
  `.fastcifar-run`, `.fastcifar-sweep`, `.fastcifar-study`, `.fastcifar-lrfind`). A directory without one is the user's: fastcifar writes into it only while it is new or
  empty, and never replaces or cleans it, `--force` or not.
- A file the user names as an output (`report --out`, `bench --json/--md`, a .beton) is overwritten only when it
  is recognisably fastcifar's own output of that kind (a marker line or key that fastcifar writes).
- Temp files and folders carry fastcifar's own naming (`.<target>.<8 chars>.tmp`, `.<store>.tmp-<pid>-<rand>`),
  and stale ones are removed only in fastcifar's own folders, only with that exact naming.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from fastcifar.atomic import write_json
from fastcifar.errors import FastCifarError
from fastcifar.textfiles import RUN_FILE_BYTES, read_text

MARKERS = {"store": ".fastcifar-store", "run": ".fastcifar-run", "sweep": ".fastcifar-sweep",
           "study": ".fastcifar-study", "lrfind": ".fastcifar-lrfind"}
MD_MARKER = "<!-- written by fastcifar: {kind} -->"  # first line of every Markdown file a command writes
# atomic_open's temp files: mkstemp's 8 random characters are lowercase letters, digits and "_".
ATOMIC_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


class NotOurs(FastCifarError):
    """A path fastcifar would have to overwrite or delete, but did not write."""


def marker(directory: Path, kind: str) -> Path:
    return Path(directory) / MARKERS[kind]


def has_marker(directory: Path, kind: str) -> bool:
    return marker(directory, kind).is_file()


# what a disk-full line tells the user to do once space is freed: the marker is a folder's first file, so
# there is nothing to resume yet
AGAIN = {"store": "run prepare again", "lrfind": "run lr-find again"}


def write_marker(directory: Path, kind: str) -> None:
    write_json(marker(directory, kind), {"kind": kind, "written_by": "fastcifar", "version": 1},
               again=AGAIN.get(kind, "run the same command again"))


def legacy_run(path: Path) -> bool:
    """A run directory written before run markers existed: its saved recipe.toml (with a [train] table) and its
    env.json are there. Read as text: `report` must not import torch."""
    try:
        text = read_text(path / "recipe.toml", "run file", RUN_FILE_BYTES)
    except (OSError, FastCifarError):  # missing, a FIFO, huge, not UTF-8: not a run's saved recipe
        return False
    return (path / "env.json").is_file() and re.search(r"^\[train\]\s*$", text, re.M) is not None


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def shown(path: Path, limit: int = 3, skip: frozenset[str] = frozenset()) -> str:
    """A few entries of a directory for an error line (never a listing of thousands); `skip`: names that are
    fastcifar's own, so the line names what is foreign."""
    names = sorted(p.name for p in Path(path).iterdir() if p.name not in skip)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_own_dir(path: Path, kind: str, legacy: Callable[[Path], bool] | None = None) -> bool:
    """May fastcifar write into `path` as a `kind` directory? False: it is new or empty; True: it is already
    one of fastcifar's own (marker, or `legacy(path)` for directories from before markers existed); a one-line
    NotOurs otherwise. Never writes anything."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return False
    if not path.is_dir():
        raise NotOurs(f"{path}: exists and is not a directory; choose a new --out (fastcifar writes a {kind} only "
                      "into a new or empty folder or one of its own)")
    entries = [p for p in path.iterdir() if not _run_lock(p)]
    if not entries:
        return False
    if has_marker(path, kind):
        return True
    if legacy is not None and legacy(path):
        return True
    raise NotOurs(f"{path}: holds files fastcifar did not write ({shown(path)}); choose a new --out (fastcifar "
                  f"writes a {kind} only into a new or empty folder or one of its own)")


def _run_lock(p: Path) -> bool:
    """lifecycle.RunLock's `.lock` (a pid, or empty while being written): ours, even in a run not yet marked."""
    if p.name != ".lock" or p.is_symlink() or not p.is_file():
        return False
    try:
        return re.fullmatch(r"\d*\n?", p.read_text(errors="replace")[:32]) is not None
    except OSError:
        return False


def check_output_file(path: Path, kind: str, ours: Callable[[Path], bool]) -> None:
    """Refuse to overwrite `path` unless it is absent or `ours(path)` recognises fastcifar's own `kind` output."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise NotOurs(f"{path}: is a directory; name a file for the {kind}")
    if not path.is_file() or not ours(path):
        raise NotOurs(f"{path}: exists and is not a {kind} fastcifar wrote; choose another path (fastcifar "
                      "overwrites only its own files)")


def output_guard(path: Path, kind: str, ours: Callable[[Path], bool]) -> Callable[[], None]:
    """check_output_file now, and the same check as a guard for atomic_path, to run again at the rename: a file
    the user puts at `path` while the output is being computed is never replaced."""
    def check() -> None:
        check_output_file(path, kind, ours)

    check()
    return check


def md_ours(kind: str) -> Callable[[Path], bool]:
    """Recogniser for a Markdown file that starts with fastcifar's marker line of `kind`."""
    def ours(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.readline().strip() == MD_MARKER.format(kind=kind)
        except OSError:
            return False

    return ours


def json_ours(predicate: Callable[[dict], bool]) -> Callable[[Path], bool]:
    """Recogniser for a JSON object file that `predicate` accepts (read at most 64 MiB: a result, not data)."""
    def ours(path: Path) -> bool:
        try:
            if path.stat().st_size > 64 * 2**20:
                return False
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(obj, dict) and bool(predicate(obj))

    return ours


def remove_atomic_temps(directories: list[Path]) -> int:
    """Delete temp files of atomic writes that a SIGKILL cut short, only in `directories` (fastcifar's own
    folders) and only with atomic_open's exact naming; returns how many were removed."""
    removed = 0
    for d in directories:
        if not d.is_dir() or d.is_symlink():
            continue
        for p in d.iterdir():
            if ATOMIC_TMP.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OverflowError, ValueError):
        return False
    return True


def temp_dir_pattern(out: Path) -> re.Pattern:
    """`.<name>.tmp-<pid>-<rand>` (a store being built) and `.<name>.old-<pid>-<rand>` (the store it replaces)."""
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[a-z0-9_]+$")


def stale_temp_dirs(out: Path) -> list[tuple[str, Path]]:
    """(kind, path) of fastcifar's temp folders beside `out` whose process is gone and that hold its marker."""
    found = []
    if not out.parent.is_dir():
        return found
    pattern = temp_dir_pattern(out)
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if m is None or p.is_symlink() or not p.is_dir() or pid_alive(int(m.group(2))):
            continue
        if has_marker(p, "store"):  # building and replaced stores both carry the store marker
            found.append((m.group(1), p))
    return found


def clean_stale_temp_dirs(out: Path, log: Callable[[str], object]) -> None:
    """Remove what a killed `prepare` left beside `out`; a replaced store whose swap was cut short (so `out` is
    missing) is put back instead."""
    for kind, p in stale_temp_dirs(out):
        if kind == "old" and not out.exists() and not out.is_symlink():
            os.rename(p, out)
            log(f"{out}: restored the store a killed prepare had moved aside ({p.name})")
        else:
            shutil.rmtree(p, ignore_errors=True)
            log(f"removed {p} (left by a prepare that was killed)")
