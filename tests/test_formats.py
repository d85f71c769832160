"""Classification formats (ImageFolder, list files, IDX, CIFAR) and the prepare_data job, on fixtures built here."""

import gzip
import hashlib
import io
import json
import pickle
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from prepare_data import main

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.formats.prepare import convert, prepare_dataset
from pretrainlab.data.shards import load_manifest, shard_paths, verify_dataset


def save_image(path, size=(6, 5), mode="RGB", value=0, fmt=None) -> bytes:
    """Writes a small image (width, height) and returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(size[0] * size[1] * len(mode)).reshape(size[1], size[0], len(mode)) + value) % 256
    Image.fromarray(pixels.astype(np.uint8).squeeze(-1) if mode == "L" else pixels.astype(np.uint8), mode).save(
        path, format=fmt
    )
    return path.read_bytes()


def read_split(out, split) -> list[dict]:
    rows = pa.concat_tables(pq.read_table(p) for p in shard_paths(out, split)).to_pylist()
    return sorted(rows, key=lambda row: row["source_id"])


def shard_hashes(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.parquet"))}


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "folder"
    files = {
        "train/cat/1.png": save_image(src / "train/cat/1.png"),
        "train/cat/2.jpg": save_image(src / "train/cat/2.jpg", mode="L", value=9),
        "train/dog/3.png": save_image(src / "train/dog/3.png", size=(4, 7), mode="RGBA"),
        "val/dog/4.png": save_image(src / "val/dog/4.png", value=3),
    }
    (src / "train/.hidden").write_text("ignored")
    return src, files


def test_imagefolder_keeps_bytes_classes_and_splits(tmp_path, folder):
    src, files = folder
    manifest = prepare_dataset("imagefolder", src, tmp_path / "out")
    assert manifest["class_names"] == ["cat", "dog"] and manifest["task"] == "classification"
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 3, "val": 1}
    rows = read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "val")
    assert [r["source_id"] for r in rows] == list(files)
    assert [r["label"] for r in rows] == [0, 0, 1, 1]
    assert [r["image"] for r in rows] == list(files.values())
    assert [(r["image_format"], r["height"], r["width"], r["channels"]) for r in rows] == [
        ("png", 5, 6, 3),
        ("jpeg", 5, 6, 1),
        ("png", 7, 4, 4),
        ("png", 5, 6, 3),
    ]
    assert (tmp_path / "out/skipped.jsonl").read_text() == ""


def test_flat_imagefolder_is_one_split_named_by_split_option(tmp_path):
    save_image(tmp_path / "src/b/x.png")
    save_image(tmp_path / "src/a/y.png")
    converted = convert("imagefolder", tmp_path / "src")
    assert list(converted.splits) == ["train"] and converted.class_names == ["a", "b"]
    assert list(convert("imagefolder", tmp_path / "src", split="unlabelled").splits) == ["unlabelled"]


def test_split_option_refused_for_a_source_with_several_splits(folder):
    with pytest.raises(DatasetError, match="holds splits train, val; --split only names"):
        convert("imagefolder", folder[0], split="train")


def test_truncated_image_stops_or_is_skipped_and_listed(tmp_path, folder):
    src, _ = folder
    bad = src / "train/dog/3.png"
    bad.write_bytes(bad.read_bytes()[:-30])
    with pytest.raises(DatasetError, match=r"3\.png: not a complete PNG or JPEG image.*--skip-bad"):
        prepare_dataset("imagefolder", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    (src / "val/dog/notes.txt").write_text("not an image")

    manifest = prepare_dataset("imagefolder", src, tmp_path / "out", skip_bad=True)
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 2, "val": 1}
    assert manifest["metadata"]["skipped"] == 2
    skipped = [json.loads(line) for line in (tmp_path / "out/skipped.jsonl").read_text().splitlines()]
    assert [s["file"] for s in skipped] == [str(src / "val/dog/notes.txt"), str(bad)]
    assert "not a .png/.jpg/.jpeg file" in skipped[0]["reason"] and "truncated" in skipped[1]["reason"]


def test_decompression_bomb_is_a_bad_entry(tmp_path, monkeypatch):
    save_image(tmp_path / "src/a/big.png", size=(12, 12))
    save_image(tmp_path / "src/a/huge.png", size=(30, 30))
    save_image(tmp_path / "src/a/small.png", size=(10, 10))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 px warns, 900 px errors in Pillow
    converted = convert("imagefolder", tmp_path / "src", skip_bad=True)
    assert converted.splits["train"].column("source_id").to_pylist() == ["a/small.png"]
    assert [s["reason"].split(" (")[0] for s in converted.skipped] == ["refused as a decompression bomb"] * 2


def test_listfile_labels_unlabelled_lines_and_classes_file(tmp_path):
    src = tmp_path / "lists"
    one, two = save_image(src / "img/1.png"), save_image(src / "img/2.png", value=5)
    (src / "classes.txt").write_text("zero\none\n")
    (src / "train.txt").write_text("# path label\nimg/1.png 1\n\nimg/2.png 0\n")
    (src / "unlabelled.txt").write_text("img/2.png\n")
    converted = convert("listfile", src)
    assert converted.class_names == ["zero", "one"]
    train = sorted(converted.splits["train"].to_pylist(), key=lambda r: r["label"])
    assert [(r["image"], r["label"]) for r in train] == [(two, 0), (one, 1)]
    assert converted.splits["unlabelled"].column("label").to_pylist() == [None]

    single = convert("listfile", src / "train.txt", split="val")  # one file: --split names it
    assert list(single.splits) == ["val"]


def test_listfile_without_classes_file_counts_to_the_largest_label(tmp_path):
    save_image(tmp_path / "x.png")
    (tmp_path / "list.txt").write_text("x.png 3\n")
    assert convert("listfile", tmp_path / "list.txt").class_names == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("../outside.png 0", r"line 2\): path '../outside.png' escapes the source folder"),
        ("/etc/passwd 0", r"line 2\): path '/etc/passwd' escapes"),
        ("img/1.png 7", r"line 2\): label 7 not in \[0, 2\) \(2 classes from .*classes.txt\)"),
        ("img/1.png -1", r"line 2\): label -1 not in \[0, 2\)"),
        ("img/1.png cat", r"line 2\): label 'cat' is not an integer"),
        ("img/missing.png 0", r"line 2\): image .*missing.png: file not found"),
    ],
)
def test_listfile_bad_lines_name_file_and_line(tmp_path, line, problem):
    src = tmp_path / "lists"
    save_image(src / "img/1.png")
    save_image(tmp_path / "outside.png")
    (src / "classes.txt").write_text("a\nb\n")
    (src / "train.txt").write_text(f"img/1.png 0\n{line}\n")
    with pytest.raises(DatasetError, match=f"train.txt \\({problem}"):
        convert("listfile", src / "train.txt")
    converted = convert("listfile", src / "train.txt", skip_bad=True)
    assert converted.splits["train"].num_rows == 1
    assert [(s["entry"], s["file"]) for s in converted.skipped] == [("line 2", str(src / "train.txt"))]


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_pairs_become_raw_train_and_test(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 1, 0]))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:2])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([2, 2]))
    converted = convert("idx", tmp_path)
    assert converted.class_names == ["0", "1", "2"]
    train = sorted(converted.splits["train"].to_pylist(), key=lambda r: r["source_id"])
    assert [r["label"] for r in train] == [0, 1, 2, 1, 0]
    assert [np.frombuffer(r["image"], np.uint8).reshape(4, 3).tolist() for r in train] == images.tolist()
    assert {(r["image_format"], r["height"], r["width"], r["channels"]) for r in train} == {("raw", 4, 3, 1)}
    assert converted.splits["test"].num_rows == 2

    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.gz \(index 0\): label 2 not in \[0, 2\)"):
        convert("idx", tmp_path)
    assert convert("idx", tmp_path, skip_bad=True).splits["train"].column("label").to_pylist().count(2) == 0


def pickle_cifar(path, data: dict) -> None:
    path.write_bytes(pickle.dumps(data, protocol=4))  # numpy arrays via numpy._core.multiarray._reconstruct


@pytest.fixture
def cifar10(tmp_path):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    rng = np.random.default_rng(0)
    pickle_cifar(src / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 2})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        pickle_cifar(src / name, {"batch_label": name, "labels": [1, 9], "data": pixels, "filenames": ["a", "b"]})
    return src


def test_cifar10_batches_become_raw_rgb(cifar10):
    converted = convert("cifar", cifar10)
    assert converted.class_names[9] == "class9" and converted.metadata["layout"] == "CIFAR-10"
    assert {s: t.num_rows for s, t in converted.splits.items()} == {"train": 10, "test": 2}
    row = next(r for r in converted.splits["test"].to_pylist() if r["source_id"] == "test_batch:1")
    with open(cifar10 / "test_batch", "rb") as f:
        planes = pickle.load(f)["data"][1].reshape(3, 32, 32)
    pixels = np.frombuffer(row["image"], np.uint8).reshape(32, 32, 3)
    np.testing.assert_array_equal(pixels, planes.transpose(1, 2, 0))
    assert (row["label"], row["channels"], row["image_format"]) == (9, 3, "raw")


def test_cifar100_uses_fine_labels(tmp_path):
    src = tmp_path / "cifar-100-python"
    src.mkdir()
    pickle_cifar(src / "meta", {"fine_label_names": ["apple", "bee", "cup"], "coarse_label_names": ["x"]})
    for name in ("train", "test"):
        data = np.zeros((3, 3072), np.uint8)
        pickle_cifar(src / name, {"data": data, "fine_labels": [2, 0, 1], "coarse_labels": [0, 0, 0]})
    converted = convert("cifar", src)
    assert converted.class_names == ["apple", "bee", "cup"]
    assert sorted(converted.splits["train"].column("label").to_pylist()) == [0, 1, 2]


def test_malicious_pickle_is_refused_without_running_it(cifar10, tmp_path):
    marker = tmp_path / "pwned"
    (cifar10 / "data_batch_3").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(DatasetError, match=r"data_batch_3: refusing to unpickle global os.system"):
        convert("cifar", cifar10)
    assert not marker.exists()


def test_cifar_label_out_of_range_is_named(cifar10):
    pickle_cifar(cifar10 / "test_batch", {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})
    with pytest.raises(DatasetError, match=r"test_batch \(index 1\): label 10 not in \[0, 10\)"):
        convert("cifar", cifar10)
    assert convert("cifar", cifar10, skip_bad=True).splits["test"].num_rows == 1


def test_job_twice_gives_identical_shards_and_prints_counts(tmp_path, folder, capsys):
    src, _ = folder
    assert main(["imagefolder", str(src), str(tmp_path / "a"), "--seed", "3", "--shard-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "train: 3 rows in 2 shards" in printed and "val: 1 rows in 1 shards" in printed
    assert f"manifest: {tmp_path / 'a' / 'manifest.json'}" in printed and "skipped: 0 bad entries" in printed
    assert main(["imagefolder", str(src), str(tmp_path / "b"), "--seed", "3", "--shard-size", "2"]) == 0
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b") and len(shard_hashes(tmp_path / "a")) == 3
    verify_dataset(tmp_path / "b")


def test_job_resizes_to_png_with_the_shorter_side(tmp_path, folder):
    assert main(["imagefolder", str(folder[0]), str(tmp_path / "out"), "--image-size", "10"]) == 0
    rows = read_split(tmp_path / "out", "train")
    assert [(r["image_format"], r["height"], r["width"]) for r in rows] == [
        ("png", 10, 12),
        ("png", 10, 12),
        ("png", 18, 10),
    ]
    with Image.open(io.BytesIO(rows[1]["image"])) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "L", (12, 10))
    assert load_manifest(tmp_path / "out")["metadata"]["image_size"] == 10


def test_job_exits_2_with_the_message_on_bad_input(tmp_path, folder, capsys):
    (folder[0] / "train/cat/1.png").write_bytes(b"\x89PNG not really")
    assert main(["imagefolder", str(folder[0]), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"prepare_data: {folder[0] / 'train/cat/1.png'}: not a PNG or JPEG image " + (
        "(pass --skip-bad to skip bad entries)"
    )
    assert "Traceback" not in err
    assert main(["cifar", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "neither batches.meta" in capsys.readouterr().err
    assert main(["imagefolder", str(folder[0]), str(tmp_path / "out"), "--skip-bad"]) == 0
    assert load_manifest(tmp_path / "out")["metadata"]["skipped"] == 1
