"""Shard writer, manifest and verification, on real files."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.shards import (
    CLASSIFICATION_SCHEMA,
    load_manifest,
    raw_classification_table,
    shard_paths,
    verify_dataset,
    write_dataset,
)


def _table(n: int, split: str = "train", seed: int = 0) -> pa.Table:
    images = np.random.default_rng(seed).integers(0, 256, (n, 4, 5, 3), dtype=np.uint8)
    return raw_classification_table(images, np.arange(n) % 3, split=split, source_ids=[f"t:{i}" for i in range(n)])


def _write(out, shard_size: int = 4, **splits: pa.Table) -> dict:
    splits = splits or {"train": _table(10), "val": _table(3, "val", seed=1)}
    return write_dataset(
        out,
        splits,
        name="toy",
        task="classification",
        class_names=["a", "b", "c"],
        shard_size=shard_size,
        metadata={"seed": 7},
    )


def test_round_trip_keeps_rows(tmp_path):
    original = _table(10)
    _write(tmp_path / "ds", train=original)
    back = pa.concat_tables(pq.read_table(p) for p in shard_paths(tmp_path / "ds", "train"))
    assert back.num_rows == 10
    assert back.column("label").to_pylist() == original.column("label").to_pylist()
    assert back.column("image").to_pylist() == original.column("image").to_pylist()
    assert back.column("source_id").to_pylist() == original.column("source_id").to_pylist()
    assert back.schema.equals(CLASSIFICATION_SCHEMA)


def test_shards_split_by_shard_size_and_manifest_matches_files(tmp_path):
    manifest = _write(tmp_path / "ds")
    assert manifest == load_manifest(tmp_path / "ds")
    assert manifest["metadata"] == {"seed": 7}
    train = manifest["splits"]["train"]
    assert train["count"] == 10
    assert [s["file"] for s in train["shards"]] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert [s["rows"] for s in train["shards"]] == [4, 4, 2]
    for shard in train["shards"] + manifest["splits"]["val"]["shards"]:
        data = (tmp_path / "ds" / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert verify_dataset(tmp_path / "ds") == manifest


def test_same_input_gives_byte_identical_files(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_rewrite_replaces_dataset_and_leaves_no_temporaries(tmp_path):
    _write(tmp_path / "ds")
    _write(tmp_path / "ds", shard_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "manifest.json",
        "train-00000.parquet",
        "val-00000.parquet",
    ]


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a dataset"):
        _write(tmp_path / "ds")
    assert (tmp_path / "ds" / "notes.txt").exists()


def test_corrupted_shard_is_named(tmp_path):
    _write(tmp_path / "ds")
    shard = tmp_path / "ds" / "train-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="train-00001.parquet"):
        verify_dataset(tmp_path / "ds")
    verify_dataset(tmp_path / "ds", "val")  # other splits stay usable


def test_truncated_shard_is_named(tmp_path):
    _write(tmp_path / "ds")
    shard = tmp_path / "ds" / "val-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="val-00000.parquet"):
        verify_dataset(tmp_path / "ds", ["val"])


def test_missing_shard_is_named(tmp_path):
    _write(tmp_path / "ds")
    (tmp_path / "ds" / "train-00002.parquet").unlink()
    with pytest.raises(DatasetError, match="train-00002.parquet.*missing"):
        verify_dataset(tmp_path / "ds")


def test_missing_or_bad_manifest_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "nothing" / "manifest.json")):
        load_manifest(tmp_path / "nothing")
    _write(tmp_path / "ds")
    manifest_path = tmp_path / "ds" / "manifest.json"
    manifest_path.write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json: not valid JSON"):
        load_manifest(tmp_path / "ds")
    manifest_path.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(DatasetError, match="schema_version 99"):
        load_manifest(tmp_path / "ds")


def test_version_1_manifests_are_read_except_retrieval_ones_which_lack_also_true(tmp_path):
    _write(tmp_path / "ds")
    manifest_path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["schema_version"] == 2 and manifest["task"] == "classification"
    manifest_path.write_text(json.dumps({**manifest, "schema_version": 1}))
    assert verify_dataset(tmp_path / "ds")["schema_version"] == 1
    manifest_path.write_text(json.dumps({**manifest, "schema_version": 1, "task": "retrieval"}))
    with pytest.raises(DatasetError, match="a 'retrieval' dataset of schema_version 1, this PretrainLab reads"):
        load_manifest(tmp_path / "ds")


def test_unknown_split_lists_known_splits(tmp_path):
    _write(tmp_path / "ds")
    with pytest.raises(DatasetError, match="no split 'test'; known splits: train, val"):
        shard_paths(tmp_path / "ds", "test")


def test_schema_mismatch_names_split_and_field(tmp_path):
    table = _table(5)
    label = table.schema.get_field_index("label")
    with pytest.raises(DatasetError, match="split 'train': field 'label' has type double, expected int32"):
        _write(tmp_path / "ds", train=table.set_column(label, "label", pa.array([0.0] * 5)))
    with pytest.raises(DatasetError, match="split 'train': field 'label' does not fit int32"):
        _write(tmp_path / "ds", train=table.set_column(label, "label", pa.array([2**40] * 5)))
    with pytest.raises(DatasetError, match=r"missing fields \['source_id'\]"):
        _write(tmp_path / "ds", train=table.drop_columns(["source_id"]))
    assert not (tmp_path / "ds").exists()


def test_lossless_casts_and_column_order_are_accepted(tmp_path):
    table = _table(5)
    columns = {name: table.column(name) for name in reversed(table.column_names)}
    columns["label"] = columns["label"].cast(pa.int64())
    columns["split"] = columns["split"].cast(pa.large_string())
    _write(tmp_path / "a", train=pa.table(columns))
    _write(tmp_path / "b", train=table)
    assert (tmp_path / "a" / "train-00000.parquet").read_bytes() == (
        tmp_path / "b" / "train-00000.parquet"
    ).read_bytes()


def test_bad_rows_are_named(tmp_path):
    table = _table(5)
    labels = table.set_column(table.schema.get_field_index("label"), "label", pa.array([0, 1, 2, 3, None], pa.int32()))
    with pytest.raises(DatasetError, match=r"split 'train' row 3 \(source_id 't:3'\): field 'label' not in \[0, 3\)"):
        _write(tmp_path / "ds", train=labels)
    short = table.set_column(0, "image", pa.array([b"x" * 60] * 4 + [b"x"], pa.binary()))
    with pytest.raises(DatasetError, match="row 4 .*raw image size"):
        _write(tmp_path / "ds", train=short)
    with pytest.raises(DatasetError, match="split 'val' row 0 .*field 'split' is not 'val'"):
        _write(tmp_path / "ds", val=table)
