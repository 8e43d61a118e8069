"""Read a source (directory, tar, tar.gz/bz2/xz, zip) into an in-memory file tree, never extracting to disk.

Archives are untrusted: every member name is validated before use, links / devices are refused outright, and a
member that appears twice is refused, so a crafted archive can neither escape a directory, make us read
something outside it, nor silently replace one file with another. Archives are streamed, never read whole:
only the members a reader wants (`wanted`) are decompressed into memory, each one's declared size is checked
before it is read, and the whole stream may expand to at most max(256 MiB, 100x its size on disk), so a small
decompression bomb is refused before it costs memory (images and pickles compress by about 1.1x, never 100x).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

from fastcifar.errors import DataError

# Errors the stdlib raises for damaged archives or compressed streams.
# RuntimeError / NotImplementedError: zipfile's answer to encrypted members and unknown compression methods.
CORRUPT_ERRORS = (
    tarfile.TarError, EOFError, zlib.error, zipfile.BadZipFile, OSError, lzma.LZMAError, ValueError,
    RuntimeError, NotImplementedError,
)
MEMBER_CAP = 512 * 2**20  # one member read into memory: CIFAR-100's train pickle is 155 MB, an image far less
EXPANSION_FLOOR = 256 * 2**20  # any archive may expand this far (small test archives of flat images compress well)
EXPANSION_RATIO = 100  # beyond the floor: decompressed bytes per byte on disk

_DRIVE = re.compile(r"^[A-Za-z]:")


def one_line(e: BaseException | str) -> str:
    """Collapse an exception's text to one line: the CLI prints DataError messages as a single line."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


@dataclass
class Tree:
    """Files of a source keyed by relative posix path. Values are bytes (archive members that were wanted), a Path
    read lazily (directories), or None (an archive member nobody wanted: listed, never decompressed)."""

    origin: Path
    is_dir: bool
    files: dict[str, bytes | memoryview | Path | None] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)

    def where(self, rel: str) -> str:
        """Human-readable location of `rel` for error messages."""
        if not rel:
            return str(self.origin)
        return str(self.origin / rel) if self.is_dir else f"{self.origin}:{rel}"

    def read(self, rel: str, limit: int | None = None) -> bytes | memoryview:
        """The file's bytes; `limit`: refuse a folder's file larger than that before reading it (archive
        members are bounded by MEMBER_CAP when they are read)."""
        value = self.files[rel]
        if value is None:  # a reader asked for a member its `wanted` rule skipped: a programming error
            raise DataError(f"{self.where(rel)}: member was not read (not a data file)")
        if isinstance(value, Path):
            try:
                if limit is not None and value.stat().st_size > limit:
                    raise DataError(f"{value}: is {value.stat().st_size / 2**20:,.0f} MiB, over the "
                                    f"{limit // 2**20} MiB such a file may have")
                return value.read_bytes()
            except OSError as e:
                raise DataError(f"{value}: cannot read ({one_line(e)})") from None
        return value


def _is_hidden(parts: list[str]) -> bool:
    # macOS/Windows archivers add .DS_Store, ._foo and __MACOSX/ junk; none of it is data.
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def safe_name(origin: Path, name: str) -> str | None:
    """Normalised relative path of an archive member; None for hidden junk; DataError for unsafe names."""
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or ".." in parts:
        raise unsafe(origin, name)
    parts = [p for p in parts if p not in ("", ".")]
    if not parts or _is_hidden(parts):
        return None
    return "/".join(parts)


def shown_name(name: str, limit: int = 120) -> str:
    """A member name for an error line: unprintables escaped (newlines...), long names cut."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def unsafe(origin: Path, name: str, why: str = "path traversal") -> DataError:
    return DataError(f"{origin}: refusing unsafe member '{shown_name(name)}' ({why})")


def _add_file(tree: Tree, origin: Path, rel: str, value: bytes | memoryview | Path | None) -> None:
    if rel in tree.files or rel in tree.dirs:
        raise DataError(f"{origin}: member '{shown_name(rel)}' appears twice (refusing to let one copy replace the "
                        "other); repack the archive with each file once")
    tree.files[rel] = value


def _want_all(rel: str) -> bool:
    return True


def read_tree(path: Path, wanted: Callable[[str], bool] = _want_all) -> Tree:
    """Load a directory or archive into a Tree; damaged archives raise DataError naming the file. Only members
    for which wanted(rel) holds are read (archives) or readable (directories)."""
    if path.is_dir():
        return _read_dir(path)
    check_regular(path, "source")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            f.seek(0)
            budget = max(EXPANSION_FLOOR, EXPANSION_RATIO * os.fstat(f.fileno()).st_size)
            if magic[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                return _read_zip(path, f, wanted, budget)
            stream, compressed = _decompressor(f, magic)
            return _read_tar(path, _Bounded(stream, budget, path) if compressed else stream, wanted,
                             budget if compressed else None)
    except DataError:
        raise
    except CORRUPT_ERRORS as e:
        raise DataError(f"{path}: truncated or corrupt archive ({one_line(e)})") from None


def check_regular(path: Path, what: str) -> None:
    """A FIFO, socket or device would block or never end when read: refuse it before opening it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({one_line(e)})") from None
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise DataError(f"{path}: {what} is not a regular file or folder (a FIFO, socket or device); pass a file")


