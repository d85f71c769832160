"""MNIST / Fashion-MNIST IDX pairs: ``<prefix>-images-idx3-ubyte[.gz]`` + ``<prefix>-labels-idx1-ubyte[.gz]``.

``SRC`` is the folder holding the pairs; prefix ``t10k`` is split ``test``, any other
prefix (``train``) is its own split. Images are stored raw (uint8 H x W x 1). Class
names come from ``SRC/classes.txt`` when present, else ``"0" .. str(max label)`` (labels
up to 99,999; larger ones are bad entries).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.formats.common import (
    MAX_NUMBERED_CLASSES,
    BadInput,
    Entry,
    Row,
    Source,
    check_label,
    class_names_file,
    numbered_classes,
    raw_image_fields,
)
from pretrainlab.data.idx import read_idx

_IMAGES = "-images-idx3-ubyte"
_SPLITS = {"t10k": "test"}


def convert_idx(src: Path, images: Path | None, bad: BadInput) -> Source:
    """Reads IDX image/label pairs into classification entries.

    Args:
        src: the folder of IDX files.
        images: unused (must be None).
        bad: where rows with a label out of range go.

    Raises:
        DatasetError: ``src`` holds no images file, a labels file is missing, or a file
            is malformed or does not match its partner.
    """
    image_files = sorted(p for p in src.glob(f"*{_IMAGES}*") if p.name.endswith((_IMAGES, _IMAGES + ".gz")))
    if not image_files:
        raise DatasetError(f"{src}: no *{_IMAGES}[.gz] files here")
    parts = []
    for images_file in image_files:
        prefix = images_file.name.split(_IMAGES)[0]
        parts.append((_SPLITS.get(prefix, prefix), images_file, *_read_pair(images_file, prefix)))

    names = class_names_file(src)
    classes_from = str(src / "classes.txt")
    if names is None:
        names, classes_from = numbered_classes(
            max(int(labels[labels < MAX_NUMBERED_CLASSES].max(initial=0)) for *_, labels in parts)
        )
    entries = []
    for split, images_file, pixels, labels in parts:
        entries += [
            Entry(
                str(images_file),
                f"index {i}",
                split,
                f"{images_file.name}:{i}",
                partial(_row, pixels, labels, i, len(names), classes_from),
            )
            for i in range(len(pixels))
        ]
    return Source(entries, names)


def _read_pair(images_file: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    name = f"{prefix}-labels-idx1-ubyte"
    candidates = [images_file.with_name(name), images_file.with_name(name + ".gz")]
    labels_file = next((p for p in candidates if p.is_file()), None)
    if labels_file is None:
        raise DatasetError(f"{images_file}: no labels file {name}[.gz] next to it")
    pixels, labels = read_idx(images_file), read_idx(labels_file)
    if pixels.ndim != 3 or pixels.dtype != np.uint8:
        raise DatasetError(f"{images_file}: expected uint8 N x H x W, got {pixels.dtype} {pixels.shape}")
    if labels.shape != pixels.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{labels_file}: expected {len(pixels)} integer labels (one per image in {images_file.name}), "
            f"got {labels.dtype} {labels.shape}"
        )
    return pixels, labels


def _row(pixels: np.ndarray, labels: np.ndarray, i: int, num_classes: int, classes_from: str) -> Row:
    label = check_label(int(labels[i]), num_classes, classes_from)
    return {**raw_image_fields(pixels[i][..., None]), "label": label}
