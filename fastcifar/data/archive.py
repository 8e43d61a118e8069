"""Read a source (directory, tar, tar.gz/bz2/xz, zip) into an in-memory file tree, never touching the disk.

Archives are untrusted: every member name is validated before use, and links / devices are refused outright, so a
crafted archive can neither escape a directory nor make us read something outside it. Nothing is extracted.
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

from fastcifar.errors import DataError

# Errors the stdlib raises for damaged archives or compressed streams.
# RuntimeError / NotImplementedError: zipfile's answer to encrypted members and unknown compression methods.
CORRUPT_ERRORS = (
    tarfile.TarError, EOFError, zlib.error, zipfile.BadZipFile, OSError, lzma.LZMAError, ValueError,
    RuntimeError, NotImplementedError,
)

_DRIVE = re.compile(r"^[A-Za-z]:")


def one_line(e: BaseException | str) -> str:
    """Collapse an exception's text to one line: the CLI prints DataError messages as a single line."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


@dataclass
class Tree:
    """Files of a source keyed by relative posix path. Values are bytes (archives) or a Path read lazily (dirs)."""

    origin: Path
    is_dir: bool
    files: dict[str, bytes | memoryview | Path] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)

    def where(self, rel: str) -> str:
        """Human-readable location of `rel` for error messages."""
        if not rel:
            return str(self.origin)
        return str(self.origin / rel) if self.is_dir else f"{self.origin}:{rel}"

    def read(self, rel: str) -> bytes | memoryview:
        value = self.files[rel]
        if isinstance(value, Path):
            try:
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


def unsafe(origin: Path, name: str, why: str = "path traversal") -> DataError:
    # Escape only unprintables (newlines...), so the message stays one line yet shows ordinary names verbatim.
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
    return DataError(f"{origin}: refusing unsafe member '{shown}' ({why})")


def read_tree(path: Path) -> Tree:
    """Load a directory or archive into a Tree; damaged archives raise DataError naming the file."""
    if path.is_dir():
        return _read_dir(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({one_line(e)})") from None
    try:
        raw = _decompress(raw)
        if raw[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return _read_zip(path, raw)
        return _read_tar(path, raw)
    except DataError:
        raise
    except CORRUPT_ERRORS as e:
        raise DataError(f"{path}: truncated or corrupt archive ({one_line(e)})") from None


def _decompress(raw: bytes) -> bytes:
    """Undo gzip/bzip2/xz in memory; these raise EOFError on truncation, unlike tarfile's streaming mode."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return raw


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
            if not _is_hidden([name]):
                tree.files[prefix + name] = Path(dirpath) / name
    return tree


def _read_tar(origin: Path, raw: bytes) -> Tree:
    tree = Tree(origin=origin, is_dir=False)
    view = memoryview(raw)  # member data are zero-copy slices of the decompressed archive
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        for m in tf:
            rel = safe_name(origin, m.name)
            if m.issym() or m.islnk() or m.isdev():
                raise unsafe(origin, m.name, "path traversal: link or device member")
            if rel is None:
                continue
            if m.isdir():
                tree.dirs.add(rel)
            elif m.isreg() and not m.issparse():
                end = m.offset_data + m.size
                if end > len(raw):
                    raise DataError(f"{origin}: truncated or corrupt archive (member '{rel}' is cut short)")
                tree.files[rel] = view[m.offset_data : end]
            else:
                raise unsafe(origin, m.name, "unsupported member type")
        end_offset = tf.offset
    # tarfile silently stops at a missing or damaged header; a complete archive ends with a zero block there.
    if raw[end_offset : end_offset + tarfile.BLOCKSIZE] != bytes(tarfile.BLOCKSIZE):
        raise DataError(f"{origin}: truncated or corrupt archive (no end-of-archive marker at byte {end_offset})")
    return tree


def _read_zip(origin: Path, raw: bytes) -> Tree:
    tree = Tree(origin=origin, is_dir=False)
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        for info in zf.infolist():
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
            else:
                tree.files[rel] = zf.read(info)  # checks the CRC: raises BadZipFile on damage
    return tree
