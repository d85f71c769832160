"""Converting a source to a dataset folder: scan, load every entry, write shards.

``convert`` runs a format's converter and loads its entries into tables (stopping at, or
skipping and listing, bad entries); ``prepare_dataset`` writes them with
``write_dataset`` and lists the skipped entries in ``skipped.jsonl`` beside the manifest.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.formats import FORMATS
from pretrainlab.data.formats.common import BadInput, Entry, Row, answer_vocab
from pretrainlab.data.formats.resize import resize_row
from pretrainlab.data.shards import SCHEMAS, write_dataset

SKIPPED_FILE = "skipped.jsonl"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")  # a part of shard file names

Progress = Callable[[list[Entry]], Iterable[Entry]]


@dataclass(frozen=True)
class Converted:
    """A converted source, ready for ``write_dataset``.

    Attributes:
        task: the task family (a key of ``SCHEMAS``).
        splits: split name -> table in the family's schema, rows shuffled by the seed.
        class_names: label id -> name; empty for image-text sets.
        metadata: manifest metadata: format, source, seed, image_size, skipped (a count),
            and the family's extras (``answer_vocab`` for vqa, ``categories`` for grounding).
        skipped: ``{"file", "entry", "reason"}`` per skipped entry.
    """

    task: str
    splits: dict[str, pa.Table]
    class_names: list[str]
    metadata: dict[str, Any]
    skipped: list[dict[str, str]]


def convert(
    fmt: str,
    src: str | os.PathLike,
    *,
    split: str | None = None,
    images: str | os.PathLike | None = None,
    image_size: int | None = None,
    skip_bad: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
) -> Converted:
    """Converts a source in format ``fmt`` to tables, one per split.

    Args:
        fmt: a key of ``FORMATS``.
        src: the source file or folder (see the format's module).
        split: the name of the split of a source that holds one split only.
        images: where an image-text format's images are, instead of its default place.
        image_size: resize so the shorter side is this many pixels (re-encoded as PNG);
            None keeps the source bytes as they are.
        skip_bad: skip and list bad entries instead of stopping at the first.
        seed: seeds the row order within each split (rows are shuffled so every shard
            mixes classes; ``source_id`` says where each row came from).
        progress: wraps the entry list while it is loaded, e.g. ``tqdm``.

    Raises:
        DatasetError: an unknown format, a bad argument, a bad source file, a bad entry
            (unless ``skip_bad``), or no entry left to write; the message names the file
            and the entry.
    """
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    task, converter = FORMATS[fmt]
    if images is not None and task == "classification":
        raise DatasetError(f"--images is for the image-text formats; {fmt} reads images relative to SRC")
    if image_size is not None and image_size < 1:
        raise DatasetError(f"--image-size must be >= 1, got {image_size}")
    src, bad = Path(src), BadInput(skip_bad)
    source = converter(src, None if images is None else Path(images), bad)
    _check_splits(source.entries, split, src)

    rows: dict[str, list[Row]] = {}
    for entry in (progress or iter)(source.entries):
        with bad.entry(entry.file, entry.key):
            row = entry.load()
            if image_size is not None:
                row = resize_row(row, image_size)
            name = split or entry.split
            rows.setdefault(name, []).append({**row, "split": name, "source_id": entry.source_id})
    if not rows:
        raise DatasetError(f"{src}: no {fmt} entries to convert ({len(bad.skipped)} skipped as bad)")

    metadata = {"format": fmt, "source": str(src.absolute()), "seed": seed, "image_size": image_size}
    metadata |= {"skipped": len(bad.skipped), **source.metadata}
    if task == "vqa":
        metadata["answer_vocab"] = answer_vocab([row for split_rows in rows.values() for row in split_rows])
    tables = {name: _table(split_rows, SCHEMAS[task], seed) for name, split_rows in rows.items()}
    return Converted(task, tables, source.class_names, metadata, bad.skipped)


def prepare_dataset(
    fmt: str, src: str | os.PathLike, out: str | os.PathLike, *, shard_size: int = 20000, **options: Any
) -> dict[str, Any]:
    """Converts a source and writes it to ``out``: shards, ``manifest.json``, ``skipped.jsonl``.

    The same source and options give byte-identical shards. ``skipped.jsonl`` holds one
    JSON object (file, entry, reason) per skipped entry; it is empty when none was.

    Args:
        fmt: a key of ``FORMATS``.
        src: the source file or folder.
        out: the dataset folder; an existing dataset there is replaced atomically.
        shard_size: most rows per shard.
        **options: ``convert``'s keyword arguments.

    Returns:
        The manifest.

    Raises:
        DatasetError: as ``convert`` and ``write_dataset`` do.
    """
    converted = convert(fmt, src, **options)
    manifest = write_dataset(
        out,
        converted.splits,
        name=Path(out).name,
        task=converted.task,
        class_names=converted.class_names,
        shard_size=shard_size,
        metadata=converted.metadata,
    )
    lines = [json.dumps(record, sort_keys=True) + "\n" for record in converted.skipped]
    (Path(out) / SKIPPED_FILE).write_text("".join(lines), encoding="utf-8")
    return manifest


def _check_splits(entries: list[Entry], split: str | None, src: Path) -> None:
    first: dict[str, Entry] = {}
    for entry in entries:
        first.setdefault(entry.split, entry)
    if split is not None and len(first) > 1:
        raise DatasetError(f"{src}: holds splits {', '.join(first)}; --split only names a one-split source's split")
    named = {split: "--split"} if split is not None else {n: f"{e.file} ({e.key})" for n, e in first.items()}
    for name, where in named.items():
        if not _SPLIT_NAME.fullmatch(name):
            raise DatasetError(f"{where}: split {name!r:.80} may only hold letters, digits and '_' (at most 64)")


def _table(rows: list[Row], schema: pa.Schema, seed: int) -> pa.Table:
    order = np.random.default_rng(seed).permutation(len(rows))
    return pa.Table.from_pylist([rows[i] for i in order], schema=schema)
