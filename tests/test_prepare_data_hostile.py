"""Hostile input to jobs/prepare_data.py: fuzzed sources of every format, paths that leave SRC, decompression bombs.

Whatever a source holds, the converter either writes a valid dataset or stops with a ``DatasetError`` that
names a file of the source (and the entry, where there is one); no other exception escapes, and an image
outside the source folder is never read into the shards. Each format gets a sweep (every field of a valid
source set to every hostile value) and a hypothesis fuzzer (random edits, other documents, damaged bytes).
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import pickle
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from prepare_data import main

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.formats import FORMATS
from pretrainlab.data.formats.common import MAX_NUMBERED_CLASSES
from pretrainlab.data.formats.prepare import prepare_dataset
from pretrainlab.data.shards import verify_dataset

FUZZ = settings(max_examples=40, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def encode(size: tuple[int, int], seed: int, fmt: str = "PNG") -> bytes:
    """An RGB image of random pixels, encoded."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


PNG, PNG2, JPEG = encode((6, 5), 1), encode((6, 5), 2), encode((6, 5), 3, "JPEG")
SECRET = encode((6, 5), 99)  # lies outside every source; its bytes must never reach a shard


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def shard_images(out: Path) -> list[bytes]:
    return [image for p in sorted(out.glob("*.parquet")) for image in pq.read_table(p).column("image").to_pylist()]


def convert_or_refuse(fmt: str, src: Path, root: Path, **options: Any) -> dict | None:
    """Runs the converter that prepare_data runs. Returns the manifest, or None when it refused the source with a
    ``DatasetError`` naming a file under ``root``; any other exception fails the test."""
    out = root.parent / "out"
    try:
        manifest = prepare_dataset(fmt, src, out, **options)
    except DatasetError as e:
        assert str(root) in str(e), f"the error names no file of the source: {e}"
        return None
    verify_dataset(out)
    assert SECRET not in shard_images(out)
    assert len(manifest["class_names"]) <= MAX_NUMBERED_CLASSES  # not one per number up to a huge label
    for line in (out / "skipped.jsonl").read_text().splitlines():
        assert json.loads(line)["file"].startswith(str(root)), line
    return manifest


def written(docs: dict[Path, Any]) -> dict[Path, Any]:
    """Writes each JSON document to its path; returns them."""
    for path, doc in docs.items():
        write(path, json.dumps(doc).encode())
    return docs


def sandbox() -> tempfile.TemporaryDirectory:
    """A folder holding ``root/`` (the source) and ``secret.png`` beside it."""
    tmp = tempfile.TemporaryDirectory()
    write(Path(tmp.name) / "secret.png", SECRET)
    (Path(tmp.name) / "root").mkdir()
    return tmp


# ---- the annotation formats: valid sources, then fuzzed annotation files ----


def coco_source(root: Path) -> tuple[Path, dict[Path, Any]]:
    write(root / "train2017/1.png", PNG)
    write(root / "train2017/2.png", PNG2)
    doc = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 5, "width": 6} for i in (1, 2)],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a red square"},
            {"id": 11, "image_id": 2, "caption": "a blue circle"},
            {"id": 12, "image_id": 2, "caption": "two shapes"},
        ],
    }
    return root, written({root / "annotations/captions_train2017.json": doc})


def vqa_source(root: Path) -> tuple[Path, dict[Path, Any]]:
    write(root / "val2014/COCO_val2014_000000000001.jpg", PNG)
    write(root / "val2014/COCO_val2014_000000000002.jpg", JPEG)
    questions = [{"image_id": i, "question": f"What is {i}?", "question_id": 10 * i} for i in (1, 2)]
    answers = [
        {"question_id": 10, "question_type": "what is", "answers": [{"answer": "red"}, {"answer": "red"}]},
        {"question_id": 20, "answers": [{"answer": "blue"}]},
    ]
    return root, written(
        {
            root / "v2_OpenEnded_mscoco_val2014_questions.json": {"data_subtype": "val2014", "questions": questions},
            root / "v2_mscoco_val2014_annotations.json": {"data_subtype": "val2014", "annotations": answers},
        }
    )


