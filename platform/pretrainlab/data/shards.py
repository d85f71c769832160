"""Parquet shards and their manifest: the on-disk format every dataset is converted to.

A dataset is a folder, on local disk or object storage (``s3://bucket/path``, see
:mod:`pretrainlab.storage`)::

    manifest.json
    train-00000.parquet  train-00001.parquet  ...  val-00000.parquet  ...

Each shard holds at most ``shard_size`` rows of one split in its task's schema
(``SCHEMAS``). ``manifest.json`` lists every shard with its row count and sha256, so a
reader can check a dataset before training on it. Writing is deterministic (the same
tables give byte-identical files) and atomic (a dataset folder is either the old one
or the complete new one).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pretrainlab.data.errors import DatasetError
from pretrainlab.paths import is_uri
from pretrainlab.storage import join, open_input

SCHEMA_VERSION = 2
"""Written into every manifest. Version 2 added ``also_true`` to retrieval rows; see ``READABLE_TASKS``."""
MANIFEST_FILE = "manifest.json"
IMAGE_FORMATS = ("raw", "png", "jpeg")

IMAGE_FIELDS = [
    # Encoded PNG/JPEG bytes as-is, or raw uint8 pixels H x W x C row-major.
    pa.field("image", pa.binary(), nullable=False),
    pa.field("image_format", pa.string(), nullable=False),  # one of IMAGE_FORMATS
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("channels", pa.int32(), nullable=False),
]
ROW_FIELDS = [
    pa.field("split", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),  # e.g. "train-images-idx3-ubyte.gz:123"
]
_TEXTS = pa.list_(pa.string())

CLASSIFICATION_SCHEMA = pa.schema([*IMAGE_FIELDS, pa.field("label", pa.int32(), nullable=True), *ROW_FIELDS])
"""One image per row; ``label`` null means unlabelled."""

CAPTION_SCHEMA = pa.schema([*IMAGE_FIELDS, pa.field("captions", _TEXTS, nullable=False), *ROW_FIELDS])
"""One image per row with all its reference captions."""

RETRIEVAL_SCHEMA = pa.schema(
    [
        *IMAGE_FIELDS,
        pa.field("captions", _TEXTS, nullable=False),
        pa.field("negatives", _TEXTS, nullable=False),  # hard-negative captions; may be empty
        pa.field("also_true", _TEXTS, nullable=False),  # other images' captions or negatives true of this one too
        *ROW_FIELDS,
    ]
)
"""One image per row with its captions, (possibly no) hard-negative captions, and (possibly no) captions or
hard negatives of other images of the split that describe this image too (generated sets know them; retrieval
counts them as matches)."""

VQA_QUESTION = pa.struct(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answers", _TEXTS, nullable=False),  # every annotator's answer, repeats kept (VQAv2 soft score)
        pa.field("question_type", pa.string(), nullable=True),
    ]
)
VQA_SCHEMA = pa.schema([*IMAGE_FIELDS, pa.field("questions", pa.list_(VQA_QUESTION), nullable=False), *ROW_FIELDS])
"""One image per row with all its questions and their answers."""

GROUNDING_REF = pa.struct(
    [
        pa.field("ref_id", pa.string(), nullable=False),
        pa.field("expressions", _TEXTS, nullable=False),  # every expression that names this one object
        pa.field("box", pa.list_(pa.float32(), 4), nullable=False),  # x1, y1, x2, y2 in pixels
        pa.field("category", pa.string(), nullable=True),
    ]
)
GROUNDING_SCHEMA = pa.schema([*IMAGE_FIELDS, pa.field("refs", pa.list_(GROUNDING_REF), nullable=False), *ROW_FIELDS])
"""One image per row with its referred objects: expressions and pixel boxes."""

SCHEMAS: dict[str, pa.Schema] = {
    "classification": CLASSIFICATION_SCHEMA,
    "caption": CAPTION_SCHEMA,
    "retrieval": RETRIEVAL_SCHEMA,
    "vqa": VQA_SCHEMA,
    "grounding": GROUNDING_SCHEMA,
}

READABLE_TASKS: dict[int, frozenset[str]] = {1: frozenset(SCHEMAS) - {"retrieval"}, 2: frozenset(SCHEMAS)}
"""Schema version -> the tasks whose datasets of that version this version reads (their rows are unchanged)."""

_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
_TYPE_FAMILIES = (
    pa.types.is_integer,
    pa.types.is_floating,
    lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t),
    lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t),
)
_LIST_TYPES = (
    pa.types.is_list,
    pa.types.is_large_list,
    pa.types.is_fixed_size_list,
    pa.types.is_list_view,
    pa.types.is_large_list_view,
)


def raw_classification_table(
    images: np.ndarray, labels: np.ndarray | None, *, split: str, source_ids: Sequence[str]
) -> pa.Table:
    """Builds a ``CLASSIFICATION_SCHEMA`` table of raw (unencoded) images.

    Args:
        images: uint8 array N x H x W x C.
        labels: integer class ids, shape (N,), or None for an unlabelled split.
        split: the value of every row's ``split`` field.
        source_ids: N strings saying where each sample came from.

    Returns:
        The table, ready for ``write_dataset``.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DatasetError(f"split {split!r}: images must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if len(source_ids) != n or (labels is not None and len(labels) != n):
        raise DatasetError(f"split {split!r}: {n} images, but source_ids or labels have another length")
    label_field = CLASSIFICATION_SCHEMA.field("label")
    return pa.Table.from_arrays(
        [
            pa.array([image.tobytes() for image in images], pa.binary()),
            pa.array(["raw"] * n, pa.string()),
            pa.array(np.full(n, h, np.int32)),
            pa.array(np.full(n, w, np.int32)),
            pa.array(np.full(n, c, np.int32)),
            pa.nulls(n, pa.int32())
            if labels is None
            else _cast(pa.chunked_array([pa.array(np.asarray(labels))]), label_field, f"split {split!r}"),
            pa.array([split] * n, pa.string()),
            pa.array(source_ids, pa.string()),
        ],
        schema=CLASSIFICATION_SCHEMA,
    )


def write_dataset(
    out_dir: str | os.PathLike,
    splits: Mapping[str, pa.Table],
    *,
    name: str,
    task: str,
    class_names: list[str],
    shard_size: int = 20000,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes splits as Parquet shards plus ``manifest.json``, atomically.

    Everything is written to a temporary sibling folder, which then replaces
    ``out_dir``; an existing dataset there is removed only after the new one is
    complete. A non-empty folder without a manifest is never replaced.

    Args:
        out_dir: the dataset folder.
        splits: split name (letters, digits, ``_``) -> non-empty table in the
            task's schema (columns in any order).
        name: dataset name recorded in the manifest.
        task: task family, a key of ``SCHEMAS``.
        class_names: label id -> name; non-null labels must index it.
        shard_size: most rows per shard file.
        metadata: JSON-serialisable facts to record (seed, source, ...).

    Returns:
        The manifest, as written.

    Raises:
        DatasetError: a table does not match the schema (naming split, field and
            row), or an argument is invalid.
    """
    if task not in SCHEMAS:
        raise DatasetError(f"unknown task {task!r}; known tasks: {', '.join(SCHEMAS)}")
    if shard_size < 1:
        raise DatasetError(f"shard_size must be >= 1, got {shard_size}")
    if not splits:
        raise DatasetError(f"dataset {name!r} has no splits")
    if len(set(class_names)) != len(class_names) or not all(isinstance(c, str) for c in class_names):
        raise DatasetError(f"class_names must be distinct strings, got {class_names!r}")
    try:
        metadata = json.loads(json.dumps(metadata or {}))
    except (TypeError, ValueError) as e:
        raise DatasetError(f"metadata is not JSON-serialisable: {e}") from None
    tables = {split: check_table(t, SCHEMAS[task], split, len(class_names)) for split, t in splits.items()}

    out = Path(out_dir)
    if out.exists() and not (out / MANIFEST_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: exists and is not a dataset (no {MANIFEST_FILE}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "task": task,
            "class_names": list(class_names),
            "splits": {split: _write_split(tmp, split, table, shard_size) for split, table in tables.items()},
            "metadata": metadata,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a dataset's ``manifest.json``.

    Args:
        dataset_dir: the dataset folder.

    Returns:
        The manifest.

    Raises:
        DatasetError: naming the manifest path, when it is missing, not JSON, of
            another schema version, or malformed.
    """
    path = join(dataset_dir, MANIFEST_FILE)
    try:
        with open_input(path) as file:
            manifest = json.loads(file.read().decode("utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found; convert the dataset first (jobs/prepare_data.py)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    task = manifest.get("task") if isinstance(manifest, dict) else None
    readable = READABLE_TASKS.get(version, frozenset()) if isinstance(version, int) else frozenset()
    if task not in readable:
        raise DatasetError(
            f"{path}: a {task!r} dataset of schema_version {version!r}, this PretrainLab reads version "
            f"{SCHEMA_VERSION} (and version 1 of tasks other than retrieval); convert the dataset again"
        )
    _check_manifest(manifest, path)
    return manifest


def shard_paths(dataset_dir: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths (or URIs) of one split's shards, in order, from the manifest.

    Raises:
        DatasetError: no valid manifest, or an unknown split (listing the known ones).
    """
    manifest = load_manifest(dataset_dir)
    root = dataset_dir if is_uri(os.fspath(dataset_dir)) else Path(dataset_dir).absolute()
    return [join(root, shard["file"]) for shard in _split_entry(manifest, split, dataset_dir)["shards"]]


def verify_dataset(dataset_dir: str | os.PathLike, splits: str | Iterable[str] | None = None) -> dict[str, Any]:
    """Checks shards against the manifest: presence, sha256, Parquet footer, row count.

    Args:
        dataset_dir: the dataset folder.
        splits: a split name or names to check; None checks every split.

    Returns:
        The manifest.

    Raises:
        DatasetError: naming the shard file that is missing, changed, unreadable or
            holds another number of rows than the manifest says.
    """
    manifest = load_manifest(dataset_dir)
    names = manifest["splits"] if splits is None else [splits] if isinstance(splits, str) else list(splits)
    for split in names:
        for shard in _split_entry(manifest, split, dataset_dir)["shards"]:
            verify_shard(join(dataset_dir, shard["file"]), shard)
    return manifest


def check_table(table: pa.Table, schema: pa.Schema, split: str, num_classes: int) -> pa.Table:
    """Returns ``table`` in ``schema``'s column order, after checking fields and rows."""
    where = f"split {split!r}"
    if not _SPLIT_NAME.fullmatch(split):
        raise DatasetError(f"{where}: split names may only hold letters, digits and '_'")
    if not isinstance(table, pa.Table):
        raise DatasetError(f"{where}: expected a pyarrow.Table, got {type(table).__name__}")
    if table.num_rows == 0:
        raise DatasetError(f"{where}: no rows")
    names = table.column_names
    missing = [f.name for f in schema if f.name not in names]
    unexpected = sorted({n for n in names if n not in schema.names or names.count(n) > 1})
    if missing or unexpected:
        raise DatasetError(f"{where}: missing fields {missing}, unexpected or repeated fields {unexpected}")
    columns = [_cast(table.column(field.name), field, where) for field in schema]
    for field, column in zip(schema, columns, strict=True):
        if not field.nullable:
            nulls = column.is_null().to_numpy(zero_copy_only=False)
            _fail_rows(table, split, nulls, f"field {field.name!r} is null")
    table = pa.Table.from_arrays(columns, schema=schema)

    _fail_rows(table, split, _np(table, "split") != split, f"field 'split' is not {split!r}")
    if "label" in schema.names:
        column = table.column("label")
        labels, labelled = column.fill_null(0).to_numpy(), column.is_valid().to_numpy(zero_copy_only=False)
        out_of_range = labelled & ((labels < 0) | (labels >= num_classes))
        _fail_rows(table, split, out_of_range, f"field 'label' not in [0, {num_classes})")
    if "image_format" in schema.names:
        formats = _np(table, "image_format")
        unknown = ~np.isin(formats, IMAGE_FORMATS)
        _fail_rows(table, split, unknown, f"field 'image_format' not one of {IMAGE_FORMATS}")
        h, w, c = (_np(table, n).astype(np.int64) for n in ("height", "width", "channels"))
        _fail_rows(table, split, (h < 1) | (w < 1) | (c < 1), "height, width and channels must be >= 1")
        sizes = pc.binary_length(table.column("image")).to_numpy()
        wrong_size = (formats == "raw") & (sizes != h * w * c)
        _fail_rows(table, split, wrong_size, "raw image size is not height*width*channels")
    if "captions" in schema.names:
        bad = _bad_texts(_array(table, "captions"))
        _fail_rows(table, split, bad, "field 'captions' is empty or holds a blank caption")
    for field in ("negatives", "also_true"):
        if field in schema.names:
            bad = _bad_texts(_array(table, field), allow_empty=True)
            _fail_rows(table, split, bad, f"field {field!r} holds a blank caption")
    if "questions" in schema.names:
        _check_questions(table, split)
    if "refs" in schema.names:
        _check_refs(table, split)
    return table


def _check_questions(table: pa.Table, split: str) -> None:
    """Each row: >= 1 question, each with an id, a non-blank question and >= 1 non-blank answer."""
    questions = _array(table, "questions")
    _fail_rows(table, split, _lengths(questions) == 0, "field 'questions' is empty")
    flat, rows = pc.list_flatten(questions), pc.list_parent_indices(questions).to_numpy()
    missing = _blank(flat.field("question_id"))
    problems = {
        "field 'questions': a question is null or has a null question_id": _null(flat) | missing,
        "field 'questions': a question text is blank": _blank(flat.field("question")),
        "field 'questions': a question has no answers or a blank answer": _bad_texts(flat.field("answers")),
    }
    for problem, bad in problems.items():
        _fail_rows(table, split, _any_per_row(table.num_rows, rows, bad), problem)


def _check_refs(table: pa.Table, split: str) -> None:
    """Each row: >= 1 ref, each with an id, >= 1 non-blank expression and a finite box
    0 <= x1 < x2 <= width, 0 <= y1 < y2 <= height."""
    refs = _array(table, "refs")
    _fail_rows(table, split, _lengths(refs) == 0, "field 'refs' is empty")
    flat, rows = pc.list_flatten(refs), pc.list_parent_indices(refs).to_numpy()
    listed = flat.field("box").to_pylist()
    boxes = np.array([[np.nan if v is None else v for v in box or [None] * 4] for box in listed], np.float64)
    boxes = boxes.reshape(-1, 4)
    width, height = _np(table, "width")[rows], _np(table, "height")[rows]
    x1, y1, x2, y2 = boxes.T
    with np.errstate(invalid="ignore"):
        inside = np.isfinite(boxes).all(axis=1) & (0 <= x1) & (x1 < x2) & (x2 <= width) & (0 <= y1) & (y1 < y2)
        inside &= y2 <= height
    problems = {
        "field 'refs': a ref is null or has a null ref_id": _null(flat) | _null(flat.field("ref_id")),
        "field 'refs': a ref has no expressions or a blank expression": _bad_texts(flat.field("expressions")),
        "field 'refs': a box is not finite with 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height": ~inside,
    }
    for problem, bad in problems.items():
        _fail_rows(table, split, _any_per_row(table.num_rows, rows, bad), problem)


def _array(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks()


def _lengths(lists: pa.Array) -> np.ndarray:
    return pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)


def _null(array: pa.Array) -> np.ndarray:
    return array.is_null().to_numpy(zero_copy_only=False)


def _blank(strings: pa.Array) -> np.ndarray:
    """Per string: null, or empty after trimming whitespace."""
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(strings)), 0)
    return empty.fill_null(True).to_numpy(zero_copy_only=False)


def _bad_texts(lists: pa.Array, allow_empty: bool = False) -> np.ndarray:
    """Per list of strings: null, empty (unless ``allow_empty``), or holding a blank string."""
    bad = _null(lists) if allow_empty else _null(lists) | (_lengths(lists) == 0)
    return bad | _any_per_row(len(lists), pc.list_parent_indices(lists).to_numpy(), _blank(pc.list_flatten(lists)))


def _any_per_row(num_rows: int, rows: np.ndarray, bad_items: np.ndarray) -> np.ndarray:
    """Per row: whether any of its items (``rows[i]`` is item i's row) is bad."""
    bad = np.zeros(num_rows, bool)
    bad[rows[bad_items]] = True
    return bad


def _cast(column: pa.ChunkedArray, field: pa.Field, where: str) -> pa.ChunkedArray:
    """Casts to the field's type when the shape is the same (``_castable``) and no integer,
    string or binary value changes (floats may narrow, e.g. box coordinates to float32)."""
    if column.type == field.type:
        return column
    if _castable(column.type, field.type):
        try:
            return column.cast(field.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DatasetError(f"{where}: field {field.name!r} does not fit {field.type}: {e}") from None
    raise DatasetError(f"{where}: field {field.name!r} has type {column.type}, expected {field.type}")


def _castable(have: pa.DataType, want: pa.DataType) -> bool:
    """Same nesting of lists and structs (same field names, in order), leaves in one type
    family (integers may become floats); a null-typed leaf (all values null) fits anything."""
    if have == want or pa.types.is_null(have):
        return True
    if any(is_list(have) for is_list in _LIST_TYPES) and any(is_list(want) for is_list in _LIST_TYPES):
        return _castable(have.value_type, want.value_type)
    if pa.types.is_struct(have) and pa.types.is_struct(want):
        return [f.name for f in have] == [f.name for f in want] and all(
            _castable(a.type, b.type) for a, b in zip(have, want, strict=True)
        )
    if pa.types.is_integer(have) and pa.types.is_floating(want):
        return True
    return any(family(have) and family(want) for family in _TYPE_FAMILIES)


def _np(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _fail_rows(table: pa.Table, split: str, bad: np.ndarray, problem: str) -> None:
    rows = np.flatnonzero(bad)
    if rows.size:
        row = int(rows[0])
        source = table.column("source_id")[row].as_py() if "source_id" in table.column_names else None
        raise DatasetError(f"split {split!r} row {row} (source_id {source!r}): {problem} ({rows.size} rows in all)")


def _write_split(folder: Path, split: str, table: pa.Table, shard_size: int) -> dict[str, Any]:
    shards = []
    for index, start in enumerate(range(0, table.num_rows, shard_size)):
        file = f"{split}-{index:05d}.parquet"
        chunk = table.slice(start, shard_size).combine_chunks()
        pq.write_table(chunk, folder / file, compression="zstd")
        shards.append({"file": file, "rows": chunk.num_rows, "sha256": _sha256(folder / file)})
    return {"count": table.num_rows, "shards": shards}


def _sha256(path: str | Path) -> str:
    with open_input(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _replace_dir(new: Path, out: Path) -> None:
    if not out.exists():
        new.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise DatasetError(f"{path}: {problem}")

    kinds = {"name": str, "task": str, "class_names": list, "splits": dict, "metadata": dict}
    for key, kind in kinds.items():
        need(isinstance(manifest.get(key), kind), f"{key!r} must be a {kind.__name__}")
    for split, entry in manifest["splits"].items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        need(isinstance(shards, list) and bool(shards), f"split {split!r} has no 'shards' list")
        for shard in shards:
            need(
                isinstance(shard, dict)
                and isinstance(shard.get("file"), str)
                and _is_plain_file_name(shard["file"])
                and isinstance(shard.get("rows"), int)
                and isinstance(shard.get("sha256"), str),
                f"split {split!r} has a malformed shard entry {shard!r}",
            )
        rows = sum(s["rows"] for s in shards)
        need(entry.get("count") == rows, f"split {split!r}: 'count' is not the sum of shard rows ({rows})")


def _is_plain_file_name(name: str) -> bool:
    return name not in ("", ".", "..") and os.path.basename(name) == name


def _split_entry(manifest: dict[str, Any], split: str, dataset_dir: str | os.PathLike) -> dict[str, Any]:
    try:
        return manifest["splits"][split]
    except KeyError:
        raise DatasetError(
            f"{dataset_dir}: no split {split!r}; known splits: {', '.join(manifest['splits'])}"
        ) from None


def verify_shard(path: str | Path, entry: dict[str, Any]) -> None:
    """Checks one shard file against its manifest entry (sha256, readable); raises DatasetError naming it."""
    try:
        digest = _sha256(path)
    except FileNotFoundError:
        raise DatasetError(f"shard {path}: missing") from None
    except OSError as e:
        raise DatasetError(f"shard {path}: cannot read: {e}") from None
    if digest != entry["sha256"]:
        raise DatasetError(
            f"shard {path}: sha256 {digest} differs from the manifest's {entry['sha256']}; "
            "the file is truncated, corrupt or was changed: convert the dataset again"
        )
    try:
        rows = pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"shard {path}: not a readable Parquet file: {e}") from None
    if rows != entry["rows"]:
        raise DatasetError(f"shard {path}: holds {rows} rows, the manifest says {entry['rows']}")
