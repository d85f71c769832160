"""Reader for the IDX files of MNIST and Fashion-MNIST (plain or gzip)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

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


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file into an array of its native dtype and shape.

    Args:
        path: the file; a name ending in ``.gz`` is read through gzip.

    Returns:
        A new, writable array in native byte order, shaped as the header says.

    Raises:
        DatasetError: the file is missing, not gzip, truncated, has a bad magic
            number or type code, or its payload size does not match the header.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read ({e}); the file is truncated or corrupt") from None

    if len(data) < 4:
        raise DatasetError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero, type_code, ndim = struct.unpack_from(">HBB", data)
    if zero != 0 or ndim == 0:
        raise DatasetError(f"{path}: bad magic number 0x{data[:4].hex()} (expected 0x0000TTNN: type TT, NN >= 1 dims)")
    if type_code not in _DTYPES:
        raise DatasetError(
            f"{path}: unknown IDX type code 0x{type_code:02x} (valid: {', '.join(f'0x{c:02x}' for c in _DTYPES)})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated header ({len(data)} bytes, {ndim} dims need {header})")
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    dtype = _DTYPES[type_code]
    expected = math.prod(dims) * dtype.itemsize
    payload = len(data) - header
    if payload != expected:
        problem = "truncated" if payload < expected else "trailing bytes"
        raise DatasetError(
            f"{path}: payload is {payload} bytes but the header (dims {list(dims)}, {dtype.name}) "
            f"needs {expected} ({problem})"
        )
    array = np.frombuffer(data, dtype, count=math.prod(dims), offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))