def refcoco_source(root: Path) -> tuple[Path, dict[Path, Any]]:
    write(root / "1.png", PNG)
    write(root / "2.png", PNG2)
    instances = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 6, "height": 5} for i in (1, 2)],
        "annotations": [
            {"id": 100, "image_id": 1, "bbox": [1, 1, 3, 2], "category_id": 1},
            {"id": 200, "image_id": 2, "bbox": [0.0, 0.5, 6.0, 4.5], "category_id": 2},
        ],
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}],
    }
    refs = [
        {"ref_id": 1, "ann_id": 100, "image_id": 1, "split": "train", "category_id": 1, "sentences": [{"sent": "a"}]},
        {"ref_id": 2, "ann_id": 200, "image_id": 2, "split": "val", "sentences": [{"sent": "b"}, {"sent": "c"}]},
    ]
    return root, written({root / "instances.json": instances, root / "refs(unc).json": refs})


def karpathy_source(root: Path) -> tuple[Path, dict[Path, Any]]:
    write(root / "val2014/a.png", PNG)
    write(root / "train2014/b.png", PNG2)
    images = [
        {"filepath": "val2014", "filename": "a.png", "split": "restval", "sentences": [{"raw": "A cat."}]},
        {"filepath": "train2014", "filename": "b.png", "split": "test", "sentences": [{"raw": "A dog."}]},
    ]
    return root, written({root / "dataset_coco.json": {"dataset": "coco", "images": images}})


JSON_SOURCES: dict[str, Callable[[Path], tuple[Path, dict[Path, Any]]]] = {
    "coco_captions": coco_source,
    "vqav2": vqa_source,
    "refcoco": refcoco_source,
    "karpathy": karpathy_source,
}


HOSTILE = [None, True, -1, 2**63, 10**400, 0.5, float("nan"), "", "  ", "../../secret.png", "a\x00b.png", "\ud800"]
HOSTILE += ["x" * 300, [], {}]
FUZZED_STRINGS = [
    "../secret.png",
    "../../../secret.png",
    "é",
    "train",
    "testA",
    "1.png",
    "COCO_val2014_000000000001.jpg",
]


def hostile_values(secret: Path) -> list[Any]:
    """Values that break converters: other JSON types, odd numbers, paths out of the source, text that is not."""
    return [*HOSTILE, str(secret)]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """The key path of every value in a JSON document."""
    keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
    return [path for key in keys for path in [(*prefix, key), *_paths(node[key], (*prefix, key))]]


