"""Reader for the IDX files of MNIST and Fashion-MNIST (plain or gzip)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pretrainlab.data.errors import DatasetError

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/).
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_CHUNK = 1 << 24  # bytes per read of the payload


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file into an array of its native dtype and shape.

    Only the payload its header declares is read: a gzip stream that would inflate past it is
    refused after one byte more, never decompressed whole.

    Args:
        path: the file; a name ending in ``.gz`` is read through gzip.

    Returns:
        A new, writable array in native byte order, shaped as the header says.

    Raises:
        DatasetError: the file is missing, not gzip, truncated, has a bad magic
            number or type code, or its payload size does not match the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            dims, dtype = _read_header(f, path)
            expected = math.prod(dims) * dtype.itemsize
            payload = _read_at_most(f, expected)
            trailing = len(f.read(1))
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read ({e}); the file is truncated or corrupt") from None
    header = f"the header (dims {list(dims)}, {dtype.name})"
    if len(payload) < expected:
        raise DatasetError(f"{path}: payload is {len(payload)} bytes but {header} needs {expected} (truncated)")
    if trailing:
        raise DatasetError(f"{path}: payload is longer than the {expected} bytes {header} needs (trailing bytes)")
    array = np.frombuffer(payload, dtype).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _read_at_most(f: BinaryIO, size: int) -> bytearray:
    """Up to ``size`` bytes of ``f``, read a chunk at a time: a header may declare far more than the file holds."""
    data = bytearray()
    while len(data) < size and (chunk := f.read(min(size - len(data), _CHUNK))):
        data += chunk
    return data


def _read_header(f: BinaryIO, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The dims and dtype of the IDX header at the start of ``f``."""
    magic = f.read(4)
    if len(magic) < 4:
        raise DatasetError(f"{path}: {len(magic)} bytes, too short for an IDX header")
    zero, type_code, ndim = struct.unpack(">HBB", magic)
    if zero != 0 or ndim == 0:
        raise DatasetError(f"{path}: bad magic number 0x{magic.hex()} (expected 0x0000TTNN: type TT, NN >= 1 dims)")
    if type_code not in _DTYPES:
        raise DatasetError(
            f"{path}: unknown IDX type code 0x{type_code:02x} (valid: {', '.join(f'0x{c:02x}' for c in _DTYPES)})"
        )
    sizes = f.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise DatasetError(f"{path}: truncated header ({4 + len(sizes)} bytes, {ndim} dims need {4 + 4 * ndim})")
    return struct.unpack(f">{ndim}I", sizes), _DTYPES[type_code]
