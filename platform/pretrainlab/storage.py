"""Files on local disk or on object storage (``s3://bucket/path``), through pyarrow filesystems.

S3 is configured as for the AWS SDK and CLI: credentials from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (or ``~/.aws``), the region from ``AWS_DEFAULT_REGION``, and an
S3-compatible server (MinIO, Ceph, ...) from ``AWS_ENDPOINT_URL``. Every process that opens
such files takes them from its own environment: the driver, Ray Train workers, Ray Data tasks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs

from pretrainlab.paths import is_uri

_URI_SCHEMES = {"s3": "s3", "gcs": "gs"}
"""pyarrow filesystem type -> URI scheme."""


class StorageError(OSError):
    """Storage cannot be used; the message names its URI."""


def filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem of a ``scheme://...`` URI and the path inside it.

    Raises:
        StorageError: An unknown scheme, or a URI pyarrow cannot resolve.
    """
    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as err:
        raise StorageError(f"{uri}: {err}") from None


def location(fs: pyarrow.fs.FileSystem, path: str) -> str:
    """``path`` on ``fs`` as its URI (``s3://bucket/key``); a local path as it is."""
    scheme = _URI_SCHEMES.get(fs.type_name)
    return f"{scheme}://{path}" if scheme else path


def join(folder: str | os.PathLike, name: str) -> str:
    """``name`` inside ``folder``, a local folder or a URI."""
    text = os.fspath(folder)
    return f"{text.rstrip('/')}/{name}" if is_uri(text) else str(Path(text) / name)


def open_input(path: str | os.PathLike) -> BinaryIO:
    """``path`` (local or a URI) opened for reading bytes; a missing file raises ``FileNotFoundError``."""
    text = os.fspath(path)
    if not is_uri(text):
        return open(text, "rb")  # noqa: SIM115 - the caller closes it
    fs, inner = filesystem(text)
    return fs.open_input_stream(inner)


def check_storage(uri: str, key: str) -> None:
    """Fail early, naming config key ``key`` and ``uri``, when a storage URI's bucket does not exist or
    its server does not answer. Local folders are not checked: they are created when written.

    Raises:
        StorageError: The message names the URI and what is wrong.
    """
    if not is_uri(uri):
        return
    try:
        fs, path = filesystem(uri)
    except StorageError as err:
        raise StorageError(f"{key}: {err}") from None
    bucket = path.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket).type != pyarrow.fs.FileType.NotFound
    except OSError as err:
        raise StorageError(
            f"{key}: cannot access {uri} ({str(err).splitlines()[0]}); check AWS_ENDPOINT_URL, "
            "AWS_DEFAULT_REGION and the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        ) from None
    if not found:
        raise StorageError(f"{key}: {uri}: bucket {bucket!r} does not exist; create it first")