def _edited(doc: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    doc = copy.deepcopy(doc)
    container = doc
    for key in path[:-1]:
        container = container[key]
    if delete:
        del container[path[-1]]
    else:
        container[path[-1]] = value
    return doc


@pytest.mark.slow
@pytest.mark.parametrize("fmt", JSON_SOURCES)
def test_every_annotation_field_takes_every_hostile_value(fmt, tmp_path):
    root = tmp_path / "root"
    write(tmp_path / "secret.png", SECRET)
    src, docs = JSON_SOURCES[fmt](root)
    for file, doc in docs.items():
        skipped = 0  # variants converted with the bad entry skipped: the value reached the entry's checks
        for path in _paths(doc):
            variants = [_edited(doc, path, value) for value in hostile_values(tmp_path / "secret.png")]
            for variant in [*variants, _edited(doc, path, None, delete=True)]:
                write(file, json.dumps(variant).encode())
                manifest = convert_or_refuse(fmt, src, root, skip_bad=True)
                skipped += manifest is not None and manifest["metadata"]["skipped"] > 0
        write(file, json.dumps(doc).encode())
        assert skipped > 10, f"{file.name}: only {skipped} variants were converted with bad entries skipped"


@st.composite
def mutated_json(draw: st.DrawFn, doc: Any, secret: Path) -> bytes:
    """The bytes of ``doc`` with values replaced or removed, or a whole other document, or damaged bytes."""
    text = json.dumps(doc).encode()
    kind = draw(st.sampled_from(["edit"] * 6 + ["other", "truncated", "not utf-8"]))
    if kind == "truncated":
        return text[: draw(st.integers(0, len(text) - 1))]
    if kind == "not utf-8":
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + text[cut:]
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    shapes = st.recursive(
        leaves | st.sampled_from(hostile_values(secret) + FUZZED_STRINGS + [2**31, -(10**30), float("inf")]),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=6,
    )
    if kind == "other":
        return json.dumps(draw(shapes)).encode()
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(doc)
        if not paths:
            break
        delete = not draw(st.integers(0, 4))
        doc = _edited(doc, draw(st.sampled_from(paths)), None if delete else draw(shapes), delete)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("fmt", JSON_SOURCES)
@FUZZ
@given(data=st.data(), skip_bad=st.booleans(), image_size=st.sampled_from([None, None, 4]))
def test_fuzzed_annotation_files_convert_or_are_refused_by_name(fmt, data, skip_bad, image_size):
    with sandbox() as tmp:
        root = Path(tmp) / "root"
        src, docs = JSON_SOURCES[fmt](root)
        target = data.draw(st.sampled_from(sorted(docs)), label="mutated file")
        write(target, data.draw(mutated_json(docs[target], root.parent / "secret.png")))
        convert_or_refuse(fmt, src, root, skip_bad=skip_bad, image_size=image_size)


def test_every_format_is_fuzzed():
    assert set(FORMATS) == {*JSON_SOURCES, "imagefolder", "listfile", "idx", "cifar"}


# ---- list files ----

HOSTILE_LINES = ["img/1.png 99999999999999999999", "img/1.png -3", "img/1.png 1_0", "img/1.png cat", "img/1.png 0 1"]
HOSTILE_LINES += ["img/1.png ١", "img/1.png 0x1", "img/1.png " + "9" * 5000, "../secret.png 0", "img/missing.png 0"]
HOSTILE_LINES += ["img 0", "img/ 1", ". 0", ".. 0", "a\x00b.png 0", "img/1.png\x00 0", "#", "img/1.png", "\u2028 0"]


def list_source(root: Path, lines: list[str], classes: list[str] | None, tail: bytes = b"") -> None:
    write(root / "img/1.png", PNG)
    write(root / "img/2.png", JPEG)
    write(root / "train.txt", "\n".join(lines).encode() + tail)
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes))


@pytest.mark.parametrize("classes", [None, ["a", "b"]])
def test_every_hostile_list_line_converts_or_is_refused_by_name(tmp_path, classes):
    root = tmp_path / "root"
    write(tmp_path / "secret.png", SECRET)
    for line in [*HOSTILE_LINES, f"{tmp_path / 'secret.png'} 1"]:
        list_source(root, ["img/2.png 1", line], classes)
        for skip_bad in (False, True):
            convert_or_refuse("listfile", root, root, skip_bad=skip_bad)


@FUZZ
@given(
    lines=st.lists(st.sampled_from(["img/1.png 0", "img/2.png 1", "# x", ""] + HOSTILE_LINES) | st.text(), max_size=6),
    classes=st.none() | st.lists(st.sampled_from(["a", "b", "a ", "", "é"]), max_size=3),
    tail=st.sampled_from([b"", b"", b"\xff\xfe", b"\x00", b"\r\n\r"]),
    skip_bad=st.booleans(),
)
def test_fuzzed_list_files_convert_or_are_refused_by_name(lines, classes, tail, skip_bad):
    with sandbox() as tmp:
        root = Path(tmp) / "root"
        list_source(root, lines, classes, tail)
        convert_or_refuse("listfile", root, root, skip_bad=skip_bad)


# ---- image folders ----


