"""Reading shards with a real local Ray, and decoding raw and PNG rows."""

import io

import numpy as np
import pytest
from PIL import Image

from pretrainlab.data.dataset import decode_images, load_split_numpy, read_split
from pretrainlab.data.errors import DatasetError
from pretrainlab.data.shards import raw_classification_table, write_dataset

N = 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 24-image raw dataset in 3 shards; label i marks image i."""
    images = np.random.default_rng(0).integers(0, 256, (N, 6, 5, 3), dtype=np.uint8)
    table = raw_classification_table(images, np.arange(N), split="train", source_ids=[f"t:{i}" for i in range(N)])
    out = tmp_path_factory.mktemp("data") / "toy"
    write_dataset(
        out, {"train": table}, name="toy", task="classification", class_names=[str(i) for i in range(N)], shard_size=10
    )
    return out, images.transpose(0, 3, 1, 2)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _batch(images: list[bytes], image_format: str, h: int, w: int, c: int) -> dict:
    n = len(images)
    return {
        "image": np.array(images, dtype=object),
        "image_format": np.array([image_format] * n, dtype=object),
        "height": np.full(n, h, np.int32),
        "width": np.full(n, w, np.int32),
        "channels": np.full(n, c, np.int32),
    }


@pytest.mark.needs_ray
def test_read_split_decodes_the_original_images(local_ray, dataset):
    path, originals = dataset
    ds = read_split(path, "train")
    assert ds.count() == N
    seen = 0
    for batch in ds.iter_batches(batch_size=7, batch_format="numpy"):
        np.testing.assert_array_equal(decode_images(batch), originals[batch["label"]])
        seen += len(batch["label"])
    assert seen == N


@pytest.mark.needs_ray
def test_split_in_two_is_disjoint_and_complete(local_ray, dataset):
    path, _ = dataset
    parts = read_split(path, "train").split(2, equal=True)
    labels = [{int(row["label"]) for row in part.iter_rows()} for part in parts]
    assert len(labels[0]) == len(labels[1]) == N // 2
    assert labels[0].isdisjoint(labels[1]) and labels[0] | labels[1] == set(range(N))


def test_load_split_numpy_matches_originals(dataset):
    path, originals = dataset
    images, labels = load_split_numpy(path, "train")
    np.testing.assert_array_equal(images, originals[labels])
    assert labels.dtype == np.int64 and sorted(labels) == list(range(N))


def test_decode_png_rows_to_the_rows_channels():
    rgb = np.random.default_rng(1).integers(0, 256, (2, 4, 3, 3), dtype=np.uint8)
    decoded = decode_images(_batch([_png(x) for x in rgb], "png", 4, 3, 3))
    np.testing.assert_array_equal(decoded, rgb.transpose(0, 3, 1, 2))
    grey = decode_images(_batch([_png(rgb[0])], "png", 4, 3, 1))
    assert grey.shape == (1, 1, 4, 3)
    np.testing.assert_array_equal(grey[0, 0], np.asarray(Image.fromarray(rgb[0]).convert("L")))


def test_decode_raw_rows():
    pixels = np.arange(2 * 2 * 3 * 4, dtype=np.uint8).reshape(2, 2, 3, 4)
    decoded = decode_images(_batch([x.tobytes() for x in pixels], "raw", 2, 3, 4))
    assert decoded.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last storage, no copy
    np.testing.assert_array_equal(decoded, pixels.transpose(0, 3, 1, 2))


def test_decode_errors_name_the_row():
    pixels = np.zeros((4, 3, 3), np.uint8)
    batch = _batch([_png(pixels), _png(pixels)], "png", 4, 3, 3)
    batch["height"][1] = 5
    with pytest.raises(DatasetError, match="row 1 of the batch: image is H x W x C"):
        decode_images(batch)
    batch = _batch([_png(pixels), b"not a png"], "png", 4, 3, 3)
    batch["source_id"] = np.array(["a.png", "b.png"], dtype=object)
    with pytest.raises(DatasetError, match=r"row 1 \(b.png\): cannot decode png"):
        decode_images(batch)
    with pytest.raises(DatasetError, match="decoded image is 4x3, row says 3x4"):
        decode_images(_batch([_png(pixels)], "png", 3, 4, 3))


def test_unlabelled_split_is_refused_by_load_split_numpy(tmp_path):
    images = np.zeros((2, 2, 2, 1), np.uint8)
    table = raw_classification_table(images, None, split="unlabelled", source_ids=["a", "b"])
    write_dataset(tmp_path / "u", {"unlabelled": table}, name="u", task="classification", class_names=[])
    with pytest.raises(DatasetError, match="2 unlabelled rows"):
        load_split_numpy(tmp_path / "u", "unlabelled")
