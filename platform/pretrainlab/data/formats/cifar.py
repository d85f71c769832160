"""CIFAR-10 / CIFAR-100 python batches, read without trusting the pickles.

``SRC`` is the extracted folder: ``cifar-10-batches-py`` (``data_batch_1`` .. ``_5``,
``test_batch``, ``batches.meta``) or ``cifar-100-python`` (``train``, ``test``, ``meta``;
fine labels). Images are stored raw (uint8 32 x 32 x 3).

The batches are pickles. They are read with ``SafeUnpickler``, which resolves only the
globals a numpy array needs and refuses anything else, so a crafted file cannot run
code.
"""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy._core.multiarray import _reconstruct

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.formats.common import (
    BadEntry,
    BadInput,
    Entry,
    Row,
    Source,
    check_label,
    check_text,
    raw_image_fields,
)

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
# layout -> (meta file, class names key, labels key, (split, batch files) ...)
_LAYOUTS = {
    "CIFAR-10": (
        "batches.meta",
        "label_names",
        "labels",
        (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])),
    ),
    "CIFAR-100": ("meta", "fine_label_names", "fine_labels", (("train", ["train"]), ("test", ["test"]))),
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused.

    Args:
        file: the open binary file.
        path: the file's path, named in errors.
    """

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # the batches were pickled by Python 2
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        """Resolves a global only when it is one of numpy's array reconstruction helpers.

        Raises:
            DatasetError: naming the file and the refused global.
        """
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise DatasetError(
                f"{self.path}: refusing to unpickle global {module}.{name}; a CIFAR batch holds only numpy "
                "arrays and lists (the file is not a CIFAR batch, or was tampered with)"
            ) from None


def load_batch(path: Path) -> dict[str, Any]:
    """Reads one CIFAR python batch with ``SafeUnpickler``; keys are returned as str.

    Raises:
        DatasetError: naming the file, when it is missing, not a pickle, refers to a
            global other than numpy's, or is not a dict.
    """
    try:
        with open(path, "rb") as f:
            data = SafeUnpickler(f, path).load()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except DatasetError:
        raise
    except Exception as e:  # a damaged pickle can fail in many ways, all of them "not readable"
        raise DatasetError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(data).__name__}")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in data.items()}


def convert_cifar(src: Path, images: Path | None, bad: BadInput) -> Source:
    """Reads CIFAR-10 or CIFAR-100 batches into classification entries.

    Args:
        src: the extracted batches folder.
        images: unused (must be None).
        bad: where rows with a label out of range go.

    Raises:
        DatasetError: neither layout's meta file is present, or a batch is missing or malformed.
    """
    layout = next((name for name, spec in _LAYOUTS.items() if (src / spec[0]).is_file()), None)
    if layout is None:
        raise DatasetError(f"{src}: neither batches.meta (CIFAR-10) nor meta (CIFAR-100) is here")
    meta_file, names_key, labels_key, splits = _LAYOUTS[layout]
    meta = src / meta_file
    names = _names(_value(load_batch(meta), names_key, list, meta), names_key, meta)
    entries = []
    for split, files in splits:
        for file in files:
            path = src / file
            batch = load_batch(path)
            pixels = _pixels(_value(batch, "data", np.ndarray, path), path)
            labels = _value(batch, labels_key, (list, np.ndarray), path)
            if isinstance(labels, np.ndarray) and labels.ndim != 1:
                raise DatasetError(f"{path}: {labels_key!r} must be one label per image, got shape {labels.shape}")
            if len(labels) != len(pixels):
                raise DatasetError(f"{path}: {len(pixels)} images but {len(labels)} {labels_key!r}")
            entries += [
                Entry(str(path), f"index {i}", split, f"{file}:{i}", partial(_row, pixels, labels, i, len(names), meta))
                for i in range(len(pixels))
            ]
    return Source(entries, names, {"layout": layout})


def _value(batch: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value = batch.get(key)
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DatasetError(f"{path}: expected key {key!r} holding a {names}, got {type(value).__name__}")
    return value


def _pixels(data: np.ndarray, path: Path) -> np.ndarray:
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 N x 3072, got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes R, G, B -> H x W x C


def _names(values: list[Any], key: str, meta: Path) -> list[str]:
    """The class names of a meta file: distinct strings (bytes decoded as UTF-8)."""
    names = []
    for i, value in enumerate(values):
        try:
            names.append(check_text(value.decode("utf-8") if isinstance(value, bytes) else value, "name"))
        except (AttributeError, UnicodeDecodeError, BadEntry):
            raise DatasetError(f"{meta}: {key}[{i}] must be a UTF-8 string, got {value!r:.40}") from None
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DatasetError(f"{meta}: {key} must be distinct; repeated: {repeated}")
    return names


def _row(pixels: np.ndarray, labels: list[int], i: int, num_classes: int, meta: Path) -> Row:
    if not isinstance(labels[i], int | np.integer):
        raise BadEntry(f"label {labels[i]!r:.40} is not an integer")
    label = check_label(int(labels[i]), num_classes, str(meta))
    return {**raw_image_fields(pixels[i]), "label": label}
