"""Built-in datasets: digits from scikit-learn, Fashion-MNIST from IDX files (generated and real)."""

import gzip
import json
import struct
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrainlab.config import validate
from pretrainlab.data import builtin
from pretrainlab.data.builtin import FASHION_MNIST_DIR, prepare_builtin
from pretrainlab.data.catalog import dataset_location, prepared_location
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.data.errors import DatasetError
from pretrainlab.data.idx import read_idx
from pretrainlab.data.shards import load_manifest, shard_paths


def _column(dataset_dir, split: str, name: str) -> list:
    return pa.concat_tables(pq.read_table(p, columns=[name]) for p in shard_paths(dataset_dir, split))[name].to_pylist()


def _shas(dataset_dir) -> dict:
    return {s["file"]: s["sha256"] for e in load_manifest(dataset_dir)["splits"].values() for s in e["shards"]}


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_source(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "source"
    source.mkdir()
    for prefix, n in (("train", 300), ("t10k", 50)):
        _write_idx(source / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return source


def test_digits_splits_are_stratified_disjoint_and_complete(tmp_path):
    path = prepare_builtin("digits", tmp_path)
    assert path == tmp_path / "digits"
    manifest = load_manifest(path)
    counts = {split: entry["count"] for split, entry in manifest["splits"].items()}
    assert sum(counts.values()) == 1797 and 1200 < counts["train"] < 1320
    assert manifest["metadata"]["seed"] == 0 and manifest["class_names"] == [str(d) for d in range(10)]
    ids = {split: set(_column(path, split, "source_id")) for split in counts}
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"].isdisjoint(ids["test"])
    assert ids["val"].isdisjoint(ids["test"])
    assert len(ids["train"] | ids["val"] | ids["test"]) == 1797
    for split in counts:
        assert set(_column(path, split, "label")) == set(range(10))
    images, labels = load_split_numpy(path, "test")
    assert images.shape == (counts["test"], 1, 8, 8) and images.max() == 255 and labels.dtype == np.int64


def test_digits_split_is_fixed_by_the_seed(tmp_path):
    first = _shas(prepare_builtin("digits", tmp_path / "a", seed=3))
    assert _shas(prepare_builtin("digits", tmp_path / "b", seed=3)) == first
    other = prepare_builtin("digits", tmp_path / "a", seed=4)  # seed differs: converted again
    assert load_manifest(other)["metadata"]["seed"] == 4
    assert _shas(other)["train-00000.parquet"] != first["train-00000.parquet"]


def test_existing_copy_is_reused_and_a_damaged_one_rebuilt(tmp_path):
    path = prepare_builtin("digits", tmp_path)
    shard = path / "val-00000.parquet"
    mtime = shard.stat().st_mtime_ns
    prepare_builtin("digits", tmp_path)
    assert shard.stat().st_mtime_ns == mtime
    shard.write_bytes(b"garbage")
    load_split_numpy(prepare_builtin("digits", tmp_path), "val")


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(DatasetError, match="unknown built-in dataset 'cifar'; valid names: fmnist, digits"):
        prepare_builtin("cifar", tmp_path)


def test_fmnist_from_generated_idx_files(tmp_path, fmnist_source):
    path = prepare_builtin("fmnist", tmp_path / "out", seed=1, source_dir=str(fmnist_source))
    manifest = load_manifest(path)
    counts = {split: entry["count"] for split, entry in manifest["splits"].items()}
    assert counts == {"train": 275, "val": 25, "test": 50}
    assert manifest["metadata"] == {"seed": 1, "source_dir": str(fmnist_source), "source": str(fmnist_source)}
    assert manifest["class_names"][0] == "T-shirt/top" and len(manifest["class_names"]) == 10
    images, labels = load_split_numpy(path, "test")
    with gzip.open(fmnist_source / "t10k-images-idx3-ubyte.gz") as f:
        original = np.frombuffer(f.read()[16:], np.uint8).reshape(50, 1, 28, 28)
    np.testing.assert_array_equal(images, original)
    np.testing.assert_array_equal(labels, np.arange(50) % 10)


def test_truncated_idx_file_is_named(tmp_path, fmnist_source):
    labels = fmnist_source / "train-labels-idx1-ubyte.gz"
    with gzip.open(labels) as f:
        data = f.read()
    with gzip.open(labels, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(
        DatasetError, match=r"train-labels-idx1-ubyte.gz: payload is 290 bytes .* needs 300 \(truncated\)"
    ):
        prepare_builtin("fmnist", tmp_path / "out", source_dir=str(fmnist_source))
    labels.write_bytes(labels.read_bytes()[:-20])  # a cut gzip stream
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz: cannot read"):
        prepare_builtin("fmnist", tmp_path / "out", source_dir=str(fmnist_source))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x01\x00\x08\x01", "bad magic number 0x01000801"),
        (b"\x00\x00\x07\x01", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x02\x00\x00", "truncated header"),
        (b"\x00\x00\x08\x02" + b"\xff" * 8 + b"ab", r"payload is 2 bytes .* needs 18446744065119617025 \(truncated\)"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01ab", "payload is longer than the 1 bytes .* needs \\(trailing bytes\\)"),
    ],
)
def test_read_idx_rejects_bad_headers(tmp_path, data, problem):
    (tmp_path / "bad.idx").write_bytes(data)
    with pytest.raises(DatasetError, match=f"bad.idx: {problem}"):
        read_idx(tmp_path / "bad.idx")


def test_read_idx_stops_a_gzip_stream_that_inflates_past_its_header(tmp_path):
    bomb = tmp_path / "bomb-labels-idx1-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(struct.pack(">HBBI", 0, 0x08, 1, 4) + bytes(4))
        for _ in range(25):
            f.write(bytes(8 << 20))  # 200 MiB of zeros past the declared payload, about 200 kB on disk
    tracemalloc.start()
    with pytest.raises(DatasetError, match=r"longer than the 4 bytes the header \(dims \[4\], uint8\) needs"):
        read_idx(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, f"read_idx held {peak >> 20} MiB"


def test_read_idx_reads_big_endian_types(tmp_path):
    header = struct.pack(">HBB2I", 0, 0x0C, 2, 1, 2)
    (tmp_path / "x.idx").write_bytes(header + np.array([1, -2], ">i4").tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx"), np.array([[1, -2]], np.int32))


def test_missing_fmnist_files_say_how_to_install(tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    _write_idx(partial / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28)))
    _write_idx(partial / "train-labels-idx1-ubyte.gz", np.zeros(1))
    with pytest.raises(
        DatasetError, match="t10k-images-idx3-ubyte.gz: not found.*apt-get install dataset-fashion-mnist"
    ):
        prepare_builtin("fmnist", tmp_path / "out", source_dir=str(partial))


def test_real_fashion_mnist(tmp_path):
    path = prepare_builtin("fmnist", tmp_path)
    manifest = load_manifest(path)
    assert {split: entry["count"] for split, entry in manifest["splits"].items()} == {
        "train": 55000,
        "val": 5000,
        "test": 10000,
    }
    assert manifest["metadata"]["source"] == FASHION_MNIST_DIR
    _, labels = load_split_numpy(path, "test")
    assert np.bincount(labels).tolist() == [1000] * 10
    assert np.bincount(_column(path, "val", "label")).tolist() == [500] * 10


def test_a_config_names_where_its_dataset_is_prepared_without_converting_it(tmp_path):
    digits = validate({"name": "t", "data": {"dataset": "digits", "root": str(tmp_path)}})
    assert dataset_location(digits) == str(tmp_path / "digits")
    assert prepared_location(digits) is None and not (tmp_path / "digits").exists()
    prepare_builtin("digits", tmp_path)
    assert prepared_location(digits) == str(tmp_path / "digits")
    scenes = validate({"name": "t", "data": {"dataset": "scenes/vqa", "root": str(tmp_path)}})
    assert dataset_location(scenes) == str(tmp_path / "scenes" / "vqa") and prepared_location(scenes) is None
    on_s3 = validate({"name": "t", "data": {"dataset": "s3://bucket/sets/shapes"}})
    assert dataset_location(on_s3) == "s3://bucket/sets/shapes"
    a_file = validate({"name": "t", "data": {"dataset": str(tmp_path / "digits" / "manifest.json")}})
    assert prepared_location(a_file) is None


def test_scenes_are_kept_when_intact_and_generated_again_when_an_older_generator_made_them(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "SCENES_IMAGES", 40)  # the set's size, small for the test
    out = builtin.prepare_scenes(tmp_path)
    manifest = out / "retrieval" / "manifest.json"
    written = manifest.stat().st_mtime_ns
    assert builtin.prepare_scenes(tmp_path) == out and manifest.stat().st_mtime_ns == written
    older = json.loads(manifest.read_text())
    older["metadata"]["generator"] = "scenes-1"
    manifest.write_text(json.dumps(older))
    builtin.prepare_scenes(tmp_path)
    assert load_manifest(out / "retrieval")["metadata"]["generator"] == "scenes-2"
