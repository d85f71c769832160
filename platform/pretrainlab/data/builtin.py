"""Built-in datasets: real images installable offline, converted once to shards.

``prepare_builtin("fmnist", root)`` converts Fashion-MNIST from the Debian package
``dataset-fashion-mnist``; ``prepare_builtin("digits", root)`` converts scikit-learn's
8x8 digits. Both are stored raw (uint8 H x W x 1) in the classification schema, with
splits that are disjoint, stratified by class and fixed by the seed.
``prepare_scenes(root)`` generates the image-text scenes set (``scenes/<task>`` in configs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.idx import read_idx
from pretrainlab.data.shards import raw_classification_table, verify_dataset, write_dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# val is 1/12 of the official training set: 5,000 of 60,000 (500 per class).
FASHION_MNIST_SPLIT = {"train": 11 / 12, "val": 1 / 12}
DIGITS_SPLIT = {"train": 0.70, "val": 0.15, "test": 0.15}


@dataclass(frozen=True)
class Converted:
    """What a converter produces: tables in the classification schema, and provenance.

    Attributes:
        splits: split name -> table.
        class_names: label id -> class name.
        source: where the samples came from, recorded in the manifest.
    """

    splits: dict[str, pa.Table]
    class_names: list[str]
    source: str


def convert_fashion_mnist(seed: int, source_dir: str | None) -> Converted:
    """Fashion-MNIST: official test set, official train set split into train/val.

    Args:
        seed: seeds the stratified choice of the 1/12 of training images kept for val.
        source_dir: folder of the four ``*-ubyte.gz`` files; default ``FASHION_MNIST_DIR``.

    Raises:
        DatasetError: a file is missing (saying how to install it) or malformed.
    """
    directory = Path(source_dir or FASHION_MNIST_DIR).absolute()
    missing = [directory / file for file in FASHION_MNIST_FILES if not (directory / file).is_file()]
    if missing:
        raise DatasetError(
            f"{missing[0]}: not found ({len(missing)} of the 4 Fashion-MNIST files missing); install them "
            "with `apt-get install dataset-fashion-mnist` or pass source_dir"
        )
    images, labels, images_file = _fashion_mnist_part(directory, "train")
    splits = {
        split: _raw_table(images, labels, idx, split, images_file)
        for split, idx in stratified_split(labels, FASHION_MNIST_SPLIT, seed).items()
    }
    images, labels, images_file = _fashion_mnist_part(directory, "t10k")
    splits["test"] = _raw_table(images, labels, np.arange(len(labels)), "test", images_file)
    return Converted(splits, FASHION_MNIST_CLASSES, str(directory))


def convert_digits(seed: int, source_dir: str | None) -> Converted:
    """scikit-learn's 1,797 8x8 digits, rescaled 0..16 -> 0..255, split 70/15/15.

    Args:
        seed: seeds the stratified train/val/test split.
        source_dir: must be None; the digits ship inside scikit-learn.
    """
    if source_dir is not None:
        raise DatasetError(f"digits ships inside scikit-learn and takes no source_dir (got {source_dir!r})")
    from sklearn.datasets import load_digits  # deferred: importing scikit-learn takes a second

    bunch = load_digits()
    images = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    splits = {
        split: _raw_table(images, bunch.target, idx, split, "load_digits")
        for split, idx in stratified_split(bunch.target, DIGITS_SPLIT, seed).items()
    }
    return Converted(splits, [str(d) for d in range(10)], "sklearn.datasets.load_digits")


BUILTIN_DATASETS: dict[str, Callable[[int, str | None], Converted]] = {
    "fmnist": convert_fashion_mnist,
    "digits": convert_digits,
}


SCENES = "scenes"
SCENES_IMAGES, SCENES_IMAGE_SIZE = 10000, 96


def prepare_scenes(root: str | os.PathLike, *, seed: int = 0) -> Path:
    """Generates the scenes image-text set (10,000 images of 96 px) into ``root/scenes`` unless an intact copy
    made with ``seed`` by this generator version is there; its four datasets are ``root/scenes/<task>``
    (caption, vqa, grounding, retrieval)."""
    from pretrainlab.data.scenes import GENERATOR_VERSION, TASKS, write_scenes  # deferred: the generator is large

    out = Path(root) / SCENES
    wanted = {
        "seed": seed,
        "num_images": SCENES_IMAGES,
        "image_size": SCENES_IMAGE_SIZE,
        "generator": GENERATOR_VERSION,
    }
    try:
        metadata = [verify_dataset(out / task)["metadata"] for task in TASKS]
        if all(m.get(key) == value for m in metadata for key, value in wanted.items()):
            return out
    except DatasetError:
        pass  # absent, stale or damaged: generate again
    write_scenes(out, num_images=SCENES_IMAGES, image_size=SCENES_IMAGE_SIZE, seed=seed)
    return out


def prepare_builtin(name: str, root: str | os.PathLike, *, seed: int = 0, source_dir: str | None = None) -> Path:
    """Converts a built-in dataset to ``root/name`` unless an intact copy is already there.

    An existing copy is kept when its shards verify and its manifest records the same
    seed and ``source_dir``; otherwise the dataset is converted again and replaces it.

    Args:
        name: a key of ``BUILTIN_DATASETS``.
        root: folder that holds converted datasets.
        seed: fixes the split; the same seed gives byte-identical shards.
        source_dir: where to read the source files instead of the default.

    Returns:
        ``Path(root) / name``.

    Raises:
        DatasetError: unknown name (listing the valid ones), or missing/bad source files.
    """
    if name not in BUILTIN_DATASETS:
        raise DatasetError(f"unknown built-in dataset {name!r}; valid names: {', '.join(BUILTIN_DATASETS)}")
    out = Path(root) / name
    wanted = {"seed": seed, "source_dir": None if source_dir is None else str(Path(source_dir).absolute())}
    try:
        metadata = verify_dataset(out)["metadata"]
        if all(metadata.get(key) == value for key, value in wanted.items()):
            return out
    except DatasetError:
        pass  # absent, stale or damaged: convert again
    data = BUILTIN_DATASETS[name](seed, source_dir)
    write_dataset(
        out,
        data.splits,
        name=name,
        task="classification",
        class_names=data.class_names,
        metadata={**wanted, "source": data.source},
    )
    return out


def stratified_split(labels: np.ndarray, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Splits row indices so that each split holds its fraction of every class.

    Rows are shuffled, ranked within their class, and ordered by relative rank
    (rank / class size): cutting that order at the cumulative fractions gives split
    sizes exact to one row, and per-class counts within one row of proportional.

    Args:
        labels: class id per row.
        fractions: split name -> fraction of the rows, summing to 1.
        seed: seeds the ``numpy.random.Generator`` that shuffles the rows.

    Returns:
        Split name -> sorted, pairwise disjoint row indices covering every row.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    relative_rank = np.empty(len(labels))
    for label in np.unique(labels):
        members = order[labels[order] == label]
        relative_rank[members] = (np.arange(len(members)) + 0.5) / len(members)
    ranked = order[np.argsort(relative_rank[order], kind="stable")]
    cuts = np.rint(np.cumsum(list(fractions.values()))[:-1] * len(labels)).astype(int)
    return {split: np.sort(part) for split, part in zip(fractions, np.split(ranked, cuts), strict=True)}


def _fashion_mnist_part(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray, str]:
    images_file, labels_file = f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
    images, labels = read_idx(directory / images_file), read_idx(directory / labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{directory / images_file}: expected uint8 N x H x W, got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1] or labels.dtype != np.uint8:
        raise DatasetError(
            f"{directory / labels_file}: expected {len(images)} uint8 labels (one per image in "
            f"{images_file}), got {labels.dtype} {labels.shape}"
        )
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(f"{directory / labels_file}: label {labels.max()} is not a class id (0..9)")
    return images, labels, images_file


def _raw_table(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, split: str, source: str) -> pa.Table:
    return raw_classification_table(
        images[idx][..., None], labels[idx], split=split, source_ids=[f"{source}:{i}" for i in idx]
    )
