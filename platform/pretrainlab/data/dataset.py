"""Reading converted datasets: with Ray Data for training, with pyarrow for evaluation.

Both paths verify the split's shards against the manifest first, and both decode with
``decode_images``, so a training batch and an evaluation array hold the same pixels.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from PIL import Image

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.shards import shard_paths, verify_dataset

IMAGE_COLUMNS = ["image", "image_format", "height", "width", "channels"]
TASK_COLUMNS = {
    "classification": ["label"],
    "caption": ["captions"],
    "retrieval": ["captions", "negatives", "also_true"],
    "vqa": ["questions"],
    "grounding": ["refs"],
}
"""The annotation columns that training reads from a dataset of each task."""
READ_COLUMNS = IMAGE_COLUMNS + TASK_COLUMNS["classification"]
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def read_split(dataset_dir: str | os.PathLike, split: str) -> ray.data.Dataset:
    """Verifies one split's shards, then reads them as a Ray Dataset: the image columns and the
    annotation columns of the dataset's task (``TASK_COLUMNS``).

    Connects to whatever Ray cluster is initialised (or lets Ray Data start one). On a
    multi-node cluster ``dataset_dir`` must be on storage every node sees.

    Args:
        dataset_dir: the dataset folder, or its URI (``s3://bucket/path``; see :mod:`pretrainlab.storage`).
        split: the split to read.

    Raises:
        DatasetError: unknown split, or a shard missing or changed.
    """
    task = verify_dataset(dataset_dir, split)["task"]
    columns = IMAGE_COLUMNS + TASK_COLUMNS[task]
    return ray.data.read_parquet(shard_paths(dataset_dir, split)).select_columns(columns)


def decode_images(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Decodes a batch of rows into uint8 pixels N x C x H x W.

    Args:
        batch: columns as numpy arrays, as Ray Data's ``batch_format="numpy"`` gives
            them: ``image`` (object array of bytes), ``image_format``, ``height``,
            ``width``, ``channels``; ``source_id``, when present, names bad rows.

    Returns:
        uint8 N x C x H x W, stored channels-last (an N x H x W x C array transposed,
        which resizes faster and costs no copy); PNG/JPEG rows are converted to the
        row's channel count (1: grey, 3: RGB, 4: RGBA).

    Raises:
        DatasetError: an empty batch, rows of different shapes, an unknown format, or
            an image that does not decode to its row's height, width and channels.
    """
    images = batch["image"]
    if len(images) == 0:
        raise DatasetError("decode_images got an empty batch")
    shapes = np.stack([batch["height"], batch["width"], batch["channels"]], axis=1).astype(np.int64)
    mismatched = np.flatnonzero((shapes != shapes[0]).any(axis=1))
    if mismatched.size:
        row = int(mismatched[0])
        raise DatasetError(
            f"{_row(batch, row)}: image is H x W x C {tuple(shapes[row].tolist())} but {_row(batch, 0)} is "
            f"{tuple(shapes[0].tolist())}; images in one batch must share a shape (resize them first)"
        )
    h, w, c = shapes[0].tolist()
    if (batch["image_format"] == "raw").all():
        sizes = np.fromiter(map(len, images), np.int64, len(images))
        wrong = np.flatnonzero(sizes != h * w * c)
        if wrong.size:
            row = int(wrong[0])
            raise DatasetError(f"{_row(batch, row)}: raw image has {sizes[row]} bytes, not {h}x{w}x{c}")
        pixels = np.frombuffer(bytearray(b"".join(images)), np.uint8).reshape(len(images), h, w, c)
        return pixels.transpose(0, 3, 1, 2)
    out = np.empty((len(images), h, w, c), np.uint8)
    for i, (data, image_format) in enumerate(zip(images, batch["image_format"], strict=True)):
        out[i] = _decode(data, image_format, h, w, c, batch, i)
    return out.transpose(0, 3, 1, 2)


def load_split_numpy(dataset_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole labelled split into memory with pyarrow, without Ray.

    Args:
        dataset_dir: the dataset folder.
        split: the split to read.

    Returns:
        (uint8 images N x C x H x W, int64 labels N), in shard order.

    Raises:
        DatasetError: unknown split, a shard missing or changed, unlabelled rows, or
            an undecodable image.
    """
    verify_dataset(dataset_dir, split)
    table = pa.concat_tables(
        pq.read_table(path, columns=[*READ_COLUMNS, "source_id"]) for path in shard_paths(dataset_dir, split)
    )
    labels = table.column("label")
    if labels.null_count:
        raise DatasetError(f"{dataset_dir}: split {split!r} has {labels.null_count} unlabelled rows")
    batch = {name: table.column(name).to_numpy() for name in table.column_names}
    return np.ascontiguousarray(decode_images(batch)), batch["label"].astype(np.int64)


def load_split_annotated(dataset_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, dict[str, list]]:
    """Reads a whole split of any task into memory with pyarrow, without Ray.

    Returns:
        (uint8 images N x C x H x W, the task's annotation columns (``TASK_COLUMNS``) as
        lists of N Python values), in shard order.

    Raises:
        DatasetError: unknown split, a shard missing or changed, or an undecodable image.
    """
    task = verify_dataset(dataset_dir, split)["task"]
    columns = IMAGE_COLUMNS + ["source_id"]
    table = pa.concat_tables(
        pq.read_table(path, columns=columns + TASK_COLUMNS[task]) for path in shard_paths(dataset_dir, split)
    )
    images = decode_images({name: table.column(name).to_numpy() for name in columns})
    return np.ascontiguousarray(images), {name: table.column(name).to_pylist() for name in TASK_COLUMNS[task]}


def _decode(data: bytes, image_format: str, h: int, w: int, c: int, batch: dict[str, np.ndarray], i: int) -> np.ndarray:
    """One row's pixels, H x W x C."""
    if image_format == "raw":
        if len(data) != h * w * c:
            raise DatasetError(f"{_row(batch, i)}: raw image has {len(data)} bytes, not {h}x{w}x{c}")
        return np.frombuffer(data, np.uint8).reshape(h, w, c)
    if image_format not in ("png", "jpeg"):
        raise DatasetError(f"{_row(batch, i)}: unknown image_format {image_format!r} (raw, png or jpeg)")
    if c not in _PIL_MODES:
        raise DatasetError(f"{_row(batch, i)}: {image_format} images need 1, 3 or 4 channels, not {c}")
    mode = _PIL_MODES[c]
    try:
        with Image.open(io.BytesIO(data), formats=[image_format.upper()]) as image:
            pixels = np.asarray(image if image.mode == mode else image.convert(mode)).reshape(image.height, -1, c)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{_row(batch, i)}: cannot decode {image_format} image: {e}") from None
    if pixels.shape[:2] != (h, w):
        height, width = pixels.shape[:2]
        raise DatasetError(f"{_row(batch, i)}: decoded image is {height}x{width}, row says {h}x{w}")
    return pixels


def _row(batch: dict[str, np.ndarray], i: int) -> str:
    return f"row {i} ({batch['source_id'][i]})" if "source_id" in batch else f"row {i} of the batch"
