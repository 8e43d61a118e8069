"""Where the data comes from: an explicit path, $FASTCIFAR_SOURCE, or a checked download of the official archive."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
import urllib.request
from pathlib import Path

from fastcifar.atomic import fsync_dir
from fastcifar.data.archive import one_line
from fastcifar.errors import DataError, DiskFullError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
CACHE_NAME = "cifar-10-python.tar.gz"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
# dataset -> (folder in the cache or "" for the archive itself, [(url, file name, md5), ...]): the publishers' files
OFFICIAL: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "cifar10": ("", [(OFFICIAL_URL, CACHE_NAME, OFFICIAL_MD5)]),
    "cifar100": ("", [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
                       "eb9058c3a382ffc7106e4002c42a8d85")]),
    "svhn": ("svhn", [(SVHN_URL + "train_32x32.mat", "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
                      (SVHN_URL + "test_32x32.mat", "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")]),
}
SVHN_EXTRA = (SVHN_URL + "extra_32x32.mat", "extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7")
_CHUNK = 1 << 20


def resolve_source(source: str | os.PathLike | None, cache_dir: str | Path, dataset: str = "auto",
                   extra: bool = False) -> Path:
    """The path to prepare from: `source`, else $FASTCIFAR_SOURCE, else the (cached) official download of
    `dataset` (auto: CIFAR-10; SVHN: a folder holding its .mat files; an image folder has none)."""
    if source is not None:
        return _existing(Path(source).expanduser(), "source")
    env = os.environ.get("FASTCIFAR_SOURCE")
    if env:
        return _existing(Path(env).expanduser(), "FASTCIFAR_SOURCE")
    name = "cifar10" if dataset == "auto" else dataset
    if name not in OFFICIAL:
        raise DataError(f"--dataset {name}: has no official download; pass --source PATH to the images")
    folder, files = OFFICIAL[name]
    if name == "cifar10":  # FASTCIFAR_URL / FASTCIFAR_MD5: a mirror of the CIFAR-10 archive
        files = [(os.environ.get("FASTCIFAR_URL") or OFFICIAL_URL, CACHE_NAME,
                  (os.environ.get("FASTCIFAR_MD5") or OFFICIAL_MD5).lower())]
    if name == "svhn" and extra:
        files = [*files, SVHN_EXTRA]
    where = Path(cache_dir) / folder if folder else Path(cache_dir)
    for url, file_name, md5 in files:
        _cached_or_download(url, where / file_name, md5)
    return where if folder else where / files[0][1]


def _cached_or_download(url: str, dest: Path, md5: str) -> None:
    # A cached copy is reused only if it still matches: a half-written or tampered file is fetched again.
    if dest.is_file() and file_digest(dest, "md5") == md5:
        return
    if dest.exists() or dest.is_symlink():  # downloads land only after their md5 matched: this one is not ours
        raise DataError(f"{dest}: exists and is not the file fastcifar downloads (md5 differs); move it away, "
                        "or pass --source PATH")
    _download(url, dest, md5)


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: {what} does not exist (pass --source PATH to a dataset archive or folder)")
    return path


def _download(url: str, dest: Path, md5: str) -> None:
    """Fetch `url` to a temp file beside `dest`, check md5, then rename; nothing is left behind on failure, not
    even the cache folders this call created (only while empty: another download may have landed there)."""
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]  # deepest first
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dest.parent}: cannot create the download cache ({one_line(e)})") from None
    try:
        _fetch(url, dest, md5)
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):  # not empty, or gone: not ours to remove any more
                folder.rmdir()
        raise


def _fetch(url: str, dest: Path, md5: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as resp:
                while chunk := resp.read(_CHUNK):
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors; bad URLs are ValueErrors
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # the write, not the network
                raise DiskFullError(f"{dest}: disk full while downloading {url} ({e.strerror}); the partial file is "
                                    "removed, free some space and run prepare again") from None
            raise DataError(
                f"no data source: downloading {url} failed ({one_line(e)}); pass --source PATH, "
                "or set FASTCIFAR_SOURCE=PATH, or allow the download (network access to the URL, or FASTCIFAR_URL)"
            ) from None
        got = h.hexdigest()
        if got != md5:
            raise DataError(f"{dest}: md5 mismatch (got {got}, expected {md5}; downloaded from {url})")
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _regular_files(root: Path) -> list[Path]:
    """Every regular file below `root`, sorted, walked as read_tree walks it (symlinked folders not followed);
    FIFOs and devices are skipped here and refused by read_tree (reading one would block or never end)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out += [p for p in (Path(dirpath) / n for n in filenames) if stat.S_ISREG(p.stat().st_mode)]
    return sorted(out)


def source_sha256(path: Path) -> str:
    """Identity of a source: the file's sha256, or for a directory a hash over sorted (relpath, size, content)."""
    try:
        if not path.is_dir():
            return file_digest(path)
        h = hashlib.sha256()
        for p in _regular_files(path):
            rel = os.fsencode(p.relative_to(path).as_posix())  # the name's bytes, UTF-8 or not
            h.update(len(rel).to_bytes(8, "little") + rel + p.stat().st_size.to_bytes(8, "little"))
            with open(p, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        return h.hexdigest()
    except OSError as e:
        raise DataError(f"{path}: cannot read source ({one_line(e)})") from None