def damaged(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` cut short, or with one byte changed."""
    cut = st.integers(0, len(data) - 1).map(lambda n: data[:n])
    flip = st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)).map(
        lambda f: data[: f[0]] + bytes([data[f[0]] ^ f[1]]) + data[f[0] + 1 :]
    )
    return cut | flip


FILES = st.sampled_from([PNG, JPEG, b"", b"GIF89a"]) | damaged(PNG) | damaged(JPEG) | st.binary(max_size=40)
NON_UTF8 = os.fsdecode(b"\xff")
TREE_PATHS = st.builds(
    "{}{}/{}".format,
    st.sampled_from(["", "", "train/", "val/", ".hidden/"]),
    st.sampled_from(["a", "b", ".c", NON_UTF8, "d/e"]),
    st.sampled_from(["1.png", "2.jpg", "3.JPEG", "4.txt", ".5.png", f"{NON_UTF8}.png"]),
)


@FUZZ
@given(tree=st.dictionaries(TREE_PATHS, FILES, min_size=1, max_size=6), skip_bad=st.booleans())
def test_fuzzed_image_folders_convert_or_are_refused_by_name(tree, skip_bad):
    with sandbox() as tmp:
        root = Path(tmp) / "root"
        for relative, data in sorted(tree.items()):
            path = root / relative
            if not any(p.is_file() for p in path.parents):  # a name used for both a file and a folder
                write(path, data)
        convert_or_refuse("imagefolder", root, root, skip_bad=skip_bad)


# ---- IDX files ----

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_ITEMSIZE = {code: np.dtype(dtype).itemsize for code, dtype in IDX_DTYPES.items()}


@st.composite
def idx_bytes(draw: st.DrawFn, valid: np.ndarray) -> bytes:
    """An IDX file for ``valid``, or for its shape with another type and random values, or a random header and
    payload; maybe gzipped, maybe cut short."""
    kind = draw(st.sampled_from(["valid", "valid", "retyped", "retyped", "random"]))
    zero, code, dims = 0, 0x08, list(valid.shape)
    if kind != "valid":
        code = draw(st.sampled_from([*IDX_ITEMSIZE, 0x07]))
    if kind == "random":
        zero = draw(st.sampled_from([0, 0, 1, 0xFFFF]))
        dims = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 2**32 - 1]), max_size=4))
    size = int(np.prod(dims, dtype=object)) * IDX_ITEMSIZE.get(code, 1)
    payload = draw(st.binary(min_size=size, max_size=size) if size <= 256 else st.binary(max_size=64))
    if kind == "valid":
        payload = valid.astype(np.uint8).tobytes()
    data = struct.pack(">HBB", zero, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload
    data = data[: draw(st.sampled_from([len(data), len(data), len(data), 2, len(data) - 1]))]
    if draw(st.booleans()):
        data = gzip.compress(data, mtime=0)[: draw(st.sampled_from([None, None, 12]))]
    return data


@FUZZ
@given(data=st.data(), skip_bad=st.booleans())
def test_fuzzed_idx_files_convert_or_are_refused_by_name(data, skip_bad):
    with sandbox() as tmp:
        root = Path(tmp) / "root"
        images = data.draw(idx_bytes(np.arange(3 * 4 * 2).reshape(3, 4, 2)), label="images")
        labels = data.draw(idx_bytes(np.array([0, 2, 1])), label="labels")
        for name, content in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
            write(root / (name + ".gz" if content.startswith(b"\x1f\x8b") else name), content)
        convert_or_refuse("idx", root, root, skip_bad=skip_bad)


def write_idx(path: Path, code: int, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    write(path, header + array.astype(IDX_DTYPES[code]).tobytes())


@pytest.mark.parametrize("code", IDX_DTYPES)
def test_idx_labels_of_every_type_and_extreme_value(tmp_path, code):
    root = tmp_path / "root"
    write_idx(root / "train-images-idx3-ubyte", 0x08, np.zeros((3, 4, 2)))
    dtype = np.dtype(IDX_DTYPES[code])
    top = np.iinfo(dtype).max if dtype.kind in "iu" else 1e30
    for labels in ([0, 2, 1], [0, -1, 1], [0, top, 1], [top] * 3, [0.5, 1, 2]):
        write_idx(root / "train-labels-idx1-ubyte", code, np.array(labels))
        for skip_bad in (False, True):
            convert_or_refuse("idx", root, root, skip_bad=skip_bad)


# ---- CIFAR batches ----

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
HOSTILE_ARRAYS = [np.zeros((), np.uint8), np.zeros(2, np.int64), np.zeros((2, 3072), np.float32)]
HOSTILE_ARRAYS += [np.zeros((2, 3071), np.uint8), np.zeros((0, 3072), np.uint8), np.zeros((2, 32, 32, 3), np.uint8)]
HOSTILE_ARRAYS += [np.array([0, 99]), np.array([[0], [1]]), np.array([0.0, 1.0]), np.array(["a", "b"])]
HOSTILE_CIFAR = [None, "x", b"\xff", 7, [], [b"\xff\xfe", b"b"], ["a", "a"], ["a", 1], [2**70, -1], [True, None]]
HOSTILE_CIFAR += [["\ud800", "b"], [[1], {}], *HOSTILE_ARRAYS]
DELETE = object()


def cifar_files() -> dict[str, dict[Any, Any]]:
    files: dict[str, dict[Any, Any]] = {"batches.meta": {"label_names": [f"class{i}" for i in range(10)]}}
    return files | {
        name: {"data": np.full((2, 3072), i, np.uint8), "labels": [i, 9]} for i, name in enumerate(CIFAR_BATCHES)
    }


def test_every_cifar_field_takes_every_hostile_value(tmp_path):
    root = tmp_path / "root"
    files = cifar_files()
    for name, batch in files.items():
        write(root / name, pickle.dumps(batch))
    for name, key in (("batches.meta", "label_names"), ("test_batch", "data"), ("test_batch", "labels")):
        for value in [*HOSTILE_CIFAR, DELETE]:
            edited = {k: v for k, v in files[name].items() if k != key} | ({} if value is DELETE else {key: value})
            write(root / name, pickle.dumps(edited))
            convert_or_refuse("cifar", root, root, skip_bad=True)
        write(root / name, pickle.dumps(files[name]))


@st.composite
def cifar_file(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    """A pickle of ``valid`` with a key replaced or removed, or a damaged or foreign pickle."""
    kind = draw(st.sampled_from(["valid", "edit", "edit", "edit", "cut", "bytes", "list"]))
    if kind == "bytes":
        return draw(st.binary(max_size=30))
    if kind == "list":
        return pickle.dumps([1, 2, 3])
    batch = dict(valid)
    if kind == "edit":
        key = draw(st.sampled_from([*batch, b"data"]))
        if draw(st.booleans()):
            batch.pop(key, None)
        else:
            labels = st.lists(st.integers(-2, 12) | st.sampled_from([2**70, 1.0, "1", None]), max_size=3)
            batch[key] = draw(st.sampled_from(HOSTILE_CIFAR) | labels)
    data = pickle.dumps(batch, protocol=draw(st.sampled_from([2, 4])))
    return data[: draw(st.integers(0, len(data) - 1))] if kind == "cut" else data


@FUZZ
@given(data=st.data(), skip_bad=st.booleans())
def test_fuzzed_cifar_batches_convert_or_are_refused_by_name(data, skip_bad):
    with sandbox() as tmp:
        root = Path(tmp) / "root"
        files = cifar_files()
        target = data.draw(st.sampled_from(sorted(files)), label="mutated file")
        for name, valid in files.items():
            write(root / name, data.draw(cifar_file(valid), label=name) if name == target else pickle.dumps(valid))
        convert_or_refuse("cifar", root, root, skip_bad=skip_bad)


# ---- paths that leave the source ----


def with_first_entry(fmt: str, root: Path, fields: dict[str, str]) -> tuple[Path, Path, str, str]:
    """A two-entry source whose first entry's path fields are ``fields``.

    Returns:
        SRC, the file that holds the first entry, its key, and the field errors name.
    """
    if fmt == "listfile":
        list_source(root, [f"{fields['path']} 0", "img/2.png 1"], None)
        return root / "train.txt", root / "train.txt", "line 1", ""
    src, docs = JSON_SOURCES[fmt](root)
    file, entry_file, key, field, record = {
        "coco_captions": ("annotations/captions_train2017.json", None, "image_id 1", "'file_name'", "images"),
        "refcoco": ("instances.json", "refs(unc).json", "image_id 1", "'file_name'", "images"),
        "karpathy": ("dataset_coco.json", None, "images[0]", "'filepath' + 'filename'", "images"),
        "vqav2": ("v2_OpenEnded_mscoco_val2014_questions.json", None, "image_id 1", "'image_id'", "questions"),
    }[fmt]
    docs[root / file][record][0].update(fields)
    written(docs)
    return src, root / (entry_file or file), key, field


ESCAPES = [
    ("coco_captions", {"file_name": "../../secret.png"}, None),
    ("coco_captions", {"file_name": "{secret}"}, None),
    ("coco_captions", {"file_name": "link.png"}, ("train2017/link.png", "secret.png")),
    ("coco_captions", {"file_name": "linked/secret.png"}, ("train2017/linked", "elsewhere")),
    ("refcoco", {"file_name": "../secret.png"}, None),
    ("refcoco", {"file_name": "{secret}"}, None),
    ("refcoco", {"file_name": "link.png"}, ("link.png", "secret.png")),
    ("refcoco", {"file_name": "linked/secret.png"}, ("linked", "elsewhere")),
    ("karpathy", {"filename": "../../secret.png"}, None),
    ("karpathy", {"filepath": "..", "filename": "secret.png"}, None),
    ("karpathy", {"filename": "{secret}"}, None),
    ("karpathy", {"filepath": "{tmp}", "filename": "secret.png"}, None),
    ("karpathy", {"filename": "link.png"}, ("val2014/link.png", "secret.png")),
    ("karpathy", {"filepath": "linked", "filename": "secret.png"}, ("linked", "elsewhere")),
    ("vqav2", {}, ("val2014/COCO_val2014_000000000001.jpg", "secret.png")),
    ("listfile", {"path": "../secret.png"}, None),
    ("listfile", {"path": "{secret}"}, None),
    ("listfile", {"path": "img/link.png"}, ("img/link.png", "secret.png")),
    ("listfile", {"path": "linked/secret.png"}, ("linked", "elsewhere")),
]


@pytest.mark.parametrize(("fmt", "fields", "link"), ESCAPES)
def test_paths_that_leave_the_source_are_refused_and_never_read(tmp_path, capsys, fmt, fields, link):
    root, out = tmp_path / "root", tmp_path / "out"
    write(tmp_path / "secret.png", SECRET)
    write(tmp_path / "elsewhere/secret.png", SECRET)
    fields = {k: v.format(secret=tmp_path / "secret.png", tmp=tmp_path) for k, v in fields.items()}
    src, file, key, field = with_first_entry(fmt, root, fields)
    if link:
        (root / link[0]).unlink(missing_ok=True)
        (root / link[0]).parent.mkdir(parents=True, exist_ok=True)
        (root / link[0]).symlink_to(tmp_path / link[1])

    assert main([fmt, str(src), str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"prepare_data: {file} ({key}): path "), error
    assert f"escapes the source folder {root}" in error and field in error
    assert ("through a symbolic link" in error) == bool(link)

    assert main([fmt, str(src), str(out), "--skip-bad"]) == 0
    assert len(shard_images(out)) == 1 and SECRET not in shard_images(out)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["file"], s["entry"]) for s in skipped] == [(str(file), key)]


@pytest.mark.parametrize("link", ["a/link.png", "linked"])
def test_image_folder_links_out_of_the_source_are_refused_and_never_read(tmp_path, capsys, link):
    root, out = tmp_path / "root", tmp_path / "out"
    write(tmp_path / "secret.png", SECRET)
    write(tmp_path / "elsewhere/secret.png", SECRET)
    write(root / "a/1.png", PNG)
    write(root / "b/2.png", PNG2)
    (root / link).symlink_to(tmp_path / ("secret.png" if link.endswith(".png") else "elsewhere"))
    entry = root / link if link.endswith(".png") else root / link / "secret.png"

    assert main(["imagefolder", str(root), str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"prepare_data: {entry}: path "), error
    assert f"escapes the source folder {root} through a symbolic link" in error
    assert main(["imagefolder", str(root), str(out), "--skip-bad"]) == 0
    assert sorted(shard_images(out)) == sorted([PNG, PNG2])
    assert [json.loads(line)["file"] for line in (out / "skipped.jsonl").read_text().splitlines()] == [str(entry)]


def test_links_that_stay_inside_the_source_are_followed(tmp_path):
    root = tmp_path / "root"
    write(root / "store/1.png", PNG)
    write(root / "store/2.png", PNG2)
    (root / "train2017").symlink_to(root / "store")
    (root / "train.txt").write_text("train2017/1.png 0\ntrain2017/../store/2.png 1\n")
    (tmp_path / "linked_root").symlink_to(root)  # SRC itself may be a link
    converted = convert_or_refuse("listfile", tmp_path / "linked_root" / "train.txt", tmp_path / "linked_root")
    assert converted is not None and sorted(shard_images(tmp_path / "out")) == sorted([PNG, PNG2])


def test_vqav2_image_ids_and_subtypes_cannot_name_paths(tmp_path):
    root = tmp_path / "root"
    src, file, _, _ = with_first_entry("vqav2", root, {"image_id": "../../secret.png"})
    with pytest.raises(DatasetError, match=rf"{file} \(questions\[0\]\): 'image_id' must be int, got '../../secr"):
        prepare_dataset("vqav2", src, tmp_path / "out")
    doc = json.loads(file.read_text()) | {"data_subtype": "../val2014"}
    file.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=rf"{file}: expected a top-level 'data_subtype' .* got '../val2014'"):
        prepare_dataset("vqav2", src, tmp_path / "out")


# ---- decompression bombs ----


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares ``width`` x ``height`` RGB pixels."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is rewritten to declare ``width`` x ``height`` pixels."""
    sof = JPEG.index(b"\xff\xc0")
    return JPEG[: sof + 5] + struct.pack(">HH", height, width) + JPEG[sof + 9 :]


BOMBS = {
    "png-10^10-pixels": png_declaring(100_000, 100_000),  # beyond twice Pillow's limit: refused on open
    "png-10^8-pixels": png_declaring(10_000, 10_000),  # beyond the limit, under twice it: Pillow only warns
    "jpeg-4x10^9-pixels": jpeg_declaring(65_000, 65_000),
}


@pytest.mark.parametrize("bomb", BOMBS)
@pytest.mark.parametrize("fmt", ["imagefolder", "coco_captions"])
def test_decompression_bombs_are_named_bad_entries(tmp_path, capsys, fmt, bomb):
    root, out = tmp_path / "root", tmp_path / "out"
    if fmt == "imagefolder":
        write(root / "a/1.png", PNG)
        write(root / "a/2.png", BOMBS[bomb])
        src, where = root, f"{root / 'a/2.png'}: "
    else:
        src, docs = coco_source(root)
        (file,) = docs
        write(root / "train2017/2.png", BOMBS[bomb])
        where = f"{file} (image_id 2): image {root / 'train2017/2.png'}: "
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's default limit applies
    assert main([fmt, str(src), str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"prepare_data: {where}refused as a decompression bomb"), error
    assert main([fmt, str(src), str(out), "--skip-bad", "--image-size", "4"]) == 0
    assert len(shard_images(out)) == 1