def _decompressor(f: IO[bytes], magic: bytes) -> tuple[IO[bytes], bool]:
    """The decompressed stream (gzip/bzip2/xz by magic bytes); these raise EOFError on truncation."""
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f), True
    if magic[:3] == b"BZh":
        return bz2.BZ2File(f), True
    if magic[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(f), True
    return f, False


class _Bounded(io.RawIOBase):
    """A decompressed stream that refuses to go past `budget` bytes, and remembers the last block read (tarfile's
    end-of-archive check needs it, and seeking a gzip stream backwards would decompress it all again)."""

    def __init__(self, inner: IO[bytes], budget: int, origin: Path):
        super().__init__()
        self.inner, self.budget, self.origin = inner, budget, origin
        self.pos = 0  # kept here: tarfile asks tell() ~9 times a member, and GzipFile.tell() is not free
        self.last = b""

    def _check(self, pos: int) -> None:
        if pos > self.budget:
            raise bomb(self.origin, self.budget)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET:
            raise ValueError("only absolute seeks")
        self._check(pos)
        if pos != self.pos:
            self.pos = self.inner.seek(pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        room = self.budget - self.pos + 1  # one byte past the budget is enough to tell that it was exceeded
        data = self.inner.read(room if n is None or n < 0 else min(n, room))
        self.pos += len(data)
        self._check(self.pos)
        self.last = data
        return data


def bomb(origin: Path, budget: int) -> DataError:
    return DataError(f"{origin}: expands to more than {budget / 2**20:,.0f} MiB (over {EXPANSION_RATIO}x its size on "
                     "disk): refusing a likely decompression bomb")


def _read_dir(root: Path) -> Tree:
    tree = Tree(origin=root, is_dir=True)
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune hidden dirs in place so os.walk does not descend into them; sort for deterministic order.
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden([d]))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        if prefix:
            tree.dirs.add(prefix[:-1])
        for name in sorted(filenames):
            if _is_hidden([name]):
                continue
            path = Path(dirpath) / name
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)  # follows a symlink to the user's own file
            except OSError as e:
                raise DataError(f"{path}: cannot read ({one_line(e)})") from None
            if not regular:
                raise DataError(f"{path}: not a regular file (a FIFO, socket, device or broken link); move it out "
                                "of the source folder")
            tree.files[prefix + name] = path
    return tree


def _read_tar(origin: Path, stream: IO[bytes], wanted: Callable[[str], bool], budget: int | None) -> Tree:
    tree = Tree(origin=origin, is_dir=False)
    with tarfile.open(fileobj=stream, mode="r:") as tf:
        for m in tf:
            rel = safe_name(origin, m.name)
            if m.issym() or m.islnk() or m.isdev():
                raise unsafe(origin, m.name, "path traversal: link or device member")
            if budget is not None and m.offset_data + m.size > budget:  # declared size, before decompressing
                raise bomb(origin, budget)
            if rel is None:
                continue
            if m.isdir():
                tree.dirs.add(rel)
            elif m.isreg() and not m.issparse():
                _add_file(tree, origin, rel, _tar_member(origin, tf, m, rel) if wanted(rel) else None)
            else:
                raise unsafe(origin, m.name, "unsupported member type")
        end_offset = tf.offset
        tf.members = []  # the TarInfo list is not needed any longer
    # tarfile silently stops at a missing or damaged header; a complete archive ends with a zero block there.
    if isinstance(stream, _Bounded):
        block = stream.last if stream.tell() == end_offset + tarfile.BLOCKSIZE else b""
    else:
        stream.seek(end_offset)
        block = stream.read(tarfile.BLOCKSIZE)
    if block != bytes(tarfile.BLOCKSIZE):
        raise DataError(f"{origin}: truncated or corrupt archive (no end-of-archive marker at byte {end_offset})")
    return tree


def _tar_member(origin: Path, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str) -> bytes:
    if m.size > MEMBER_CAP:
        raise DataError(f"{origin}: member '{shown_name(rel)}' is {m.size / 2**20:,.0f} MiB, over the "
                        f"{MEMBER_CAP // 2**20} MiB a data file may have")
    f = tf.extractfile(m)
    data = f.read(m.size) if f is not None else b""
    if len(data) != m.size:
        raise DataError(f"{origin}: truncated or corrupt archive (member '{shown_name(rel)}' is cut short)")
    return data


def _read_zip(origin: Path, f: IO[bytes], wanted: Callable[[str], bool], budget: int) -> Tree:
    tree = Tree(origin=origin, is_dir=False)
    with zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
        take = []
        for info in infos:
            rel = safe_name(origin, info.filename)
            # Unix-made zips keep st_mode in the high 16 bits; a file-type field other than regular/dir means a
            # symlink or device. Type-less modes (e.g. Python's writestr: 0o600) are plain files.
            ftype = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
            if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise unsafe(origin, info.filename, "path traversal: link or device member")
            if rel is None:
                continue
            if info.is_dir():
                tree.dirs.add(rel)
                continue
            _add_file(tree, origin, rel, None)
            if wanted(rel):
                if info.file_size > MEMBER_CAP:
                    raise DataError(f"{origin}: member '{shown_name(rel)}' is {info.file_size / 2**20:,.0f} MiB, "
                                    f"over the {MEMBER_CAP // 2**20} MiB a data file may have")
                take.append((rel, info))
        # Declared sizes bound what is read: zipfile stops at file_size and checks the CRC there.
        if sum(info.file_size for _, info in take) > budget:
            raise bomb(origin, budget)
        for rel, info in take:
            tree.files[rel] = zf.read(info)  # checks the CRC: raises BadZipFile on damage
    return tree
