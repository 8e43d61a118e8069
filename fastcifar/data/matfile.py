"""A minimal, safe reader of MATLAB level-5 .mat files (SVHN's train_32x32.mat / test_32x32.mat), and SVHN itself.

Only numeric arrays are read: the file is parsed as the format's typed data elements (tag, size, bytes), every
size is checked against the bytes that are really there, and nothing in it is executed or unpickled (MATLAB
objects, cells, structs and function handles are refused). Compressed elements (MATLAB's -v7 default) are
inflated with a cap, so a small file cannot expand without bound.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

from fastcifar.errors import DataError

HEADER = 128
MI_INT8, MI_UINT8, MI_INT16, MI_UINT16, MI_INT32, MI_UINT32 = 1, 2, 3, 4, 5, 6
MI_SINGLE, MI_DOUBLE, MI_INT64, MI_UINT64, MI_MATRIX, MI_COMPRESSED = 7, 9, 12, 13, 14, 15
DTYPES = {MI_INT8: "i1", MI_UINT8: "u1", MI_INT16: "i2", MI_UINT16: "u2", MI_INT32: "i4", MI_UINT32: "u4",
          MI_SINGLE: "f4", MI_DOUBLE: "f8", MI_INT64: "i8", MI_UINT64: "u8"}
NUMERIC_CLASSES = set(range(6, 16))  # mxDOUBLE_CLASS .. mxUINT64_CLASS; cells (1), structs (2), objects (3) are not
INFLATE_CAP = 4 * 2**30  # SVHN's extra_32x32.mat, the largest official file, holds 1.6 GB of pixels
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat")
MAX_DIMS = 32  # numpy holds at most 64; SVHN's arrays have 2 (y) and 4 (X)


class _Reader:
    def __init__(self, data: bytes | memoryview, where: str, endian: str):
        self.data, self.where, self.e = memoryview(data), where, endian

    def bad(self, why: str) -> DataError:
        return DataError(f"{self.where}: not a readable .mat file ({why})")

    def tag(self, pos: int) -> tuple[int, int, int, int]:
        """(type, size, data start, next element) of the data element at pos."""
        if pos + 8 > len(self.data):
            raise self.bad(f"element header cut short at byte {pos}")
        first, second = struct.unpack_from(self.e + "II", self.data, pos)
        if first >> 16:  # small data element: size and type packed in 4 bytes, data in the next 4
            if first >> 16 > 4:
                raise self.bad(f"small element at byte {pos} claims {first >> 16} bytes (it holds at most 4)")
            return first & 0xFFFF, first >> 16, pos + 4, pos + 8
        end = pos + 8 + second
        if end > len(self.data):
            raise self.bad(f"element at byte {pos} claims {second} bytes, past the end of the file")
        return first, second, pos + 8, end + (-end % 8 if first != MI_COMPRESSED else 0)

    def numbers(self, kind: int, start: int, size: int) -> np.ndarray:
        if kind not in DTYPES:
            raise self.bad(f"data type {kind} is not numeric")
        dtype = np.dtype(self.e + DTYPES[kind])
        if size % dtype.itemsize:
            raise self.bad("data size is not a multiple of its element size")
        return np.frombuffer(self.data, dtype, size // dtype.itemsize, start)


def read_mat(data: bytes | memoryview, where: str) -> dict[str, np.ndarray]:
    """name -> numeric array (MATLAB's column-major order turned into numpy's shape) of a level-5 .mat file."""
    head = bytes(data[:HEADER])
    if len(head) < HEADER or head[126:128] not in (b"IM", b"MI"):
        raise DataError(f"{where}: not a .mat file (no MATLAB level-5 header)")
    endian = "<" if head[126:128] == b"IM" else ">"
    if struct.unpack_from(endian + "H", head, 124)[0] != 0x0100:  # 0x0200: MATLAB 7.3, an HDF5 file
        raise DataError(f"{where}: MATLAB 7.3 (HDF5) .mat files are not supported; save it with -v7")
    reader = _Reader(data, where, endian)
    out: dict[str, np.ndarray] = {}
    pos = HEADER
    while pos + 8 <= len(reader.data):
        kind, size, start, pos = reader.tag(pos)
        if kind == MI_COMPRESSED:
            inner = _inflate(reader, start, size)
            sub = _Reader(inner, where, reader.e)
            kind, size, start, _ = sub.tag(0)
            if kind == MI_MATRIX:
                name, array = _matrix(sub, start, size)
                out[name] = array
        elif kind == MI_MATRIX:
            name, array = _matrix(reader, start, size)
            out[name] = array
        else:
            raise reader.bad(f"unexpected top-level element type {kind}")
    return out


def _inflate(reader: _Reader, start: int, size: int) -> bytes:
    d = zlib.decompressobj()
    try:
        inner = d.decompress(reader.data[start:start + size], INFLATE_CAP + 1)
    except zlib.error as e:
        raise reader.bad(f"corrupt compressed element ({e})") from None
    if len(inner) > INFLATE_CAP:
        raise reader.bad(f"a compressed element expands past {INFLATE_CAP // 2**30} GiB")
    return inner


def _matrix(r: _Reader, start: int, size: int) -> tuple[str, np.ndarray]:
    end, pos = start + size, start
    parts = []
    while pos < end and len(parts) < 4:  # flags, dimensions, name, real part (an imaginary part is refused)
        kind, n, at, pos = r.tag(pos)
        parts.append((kind, n, at))
    if len(parts) < 4:
        raise r.bad("an array element is incomplete")
    (fk, fn, fa), (dk, dn, da), (nk, nn, na), (rk, rn, ra) = parts
    flags = r.numbers(fk, fa, fn)
    if not len(flags) or (int(flags[0]) & 0xFF) not in NUMERIC_CLASSES:
        raise r.bad("only numeric arrays are read (cells, structs and objects are refused)")
    if int(flags[0]) & 0x0800:
        raise r.bad("complex arrays are not supported")
    name = bytes(r.data[na:na + nn]).decode("ascii", "replace")[:64]
    if DTYPES.get(dk, "f")[0] not in "iu":  # MATLAB writes int32; a float could be NaN or 1e300
        raise r.bad(f"array {name!r}: its dimensions are not integers (data type {dk})")
    raw = r.numbers(dk, da, dn)
    if not 2 <= len(raw) <= MAX_DIMS:
        raise r.bad(f"array {name!r}: {len(raw)} dimensions (MATLAB writes 2 or more; at most {MAX_DIMS} are read)")
    dims = [int(v) for v in raw]
    values = r.numbers(rk, ra, rn)
    # the product in Python ints: numpy's int64 product wraps around (2**32 x 2**32 'is' 0)
    if any(d < 0 for d in dims) or math.prod(dims) != len(values):
        raise r.bad(f"array {name!r}: dimensions {dims[:8]}{' ...' if len(dims) > 8 else ''} do not match its "
                    f"{len(values)} values")
    return name, values.reshape(dims, order="F")


def read_svhn(files: dict[str, bytes | memoryview], where: dict[str, str], extra: bool = False):
    """(train images, train labels, test images, test labels, class names) from SVHN's .mat files: X is
    (32, 32, 3, N) uint8, y is (N, 1) with digit 0 stored as 10 in the official files; here digit d is label d."""
    splits = {}
    names = ["train_32x32.mat", "test_32x32.mat"] + (["extra_32x32.mat"] if extra else [])
    for name in names:
        arrays = read_mat(files[name], where[name])
        x, y = arrays.get("X"), arrays.get("y")
        if x is None or y is None:
            raise DataError(f"{where[name]}: expected variables X and y (SVHN's layout), found {sorted(arrays)}")
        if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
            raise DataError(f"{where[name]}: X is {x.dtype} {list(x.shape)}, expected uint8 (H, W, 3, N)")
        train = splits.get("train_32x32.mat")
        if name == "extra_32x32.mat" and train is not None and x.shape[:2] != train[0].shape[1:3]:
            # checked here, before concatenating; train vs test is every source's check (data.checks)
            raise DataError(f"{where[name]}: X holds {x.shape[1]}x{x.shape[0]} images but "
                            f"{where['train_32x32.mat']} holds {train[0].shape[2]}x{train[0].shape[1]}; the training "
                            "files must have one image size")
        labels = np.asarray(y).reshape(-1)
        if len(labels) != x.shape[3] or not np.isin(labels, np.arange(1, 11)).all():
            raise DataError(f"{where[name]}: y must hold {x.shape[3]} labels in 1..10 (10 = digit 0)")
        images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
        splits[name] = (images, (labels.astype(np.int64) % 10))
    train_x, train_y = splits["train_32x32.mat"]
    if extra:
        ex, ey = splits["extra_32x32.mat"]
        train_x, train_y = np.concatenate([train_x, ex]), np.concatenate([train_y, ey])
    test_x, test_y = splits["test_32x32.mat"]
    return train_x, train_y, test_x, test_y, [str(d) for d in range(10)]
