"""A restricted unpickler for the official CIFAR-10 / CIFAR-100 python batches and re-pickled copies of them.

pickle.load on a downloaded file runs whatever callables the file names, so a tampered batch could execute code.
The official batches only need numpy's array-reconstruction helpers; every other global is refused *before* it is
resolved, so nothing outside that allow-list is ever imported or called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Callable

from fastcifar.errors import DataError

# (module, name) pairs the official batches (python2, numpy 1.x) and numpy >= 1.x re-pickles (protocol 2..5) use.
# numpy 2 renamed numpy.core -> numpy._core; both spellings appear in the wild.
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }
)


# Python 3 pickles bytes under protocols 0-2 as _codecs.encode(text, "latin1") (b"" as bytes()): every numpy
# array pickled so holds its raw data that way. Admitted only in that form, so they cannot encode (or allocate)
# anything else: a str argument, latin-1, nothing more; bytes() with no argument at all.
_BYTES: frozenset[tuple[str, str]] = frozenset({("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes")})
_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")


class _TextToBytes:
    def __init__(self, where: str, name: str) -> None:
        self.where, self.name = where, name

    def __call__(self, *args: Any) -> bytes:
        if self.name == "encode" and len(args) == 2 and type(args[0]) is str and args[1] in _LATIN1:
            return args[0].encode("latin-1")
        if self.name == "bytes" and not args:
            return b""
        shown = ", ".join(type(a).__name__ for a in args) or "no arguments"
        raise DataError(f"{self.where}: refusing pickle call {self.name}({shown}) (protocol 0-2 pickles only encode "
                        "text as latin-1 bytes this way)")


def _resolve(name: str) -> Callable[..., Any] | type:
    """Look the allowed name up in whichever numpy is installed (avoids numpy 2's numpy.core deprecation shim)."""
    import numpy as np

    if name == "ndarray":
        return np.ndarray
    if name == "dtype":
        return np.dtype
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray._reconstruct if name == "_reconstruct" else numeric._frombuffer


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits numpy arrays and builtin containers only."""

    def __init__(self, file: io.BufferedIOBase, where: str) -> None:
        # encoding="bytes": python2 str objects (keys, raw array data) load as bytes, which numpy expects.
        super().__init__(file, encoding="bytes")
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _resolve(name)
        if (module, name) in _BYTES:
            return _TextToBytes(self._where, name)
        raise DataError(
            f"{self._where}: refusing pickle global '{module}.{name}' "
            "(only numpy arrays and builtin containers are allowed)"
        )


def safe_loads(data: bytes | memoryview, where: str) -> Any:
    """Unpickle `data` with the allow-list; `where` names the file in error messages."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), where).load()  # type: ignore[arg-type]
    except DataError:
        raise
    except Exception as e:  # any other failure means a corrupt or truncated pickle
        detail = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{where}: truncated or corrupt pickle ({type(e).__name__}: {detail})") from None
